"""Pass one over a checkpoint: every tensor's digest, checked finite, read in a thread of its own.

A push compresses while the scan runs: reading and hashing a 3.4 GB file is mostly waiting on the
disk, and it finishes long before the decompositions do. What the scan guards is that nothing is
written for a checkpoint with a bad tensor anywhere in it, so the push holds its uploads back
(:class:`HeldUploads`) until the scan has passed the whole file.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from . import codec
from .checkpoint import Checkpoint, TensorSpec
from .errors import NonFiniteWeights
from .concurrency import Background, Scratch

# A push holds at most this many bytes of compressed blobs while the scan is still reading; past
# that it waits for the scan (a slow disk), which bounds its memory.
HELD_LIMIT = 256 << 20


@dataclass(frozen=True)
class Scanned:
    """The finished scan: every tensor's digest, the bytes read and the source's digest."""

    specs: list[TensorSpec]
    digests: dict[str, str]
    nbytes: int
    source_digest: str
    file_keys: frozenset[str] = frozenset()  # a pipeline's files: they may differ from the base's in size, or be new

    def spec(self, key: str) -> TensorSpec:
        return next(s for s in self.specs if s.key == key)


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in a float tensor, in one pass with no temporaries.

    A sum is finite only if every term is (NaN and ±Inf propagate, Inf − Inf is NaN), so one fp32
    sum answers for almost every tensor; only a sum that overflows from finite terms needs the exact
    test. ``torch.isfinite(t).all()`` makes an absolute value and three boolean tensors the size of
    ``t``, fresh pages each, which cost thirty times the CPU of the sums over an SD1.5 UNet.
    """
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(tensor if tensor.element_size() > 1 else tensor.float()).all())  # no isfinite for fp8


class Scan:
    """The scan of ``ckpt``, started at once. ``specs`` and ``file_keys`` are known from the header;
    ``digest`` waits for one tensor, ``result`` for all, and both raise what the scan met."""

    def __init__(self, ckpt: Checkpoint, progress):
        self.specs = ckpt.specs
        self.specs_by_key = {s.key: s for s in ckpt.specs}
        self.file_keys = frozenset(ckpt.layout.file_keys or ())
        self._ckpt, self._progress = ckpt, progress
        self._digests: dict[str, str] = {}
        self._source: str | None = None
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dsreg-scan", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with Scratch() as scratch:  # each tensor is read, checked, hashed and dropped: no fresh pages
                for i, spec in enumerate(self.specs):
                    if self._stop.is_set():
                        return
                    digest = self._ckpt.known_digests.get(spec.key) or self._check(spec, self._ckpt.get(spec.key, scratch))
                    with self._changed:
                        self._digests[spec.key] = digest
                        self._changed.notify_all()
                    self._progress("read", i + 1, len(self.specs))
            source = self._ckpt.file_digest()
            with self._changed:
                self._source = source
                self._changed.notify_all()
        except BaseException as exc:  # raised again in whoever waits on the scan
            with self._changed:
                self._error = exc
                self._changed.notify_all()

    def _check(self, spec: TensorSpec, tensor: torch.Tensor) -> str:
        if tensor.is_floating_point() and not _all_finite(tensor):
            bad = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteWeights(f"{self._ckpt.path}: tensor {spec.key!r} has {bad} NaN or Inf values; refusing to store it")
        return codec.tensor_digest(tensor)

    def _wait(self, ready) -> None:
        with self._changed:
            while not ready() and self._error is None:
                self._changed.wait()
            if self._error is not None:
                raise self._error

    def digest(self, key: str) -> str:
        self._wait(lambda: key in self._digests)
        return self._digests[key]

    @property
    def done(self) -> bool:
        """Whether the scan has ended, well or not (``result`` then returns or raises at once)."""
        return self._source is not None or self._error is not None

    def result(self) -> Scanned:
        self._wait(lambda: self._source is not None)
        return Scanned(self.specs, dict(self._digests), self._ckpt.nbytes, self._source, self.file_keys)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> "Scan":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HeldUploads:
    """``Background.submit`` for uploads, held back until the scan has passed every tensor."""

    def __init__(self, scan: Scan, uploads: Background, limit: int = HELD_LIMIT):
        self._scan, self._uploads, self._limit = scan, uploads, limit
        self._held: list[tuple] = []
        self._bytes = 0
        self._released = False

    def submit(self, fn, data: bytes, *args) -> None:
        if not self._released:
            self._held.append((fn, data, *args))
            self._bytes += len(data)
            if not self._scan.done and self._bytes <= self._limit:
                return
            self.release()
            return
        self._uploads.submit(fn, data, *args)

    def release(self) -> None:
        """Wait for the scan (raising what it met, with nothing uploaded), then upload what was held."""
        self._scan.result()
        self._released = True
        held, self._held = self._held, []
        for fn, *args in held:
            self._uploads.submit(fn, *args)
