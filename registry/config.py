"""Every setting dsreg reads, in one place: flags override ``DSREG_*`` variables, which override defaults."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

ENV_HOME = "DSREG_HOME"
ENV_CATALOG_URL = "DSREG_CATALOG_URL"
ENV_STORE_URL = "DSREG_STORE_URL"
ENV_CACHE_DIR = "DSREG_CACHE_DIR"

DEFAULT_ENERGY = 0.5
DEFAULT_FACTOR_DTYPE = "fp16"
ZSTD_LEVEL = 3


@dataclass(frozen=True)
class Settings:
    home: Path
    catalog_url: str
    store_url: str
    cache_dir: Path

    @classmethod
    def resolve(cls, catalog: str | None = None, store: str | None = None, home: str | os.PathLike | None = None) -> "Settings":
        home_path = Path(home or os.environ.get(ENV_HOME) or Path.home() / ".dsreg").expanduser()
        catalog_url = catalog or os.environ.get(ENV_CATALOG_URL) or f"sqlite:///{home_path / 'catalog.db'}"
        store_url = store or os.environ.get(ENV_STORE_URL) or str(home_path / "blobs")
        cache_dir = Path(os.environ.get(ENV_CACHE_DIR) or home_path / "cache").expanduser()
        return cls(home=home_path, catalog_url=catalog_url, store_url=store_url, cache_dir=cache_dir)

    def is_default_home(self) -> bool:
        return self.catalog_url.startswith("sqlite:///") and str(self.home) in self.catalog_url


_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<secret>[^@/\s]*)@")
_SECRET_PARAM = re.compile(r"(?i)((?:password|secret|secret_access_key|token|key)=)[^&\s]+")


def redact(text: str) -> str:
    """Hide passwords in URLs and secret query parameters, so that no message or log leaks them."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return _SECRET_PARAM.sub(r"\1***", text)
