"""gc benchmark: a store of N blobs, half referenced by the catalog, collected with grace 0,
on the local folder and on a SeaweedFS S3 server, side by side.

    python -m bench.gc [--blobs 100000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dsreg import Registry
from dsreg.catalog import BaseTensor, BlobRecord
from dsreg.testing import S3_BUCKET, create_database, drop_database, postgres_available, seaweedfs


def fill(reg: Registry, n: int) -> None:
    """n small blobs; the even ones referenced by a base, the odd ones orphans."""
    payloads = [os.urandom(64) + i.to_bytes(8, "little") for i in range(n)]
    with ThreadPoolExecutor(32) as pool:
        digests = list(pool.map(lambda p: reg.store.put(p)[0], payloads, chunksize=64))
    kept = digests[::2]
    tensors = [BaseTensor(f"t{i}", "float32", (16,), uuid.uuid4().hex * 2, d, 72) for i, d in enumerate(kept)]
    reg.catalog.add_base("bench", uuid.uuid4().hex * 2, {"format": "safetensors"}, tensors, [BlobRecord(d, 72, 72) for d in kept], 64 * len(kept))


def measure(reg: Registry, n: int) -> tuple[float, float, float, int]:
    t = time.perf_counter()
    fill(reg, n)
    fill_s = time.perf_counter() - t
    t = time.perf_counter()
    dry = reg.gc(grace=0, dry_run=True)
    dry_s = time.perf_counter() - t
    t = time.perf_counter()
    report = reg.gc(grace=0)
    gc_s = time.perf_counter() - t
    assert report.removed_objects == dry.removed_objects == n // 2, report
    return fill_s, dry_s, gc_s, report.removed_objects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blobs", type=int, default=100_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dsreg-bench-gc-"))
    postgres_available()
    with seaweedfs(work / "seaweedfs"):
        run(args, work)


def run(args, work: Path) -> None:
    pg = create_database()
    try:
        rows = {}
        with Registry.open(f"sqlite:///{work / 'c.db'}", str(work / "blobs"), home=work / "h1") as reg:
            rows["SQLite + local folder"] = measure(reg, args.blobs)
        with Registry.open(pg, f"s3://{S3_BUCKET}/gc-{uuid.uuid4().hex[:8]}", home=work / "h2") as reg:
            rows["Postgres + SeaweedFS S3"] = measure(reg, args.blobs)
        print(f"gc over a store of {args.blobs:,} blobs, half of them unreferenced, grace 0 (seconds)")
        print(f"{'engines':<26} {'fill':>8} {'gc --dry-run':>13} {'gc':>8} {'removed':>9} {'removed/s':>10} {'gc vs local':>12}")
        local_gc = rows["SQLite + local folder"][2]
        for label, (fill_s, dry_s, gc_s, removed) in rows.items():
            print(f"{label:<26} {fill_s:>8.1f} {dry_s:>13.1f} {gc_s:>8.1f} {removed:>9,} {removed / gc_s:>10,.0f} {gc_s / local_gc:>11.2f}x")
    finally:
        drop_database(pg)


if __name__ == "__main__":
    main()
