"""safeserve: keeps ML predictions coming when models, inputs or infrastructure fail.

The public API; everything else is private. See SPEC.md and README.md.
"""

from safeserve.baseline import Baseline, BaselineError, FeatureBaseline
from safeserve.batch import BatchOutcome
from safeserve.config import load_policies, watch_policies
from safeserve.decisions import Attempt, Decision, Outcome, Reason
from safeserve.decorator import AsyncGuarded, Guarded, guard
from safeserve.errors import (
    InputRejected,
    NoFallbackAvailable,
    PolicyError,
    Problem,
    SafeServeError,
)
from safeserve.logwriter import flush_logs
from safeserve.policy import (
    BreakerConfig,
    ConfidenceConfig,
    DecisionLogConfig,
    Fallback,
    Policy,
    RetryConfig,
    Rule,
    ValidationConfig,
)
from safeserve.registry import force_degradation, record_outcome, testing

__version__ = "0.1.0"

__all__ = [
    "AsyncGuarded",
    "Attempt",
    "Baseline",
    "BaselineError",
    "BatchOutcome",
    "BreakerConfig",
    "ConfidenceConfig",
    "Decision",
    "DecisionLogConfig",
    "Fallback",
    "FeatureBaseline",
    "Guarded",
    "InputRejected",
    "NoFallbackAvailable",
    "Outcome",
    "Policy",
    "PolicyError",
    "Problem",
    "Reason",
    "RetryConfig",
    "Rule",
    "SafeServeError",
    "ValidationConfig",
    "__version__",
    "flush_logs",
    "force_degradation",
    "guard",
    "load_policies",
    "record_outcome",
    "testing",
    "watch_policies",
]
