"""Formatting for the terminal: sizes, tables, JSON and progress bars."""

from __future__ import annotations

import dataclasses
import json
import sys
from datetime import datetime
from pathlib import Path

import click
from tqdm import tqdm


def size(n: int | float) -> str:
    """Decimal units with three significant digits: 3.44 GB, 391 MB, 75.4 kB."""
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 999.5 or unit == "TB":
            break
        n /= 1000
    if unit == "B":
        return f"{int(n)} B"
    digits = 0 if abs(n) >= 99.95 else 1 if abs(n) >= 9.995 else 2
    return f"{n:.{digits}f} {unit}"


def ratio(x: float) -> str:
    return "inf" if x == float("inf") else f"{x:.1f}x"


def when(t: datetime) -> str:
    return t.astimezone().strftime("%Y-%m-%d %H:%M")


def table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    right = right or set()
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers)] + [line(r) for r in rows])


def _plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and value == float("inf"):
        return None
    return value


def echo_json(value) -> None:
    click.echo(json.dumps(_plain(value), indent=2))


class Bars:
    """A progress callback that draws one tqdm bar per stage on stderr, when stderr is a terminal."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.bars: dict[str, tqdm] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit="tensor", leave=False, file=sys.stderr)
        # update() redraws at most every mininterval; a refresh per tensor flooded the terminal.
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()

    def __enter__(self) -> "Bars":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def force_option(command):
    """``--force``: replace an existing output file, which the command otherwise refuses."""
    return click.option("--force", "-f", is_flag=True, help="Replace the output if it exists.")(command)


def json_option(command):
    """The ``--json`` flag every listing and writing command shares; the command gets ``as_json``."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(command)
