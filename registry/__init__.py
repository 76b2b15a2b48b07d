"""dsreg: a registry of fine-tuned diffusion checkpoints, stored as Delta-SVD deltas against shared bases."""

from .errors import (
    AmbiguousBase,
    BaseMismatch,
    BaseNotFound,
    CheckpointError,
    Conflict,
    DsregError,
    IntegrityError,
    InvalidName,
    NonFiniteWeights,
    NotFound,
    RevisionNotFound,
    StoreError,
    SubjectNotFound,
    UnsafeCheckpoint,
    UsageError,
)
from .records import (
    BaseInfo, CheckoutResult, GcReport, LoraExport, GroupSummary, PolicyInfo, RevisionDetail, RevisionInfo, Stats, SubjectInfo, TensorInfo,
    SweepRow, VerifyReport,
)
from .ranking import RankRule
from .registry import Registry

__version__ = "0.1.0"

__all__ = [
    "Registry", "RankRule", "SweepRow",
    "BaseInfo", "CheckoutResult", "GcReport", "LoraExport", "PolicyInfo", "VerifyReport", "GroupSummary", "RevisionDetail", "RevisionInfo", "Stats", "SubjectInfo", "TensorInfo",
    "DsregError", "UsageError", "InvalidName", "NotFound", "SubjectNotFound", "RevisionNotFound", "BaseNotFound",
    "CheckpointError", "UnsafeCheckpoint", "NonFiniteWeights", "BaseMismatch", "AmbiguousBase", "Conflict",
    "IntegrityError", "StoreError",
]
