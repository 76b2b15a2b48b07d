"""Scale-out benchmark: catalog queries at 100k subjects (SQLite vs Postgres) and push/checkout
throughput on the local folder vs a SeaweedFS S3 server, measured side by side in one run.

    python -m bench.scale [--subjects 100000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sqlalchemy as sa
import torch
from safetensors.torch import save_file

from dsreg import Registry
from dsreg.catalog import Catalog
from dsreg.tables import BaseRow, RevisionRow, SubjectRow, TagRow
from dsreg.demo import TinyUNet, state_dict
from dsreg.testing import S3_BUCKET, create_database, drop_database, postgres_available, seaweedfs


def seed_catalog(catalog: Catalog, n: int) -> None:
    """n subjects with 1-3 revisions each over a year, 1% tagged, straight into the tables."""
    rng = random.Random(0)
    now = datetime.now(timezone.utc)
    with catalog.session() as s:
        for name in ("sd15", "sd21"):
            s.add(BaseRow(name=name, digest=uuid.uuid4().hex * 2, n_tensors=686, n_params=859_520_964, nbytes=3_438_083_856, layout="{}"))
    with catalog.engine.begin() as conn:
        base_ids = [r[0] for r in conn.execute(sa.select(BaseRow.id))]
        batch = 10_000
        for start in range(0, n, batch):
            subjects, revisions, tags = [], [], []
            for i in range(start, min(n, start + batch)):
                latest = rng.randint(1, 3)
                subjects.append({"id": i + 1, "name": f"subject-{i + 1}", "latest": latest, "created_at": now - timedelta(days=rng.uniform(0, 365))})
                for number in range(1, latest + 1):
                    revisions.append({
                        "subject_id": i + 1, "number": number, "base_id": base_ids[i % 2],
                        "created_at": now - timedelta(days=rng.uniform(0, 365)), "energy": 0.5, "rank_rule": "energy=0.5", "encoding": "fp16",
                        "original_bytes": 3_438_083_856, "stored_bytes": rng.randint(50, 400) * 10**6, "kept_params": 190_000_000,
                        "n_tensors": 686, "n_changed": 686, "source_digest": "0" * 64, "source_format": "safetensors", "layout": "{}",
                    })
                if i % 100 == 0:
                    tags.append({"subject_id": i + 1, "name": "prod", "revision_id": None})
            conn.execute(sa.insert(SubjectRow), subjects)
            conn.execute(sa.insert(RevisionRow), revisions)
            if tags:
                ids = dict(conn.execute(
                    sa.select(RevisionRow.subject_id, RevisionRow.id).where(RevisionRow.subject_id.in_([t["subject_id"] for t in tags]), RevisionRow.number == 1)
                ).all())
                conn.execute(sa.insert(TagRow), [{**t, "revision_id": ids[t["subject_id"]], "created_at": now} for t in tags])
    if catalog.engine.dialect.name == "postgresql":
        with catalog.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("ANALYZE"))
    else:
        with catalog.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")


QUERIES = {
    "first page (50, by name)": dict(limit=50),
    "deep page (offset 50k)": dict(limit=50, offset=50_000),
    "deep page (after= cursor)": dict(limit=50, after="subject-55000"),
    "name prefix 'subject-4242'": dict(name_like="subject-4242", limit=50),
    "by base": dict(base="sd21", limit=50),
    "by tag": dict(tag="prod", limit=50),
    "since 1 day": dict(since=datetime.now(timezone.utc) - timedelta(days=1), limit=50),
}


def time_queries(catalog: Catalog, repeats: int) -> dict[str, tuple[float, float]]:
    out = {}
    for label, kwargs in QUERIES.items():
        catalog.subjects(**kwargs)  # warm
        samples = []
        for _ in range(repeats):
            t = time.perf_counter()
            catalog.subjects(**kwargs)
            samples.append((time.perf_counter() - t) * 1000)
        samples.sort()
        out[label] = (statistics.median(samples), samples[int(0.95 * (len(samples) - 1))])
    return out


def throughput(reg: Registry, base: Path, fts: list[Path], out_dir: Path) -> tuple[float, float]:
    reg.add_base(base, "bench")
    nbytes = sum(p.stat().st_size for p in fts)
    t = time.perf_counter()
    refs = [reg.push(p, base="bench", device="cpu").ref for p in fts]
    push_s = time.perf_counter() - t
    t = time.perf_counter()
    for i, ref in enumerate(refs):
        reg.checkout(ref, out_dir / f"{i}.safetensors", device="cpu")
    checkout_s = time.perf_counter() - t
    return nbytes / push_s / 1e6, nbytes / checkout_s / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dsreg-bench-"))
    postgres_available()
    with seaweedfs(work / "seaweedfs"):
        run(args, work)


def run(args, work: Path) -> None:
    pg_urls = [create_database(), create_database()]
    try:
        print(f"catalog queries at {args.subjects:,} subjects, {args.repeats} runs each (ms)")
        results = {}
        for label, url in (("SQLite", f"sqlite:///{work / 'scale.db'}"), ("Postgres", pg_urls[0])):
            catalog = Catalog.open(url)
            t = time.perf_counter()
            seed_catalog(catalog, args.subjects)
            print(f"  seeded {label} in {time.perf_counter() - t:.1f} s")
            results[label] = time_queries(catalog, args.repeats)
            catalog.close()
        print(f"{'query':<28} {'SQLite p50':>11} {'p95':>7} {'Postgres p50':>13} {'p95':>7}")
        for q in QUERIES:
            (a50, a95), (b50, b95) = results["SQLite"][q], results["Postgres"][q]
            print(f"{q:<28} {a50:>11.2f} {a95:>7.2f} {b50:>13.2f} {b95:>7.2f}")

        torch.manual_seed(0)
        model = TinyUNet(128)
        base_sd = state_dict(model)
        save_file(base_sd, work / "base.safetensors")
        fts = []
        for i in range(3):
            g = torch.Generator().manual_seed(i)
            ft = {k: v + 0.01 * v.std() * torch.randn(v.shape, generator=g) if v.dim() < 2 else
                  v + 0.02 * (torch.randn(v.shape[0], 8, generator=g) @ torch.randn(8, v[0].numel(), generator=g)).reshape(v.shape) * v.std() / 8
                  for k, v in base_sd.items()}
            save_file(ft, work / f"ft{i}.safetensors")
            fts.append(work / f"ft{i}.safetensors")
        mb = sum(p.stat().st_size for p in fts) / 1e6
        print(f"\npush / checkout throughput: 3 fine-tunes of a {mb / 3:.1f} MB model (MB/s of checkpoint)")
        rows = {}
        (work / "out-local").mkdir()
        (work / "out-s3").mkdir()
        with Registry.open(f"sqlite:///{work / 'tp.db'}", str(work / "blobs"), home=work / "h1") as reg:
            rows["SQLite + local folder"] = throughput(reg, work / "base.safetensors", fts, work / "out-local")
        with Registry.open(pg_urls[1], f"s3://{S3_BUCKET}/bench-{uuid.uuid4().hex[:8]}", home=work / "h2") as reg:
            rows["Postgres + SeaweedFS S3"] = throughput(reg, work / "base.safetensors", fts, work / "out-s3")
        local_push, local_co = rows["SQLite + local folder"]
        print(f"{'engines':<26} {'push MB/s':>10} {'checkout MB/s':>14} {'push vs local':>14} {'checkout vs local':>18}")
        for label, (p, c) in rows.items():
            print(f"{label:<26} {p:>10.1f} {c:>14.1f} {p / local_push:>13.2f}x {c / local_co:>17.2f}x")
    finally:
        for url in pg_urls:
            drop_database(url)


if __name__ == "__main__":
    main()
