"""Where ctxstream finds things outside the repository (one place for every package)."""

from __future__ import annotations

from pathlib import Path

#: ``../shared/data`` next to the repository root: the real traces and corpora, read in place.
#: Every reader takes an explicit ``data_dir`` (CLI ``--data-dir``) that overrides this.
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
