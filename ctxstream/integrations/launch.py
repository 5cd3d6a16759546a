"""Starting the processes an integration runs beside ctxstream (a streamer, a vLLM server): wait until
one answers on HTTP, or say why it never did."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float, log: Path | None = None) -> None:
    """Return once ``GET url`` answers 200; raise RuntimeError (with the tail of ``log``) when ``proc``
    exits first or ``timeout_s`` passes."""
    def tail() -> str:
        return f"; log tail:\n{log.read_text(errors='replace')[-3000:]}" if log is not None and log.exists() else ""

    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited {proc.returncode}{tail()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:  # not listening yet
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not up after {timeout_s} s{tail()}")
