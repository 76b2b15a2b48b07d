"""``dsreg show --report DIR``: a revision's per-group table as Markdown and CSV, and PNG plots.

The plots need matplotlib (``pip install 'dsreg[report]'``); everything else here is the standard library.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from .errors import UsageError
from .records import GroupSummary, RevisionDetail

_COLUMNS = ["group", "tensors", "changed", "kept rank", "full rank", "kept params", "stored bytes", "mean error", "max error"]


def write_report(detail: RevisionDetail, folder: str | os.PathLike) -> list[Path]:
    """Write report.md, groups.csv, tensors.csv and the PNG plots into ``folder``; return their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("the report's plots need matplotlib: pip install 'dsreg[report]'") from None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [_markdown(detail, folder / "report.md"), _groups_csv(detail, folder / "groups.csv"), _tensors_csv(detail, folder / "tensors.csv")]
    for name, groups in (("stages", detail.groups), ("types", detail.types)):
        written.append(_plot(plt, detail, groups, name, folder / f"{name}.png"))
    written.append(_plot_tensors(plt, detail, folder / "tensors.png"))
    return written


def _row(g: GroupSummary) -> list:
    return [g.group, g.n_tensors, g.n_changed, g.rank, g.full_rank, g.kept_params, g.stored_bytes, f"{g.mean_error:.4g}", f"{g.max_error:.4g}"]


def _markdown(detail: RevisionDetail, path: Path) -> Path:
    r = detail.revision
    lines = [
        f"# {r.ref}",
        "",
        f"Base `{r.base}`, ranks by `{r.rank_rule}`, factors in `{r.encoding}`: {r.original_bytes:,} bytes stored as "
        f"{r.stored_bytes:,} ({r.ratio:.1f}x), {r.kept_params:,} parameters kept, {r.n_changed} of {r.n_tensors} tensors changed.",
        "",
        "Error: relative Frobenius error of each tensor's delta as stored, ‖ΔW − ΔŴ‖ / ‖ΔW‖ (0 = exact).",
    ]
    for title, groups in (("By stage", detail.groups), ("By layer type", detail.types)):
        lines += ["", f"## {title}", "", "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
        lines += ["| " + " | ".join(str(c) for c in _row(g)) + " |" for g in groups]
    lines += ["", "![by stage](stages.png)", "", "![by layer type](types.png)", "", "![per tensor](tensors.png)", ""]
    path.write_text("\n".join(lines))
    return path


def _groups_csv(detail: RevisionDetail, path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["grouping"] + _COLUMNS)
        for name, groups in (("stage", detail.groups), ("type", detail.types)):
            w.writerows([name] + _row(g) for g in groups)
    return path


def _tensors_csv(detail: RevisionDetail, path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "kind", "encoding", "dtype", "shape", "rank", "full rank", "kept params", "stored bytes", "error"])
        for t in detail.tensors:
            w.writerow([t.key, t.kind, t.encoding or "", t.dtype, "x".join(map(str, t.shape)), t.rank or "", t.full_rank or "", t.kept_params, t.stored_bytes, f"{t.rel_error:.6g}"])
    return path


def _plot(plt, detail: RevisionDetail, groups, name: str, path: Path) -> Path:
    labels = [g.group for g in groups]
    x = range(len(groups))
    fig, axes = plt.subplots(3, 1, figsize=(max(6, 0.6 * len(groups) + 2), 9), sharex=True)
    axes[0].bar(x, [g.full_rank for g in groups], color="#d0d7de", label="full rank")
    axes[0].bar(x, [g.rank for g in groups], color="#1f6feb", label="kept rank")
    axes[0].set_ylabel("rank (sum over layers)")
    axes[0].legend(loc="upper right")
    axes[1].bar(x, [g.stored_bytes / 1e6 for g in groups], color="#2da44e")
    axes[1].set_ylabel("stored MB")
    axes[2].bar(x, [g.max_error for g in groups], color="#cf222e", alpha=0.35, label="max")
    axes[2].bar(x, [g.mean_error for g in groups], color="#cf222e", label="mean")
    axes[2].set_ylabel("relative error of delta")
    axes[2].legend(loc="upper right")
    axes[2].set_xticks(list(x), labels, rotation=45, ha="right")
    fig.suptitle(f"{detail.revision.ref}: {detail.revision.rank_rule}, {detail.revision.encoding}, by {name[:-1]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_tensors(plt, detail: RevisionDetail, path: Path) -> Path:
    lowrank = [t for t in detail.tensors if t.kind == "lowrank" and t.full_rank]
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.scatter([t.rank / t.full_rank for t in lowrank], [t.rel_error for t in lowrank], s=12, color="#1f6feb", label="low-rank tensors")
    ax.set_xlabel("kept rank / full rank")
    ax.set_ylabel("relative error of delta")
    ax.set_title(f"{detail.revision.ref}: every low-rank tensor")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
