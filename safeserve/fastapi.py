"""The FastAPI integration's public names (install the `fastapi` extra).

```python
from safeserve.fastapi import SafeServeMiddleware, admin_router

app.add_middleware(SafeServeMiddleware, routes={"/predict": policy})
app.include_router(admin_router([predict], token="..."))
install_error_handlers(app)  # 422/500 bodies that never echo the input or a trace
```
"""

from safeserve.integrations.admin import admin_router
from safeserve.integrations.middleware import SafeServeMiddleware
from safeserve.serve import install_error_handlers

__all__ = ["SafeServeMiddleware", "admin_router", "install_error_handlers"]
