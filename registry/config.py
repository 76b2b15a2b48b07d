"""Every setting dsreg reads, in one place: flags override ``DSREG_*`` variables, which override defaults."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError

ENV_HOME = "DSREG_HOME"
ENV_CATALOG_URL = "DSREG_CATALOG_URL"
ENV_STORE_URL = "DSREG_STORE_URL"
ENV_CACHE_DIR = "DSREG_CACHE_DIR"
ENV_CACHE_SIZE = "DSREG_CACHE_SIZE"
ENV_STORE_OPTIONS = "DSREG_STORE_OPTIONS"
ENV_S3_ENDPOINT = "DSREG_S3_ENDPOINT_URL"
ENV_LEASE_TTL = "DSREG_LEASE_TTL"
ENV_FACTOR_CACHE = "DSREG_FACTOR_CACHE"
ENV_ACTOR = "DSREG_ACTOR"

DEFAULT_ENERGY = 0.5
DEFAULT_ENCODING = "fp16"
# A --budget push trades bytes for quality by design: int8 factors with a 4-bit tail keep more of
# every real fine-tune measured than fp16 factors in the same bytes (docs/rank-rules.md).
BUDGET_ENCODING = "mixed"
ENCODINGS = ("fp16", "bf16", "fp32", "int8", "mixed")  # how factors are stored: dsreg.encodings
ZSTD_LEVEL = 3
# Base tensors are fp32/fp16 weights, which zstd shrinks by only ~7%; a negative level keeps the
# literals raw, so every checkout decodes the whole base about twice as fast.
BASE_ZSTD_LEVEL = -1
DEFAULT_CACHE_SIZE = 20 * 10**9
# Decoded factors kept in memory by Registry.apply: five SD1.5 subjects at tau 0.5 in fp16.
DEFAULT_FACTOR_CACHE = 2 * 10**9
# How long a write's claim on its blobs outlives its last heartbeat (a crashed push's blobs become
# collectable after this, plus the gc grace period).
DEFAULT_LEASE_TTL = 600.0


@dataclass(frozen=True)
class Settings:
    home: Path
    catalog_url: str
    store_url: str
    store_options: dict = field(default_factory=dict)
    cache_dir: Path = Path(".")
    cache_size: int = DEFAULT_CACHE_SIZE
    lease_ttl: float = DEFAULT_LEASE_TTL
    factor_cache: int = DEFAULT_FACTOR_CACHE
    actor: str = "unknown"

    @property
    def journal(self) -> Path:
        """Where checkouts on this machine note their temporaries while they write (see gc)."""
        return self.home / "writing"

    @classmethod
    def resolve(
        cls,
        catalog: str | None = None,
        store: str | None = None,
        home: str | os.PathLike | None = None,
        store_options: dict | None = None,
        factor_cache: int | str | None = None,
    ) -> "Settings":
        home_path = Path(home or os.environ.get(ENV_HOME) or Path.home() / ".dsreg").expanduser()
        catalog_url = catalog or os.environ.get(ENV_CATALOG_URL) or f"sqlite:///{home_path / 'catalog.db'}"
        store_url = store or os.environ.get(ENV_STORE_URL) or str(home_path / "blobs")
        options = _env_store_options(store_url)
        options.update(store_options or {})
        return cls(
            home=home_path,
            catalog_url=catalog_url,
            store_url=store_url,
            store_options=options,
            cache_dir=Path(os.environ.get(ENV_CACHE_DIR) or home_path / "cache").expanduser(),
            cache_size=parse_size(os.environ.get(ENV_CACHE_SIZE) or DEFAULT_CACHE_SIZE),
            lease_ttl=parse_duration(os.environ.get(ENV_LEASE_TTL) or str(DEFAULT_LEASE_TTL)),
            factor_cache=parse_size(factor_cache if factor_cache is not None else os.environ.get(ENV_FACTOR_CACHE) or DEFAULT_FACTOR_CACHE),
            actor=default_actor(),
        )


def default_actor() -> str:
    """Who the audit log names for this process's changes: DSREG_ACTOR, else user@host."""
    import getpass
    import socket

    actor = os.environ.get(ENV_ACTOR)
    if actor:
        return actor[:256]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container's bare uid)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"[:256]


def _env_store_options(store_url: str) -> dict:
    raw = os.environ.get(ENV_STORE_OPTIONS)
    try:
        options = json.loads(raw) if raw else {}
    except ValueError:
        raise UsageError(f"{ENV_STORE_OPTIONS} must be a JSON object of fsspec options") from None
    if not isinstance(options, dict):
        raise UsageError(f"{ENV_STORE_OPTIONS} must be a JSON object of fsspec options")
    endpoint = os.environ.get(ENV_S3_ENDPOINT)
    if endpoint and store_url.startswith(("s3://", "s3a://")):
        options.setdefault("endpoint_url", endpoint)
    return options


_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*")


def parse_size(value: str | int) -> int:
    """Bytes from ``20GB``, ``512MiB``, ``1.5G`` or a plain number (decimal units; ``i`` for binary)."""
    if isinstance(value, int):
        return value
    match = _SIZE.fullmatch(value)
    if not match:
        raise UsageError(f"cannot read {value!r} as a size; write e.g. 20GB, 512MB or 1000000")
    number, unit, binary = match.groups()
    power = " KMGT".index(unit.upper() or " ")
    return int(float(number) * (1024 if binary else 1000) ** power)


_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<secret>[^@/\s]*)@")
_SECRET_PARAM = re.compile(r"(?i)((?:password|secret|secret_access_key|token|key)=)[^&\s]+")


def redact(text: str) -> str:
    """Hide passwords in URLs and secret query parameters, so that no message or log leaks them."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _SECRET_PARAM.sub(r"\1***", text)


_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(s|m|h|d|w)?\s*")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: str) -> float:
    """Seconds from ``90s``, ``30m``, ``6h``, ``7d``, ``2w`` or a plain number of seconds."""
    match = _DURATION.fullmatch(value)
    if not match:
        raise UsageError(f"cannot read {value!r} as a duration; write e.g. 0, 90s, 30m, 6h or 7d")
    number, unit = match.groups()
    return float(number) * _SECONDS[unit or "s"]


def resolve_device(device: str):
    """``auto``, ``cpu`` or ``cuda`` as a ``torch.device``; ``auto`` is the GPU when torch sees one."""
    import torch  # here, not at the top: the CLI reads settings without paying for torch's import

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("device='cuda' (--device cuda) was asked for, but torch sees no CUDA device; use device 'cpu' or 'auto'")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)
