"""The planner's error: a run that cannot be planned as configured (raised by every module of `plan/`).

Imports only higgs_lora.errors. See docs/planning.md.
"""

from higgs_lora.errors import UserError


class PlanError(UserError, ValueError):
    """The run cannot be planned as configured; the message says what to change."""
