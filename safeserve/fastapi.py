"""The FastAPI integration's public names (install the `fastapi` extra).

```python
from safeserve.fastapi import SafeServeMiddleware, admin_router

app.add_middleware(SafeServeMiddleware, routes={"/predict": policy})
app.include_router(admin_router([predict], token="..."))
```
"""

from safeserve.integrations.admin import admin_router
from safeserve.integrations.middleware import SafeServeMiddleware

__all__ = ["SafeServeMiddleware", "admin_router"]
