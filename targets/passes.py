"""The passes that end every plan, in one place: lowering (``lowering``) and recording (``recording``).

Kept so ``from potstill.targets.passes import ...`` goes on working; new code imports the module
that defines the name.
"""

from .lowering import (
    LowerPass,
    QuantizeInt8Pass,
    is_lowering,
    lower_module,
    lower_student,
    state_profile,
    student_dir,
)
from .recording import RecordPass, TeacherRecordPass, check_budgets, latency_record, run_metric, weight_bytes

__all__ = [
    "LowerPass",
    "QuantizeInt8Pass",
    "RecordPass",
    "TeacherRecordPass",
    "check_budgets",
    "is_lowering",
    "latency_record",
    "lower_module",
    "lower_student",
    "run_metric",
    "state_profile",
    "student_dir",
    "weight_bytes",
]
