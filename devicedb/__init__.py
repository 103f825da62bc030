"""mfaguard's core: settings, the device store, the verifier and the audit log.

Front ends import only what is listed here.
"""

from devicedb.errors import MfaguardError
from devicedb.models import PUBLIC_FAILURE_MESSAGE, Context, Decision, Requirement, RequirementDecision, Result
from devicedb.settings import Settings, load_settings
from devicedb.store import Store
from devicedb.verifier import Verifier

__all__ = [
    "PUBLIC_FAILURE_MESSAGE",
    "Context",
    "Decision",
    "MfaguardError",
    "Requirement",
    "RequirementDecision",
    "Result",
    "Settings",
    "Store",
    "Verifier",
    "load_settings",
]
