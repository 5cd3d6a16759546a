"""The streamer in a process of its own, for the benches whose model exists only inside the bench.

A user runs the streamer (``ctxstream serve``) and the loader (``ctxstream ask``, ``ContextLoader``)
as different processes, usually on different hosts. A streamer in a thread of the loader's process
shares its GIL: on loopback that alone held the loader's fetcher to about half the rate it reaches
from a streamer process (2-core VM, 128 MiB chunks: 710 against 1430 MB/s), so a bench that serves
from a thread measures the bench, not the loader.

The benches' models are random and built in the bench, so ``ctxstream serve`` cannot load them.
:func:`start_process` runs ``python -m bench.streamer_process`` instead (through the streamer's own
``spawn_server``): the child serves with ``run_server`` and the bench's codec profile
and an :class:`UploadOnlyAdapter`, which carries the model's shape and fingerprint but no weights.
Such a streamer stores and serves KV uploads (what the benches send); text ingest fails with a
``ModelError`` (HTTP 500). Settings, model info and profile go to the child as JSON and the profile's own
``.ctxp`` bytes in a temporary folder the child reads at start; it announces its port as
``ctxstream serve``'s process mode does and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

from ctxstream.model import ModelAdapter, ModelError, ModelInfo
from ctxstream.streamer.settings import Settings

_REPO_ROOT = Path(__file__).resolve().parent.parent


class UploadOnlyAdapter(ModelAdapter):
    """A model's :class:`ModelInfo` without its weights or tokenizer: KV is uploaded, never computed."""

    def __init__(self, info: ModelInfo):  # noqa: D107 - no model to wrap
        self.model, self.tokenizer, self.name, self.info = None, None, info.name, info

    def _no_weights(self, *args, **kwargs):
        raise ModelError(f"this streamer holds only the shape of {self.info.name}: upload KV, not text")

    tokenize = compute_kv = compute_kv_with_importance = extend = _no_weights


def info_to_json(info: ModelInfo) -> str:
    return json.dumps(dataclasses.asdict(info))


def info_from_json(text: str) -> ModelInfo:
    d = json.loads(text)
    return ModelInfo(**{**d, "inv_freq": tuple(float(v) for v in d["inv_freq"])})


def start_process(settings: Settings, *, adapter: ModelAdapter, codec, startup_timeout: float = 300.0):
    """``python -m bench.streamer_process`` serving ``settings`` with ``codec`` for ``adapter``'s model;
    a :class:`~ctxstream.streamer.server.ServerHandle` once it listens (``.stop()`` ends it)."""
    from ctxstream.streamer.server import spawn_server

    settings = settings.model_copy(update={"port": 0})
    env = dict(os.environ)
    # ctxstream resolves as it does here (an installed copy first, where there is one); the
    # checkout, last, gives ``bench``
    env["PYTHONPATH"] = os.pathsep.join([p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
                                        + [str(_REPO_ROOT)])
    with tempfile.TemporaryDirectory(prefix="ctxstream-bench-streamer-") as tmp:  # read by the child at start
        folder = Path(tmp)
        (folder / "settings.json").write_text(settings.model_dump_json())
        (folder / "info.json").write_text(info_to_json(adapter.info))
        if codec.profile is not None:
            (folder / "profile.ctxp").write_bytes(codec.profile.to_bytes())
        return spawn_server([sys.executable, "-m", "bench.streamer_process", str(folder)], settings, env=env,
                            timeout=startup_timeout)


MODES = ("process", "thread")


def serve(settings: Settings, *, adapter: ModelAdapter, codec, mode: str = "process"):
    """The benches' streamer: :func:`start_process` (``mode="process"``, as users run it) or
    ``serve_in_background`` in a thread of this process (``"thread"``, sharing the loader's GIL).
    Either has ``.url`` and ``.stop()``."""
    if mode == "process":
        return start_process(settings, adapter=adapter, codec=codec)
    if mode == "thread":
        from ctxstream.streamer.server import serve_in_background

        return serve_in_background(settings, adapter=adapter, codec=codec)
    raise ValueError(f"streamer mode must be one of {MODES}, not {mode!r}")


def main(argv: list[str] | None = None) -> int:
    from ctxstream.codec import Codec
    from ctxstream.codec.profile import Profile
    from ctxstream.streamer.server import run_server

    ap = argparse.ArgumentParser(description="serve a bench's uploads (see bench/streamer_process.py)")
    ap.add_argument("folder", type=Path, help="settings.json, info.json and profile.ctxp (optional)")
    args = ap.parse_args(argv)
    settings = Settings(**json.loads((args.folder / "settings.json").read_text()))
    info = info_from_json((args.folder / "info.json").read_text())
    prof = args.folder / "profile.ctxp"
    codec = Codec(info, Profile.from_bytes(prof.read_bytes()) if prof.is_file() else None)
    run_server(settings, announce=True, adapter=UploadOnlyAdapter(info), codec=codec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
