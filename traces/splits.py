"""Where the real traces live, and the dev/eval split of ``shared/data/README.md``.

| dev                                                             | eval           |
|-----------------------------------------------------------------|----------------|
| ``mahimahi/ATT-*``, ``mahimahi/TMobile-LTE-*``, ``pensieve/norway_*`` | everything else |

Tune on dev; eval is for measuring only. A 5Gophers file with several carrier columns gives one
trace per column.
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass

from ctxstream.paths import DATA_DIR_ENV, DEFAULT_DATA_DIR
from pathlib import Path
from typing import Any

from .readers import load_trace, throughput_columns
from .trace import Trace

__all__ = [
    "DEFAULT_DATA_DIR",
    "DATA_DIR_ENV",
    "DEV_PATTERNS",
    "TraceSpec",
    "resolve_traces_dir",
    "all_trace_specs",
    "dev_trace_specs",
    "eval_trace_specs",
    "dev_traces",
    "eval_traces",
    "is_dev",
]

DEV_PATTERNS = ("mahimahi/ATT-*", "mahimahi/TMobile-LTE-*", "pensieve/norway_*")

_FOLDERS = {"mahimahi": "*.down", "pensieve": "*", "puffer": "*", "nyu_mets": "*.csv", "5gophers": "*.csv"}
_NOT_TRACES = {"README", "README.md", "SOURCE.txt", "LICENSE", "STATS.txt"}


def resolve_traces_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The ``traces`` folder: ``data_dir`` (the data root or its ``traces/``), else
    :data:`DEFAULT_DATA_DIR`. Raises ``FileNotFoundError``."""
    base = Path(data_dir if data_dir is not None else DEFAULT_DATA_DIR)
    for cand in (base / "traces", base):
        if cand.is_dir() and any((cand / f).is_dir() for f in _FOLDERS):
            return cand
    raise FileNotFoundError(f"no trace folders ({', '.join(_FOLDERS)}) under {base}")


@dataclass(frozen=True)
class TraceSpec:
    """One trace in the data folder: a file (and, for 5Gophers, a column)."""

    path: Path
    rel: str  # e.g. "mahimahi/ATT-LTE-driving.down"
    column: str | None = None

    @property
    def name(self) -> str:
        return f"{self.rel}[{self.column}]" if self.column else self.rel

    @property
    def split(self) -> str:
        return "dev" if is_dev(self.rel) else "eval"

    def load(self, **kw: Any) -> Trace:
        return load_trace(self.path, column=self.column, name=self.name, **kw)


def is_dev(rel: str) -> bool:
    """Whether a path relative to the traces folder is in the dev split."""
    return any(fnmatch.fnmatchcase(rel, p) for p in DEV_PATTERNS)


def all_trace_specs(data_dir: str | os.PathLike[str] | None = None) -> list[TraceSpec]:
    root = resolve_traces_dir(data_dir)
    specs: list[TraceSpec] = []
    for folder, pattern in _FOLDERS.items():
        d = root / folder
        if not d.is_dir():
            continue
        for p in sorted(d.glob(pattern)):
            if not p.is_file() or p.name in _NOT_TRACES or p.name.startswith("."):
                continue
            rel = f"{folder}/{p.name}"
            if folder == "5gophers":
                specs.extend(TraceSpec(p, rel, c) for c in throughput_columns(p))
            else:
                specs.append(TraceSpec(p, rel))
    return specs


def dev_trace_specs(data_dir: str | os.PathLike[str] | None = None) -> list[TraceSpec]:
    return [s for s in all_trace_specs(data_dir) if is_dev(s.rel)]


def eval_trace_specs(data_dir: str | os.PathLike[str] | None = None) -> list[TraceSpec]:
    return [s for s in all_trace_specs(data_dir) if not is_dev(s.rel)]


def dev_traces(data_dir: str | os.PathLike[str] | None = None, **load_kw: Any) -> list[Trace]:
    """Load every dev-split trace (``load_kw`` goes to :func:`load_trace`, e.g. ``bin_ms=10``)."""
    return [s.load(**load_kw) for s in dev_trace_specs(data_dir)]


def eval_traces(data_dir: str | os.PathLike[str] | None = None, **load_kw: Any) -> list[Trace]:
    """Load every eval-split trace."""
    return [s.load(**load_kw) for s in eval_trace_specs(data_dir)]
