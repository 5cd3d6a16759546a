"""Where ctxstream finds things outside the package (one place for every module).

The data directory (real traces and corpora, read in place) is, in order: an explicit ``data_dir``
argument (CLI ``--data-dir``), the ``CTXSTREAM_DATA_DIR`` environment variable, then the first
``shared/data`` found beside a source checkout (``<checkout>/../shared/data``) or under the current
directory or its parent. :data:`DEFAULT_DATA_DIR` is that default, resolved once at import.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "CTXSTREAM_DATA_DIR"


def default_data_dir(environ: dict[str, str] | None = None, cwd: Path | None = None) -> Path:
    """The data directory when none is given (see the module docstring)."""
    environ = os.environ if environ is None else environ
    if environ.get(DATA_DIR_ENV):
        return Path(environ[DATA_DIR_ENV]).expanduser()
    cwd = Path.cwd() if cwd is None else cwd
    checkout = Path(__file__).resolve().parents[1]  # the folder holding ctxstream/ in a source checkout
    candidates = [checkout.parent / "shared" / "data", cwd / "shared" / "data", cwd.parent / "shared" / "data"]
    for cand in candidates:
        if cand.is_dir():
            return cand
    return candidates[0]


DEFAULT_DATA_DIR = default_data_dir()
