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
    OutputError,
    RevisionNotFound,
    StoreError,
    SubjectNotFound,
    UnsafeCheckpoint,
    UsageError,
)
from .records import (
    BaseInfo, CheckoutResult, Event, GcReport, LoraExport, GroupSummary, PolicyInfo, RevisionDetail, RevisionInfo, Stats, SubjectInfo, TensorInfo,
    RepairReport, SweepRow, VerifyReport,
)
from .registry import Registry


def __getattr__(name: str):
    # These modules import torch: only when they are asked for.
    if name == "RankRule":
        from .ranking import RankRule

        return RankRule
    if name == "Applied":
        from .live import Applied

        return Applied
    raise AttributeError(f"module 'dsreg' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "Registry", "RankRule", "Applied", "SweepRow",
    "BaseInfo", "CheckoutResult", "Event", "GcReport", "LoraExport", "PolicyInfo", "RepairReport", "VerifyReport", "GroupSummary", "RevisionDetail", "RevisionInfo", "Stats", "SubjectInfo", "TensorInfo",
    "DsregError", "UsageError", "InvalidName", "NotFound", "SubjectNotFound", "RevisionNotFound", "BaseNotFound",
    "CheckpointError", "UnsafeCheckpoint", "NonFiniteWeights", "BaseMismatch", "AmbiguousBase", "Conflict",
    "IntegrityError", "StoreError", "OutputError",
]
