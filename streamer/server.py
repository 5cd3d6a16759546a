"""Run the streamer: in the foreground (``run_server``) or in the background (``serve_in_background``).

``serve_in_background(settings)`` starts uvicorn on ``settings.host`` (default 127.0.0.1) with a free
port (``settings.port == 0``, or whatever port is given), waits until the app is ready (model
loaded, store reachable) and returns a :class:`ServerHandle` with ``.url`` and ``.stop()``::

    with serve_in_background(Settings(model="tiny-random", store="memory", port=0,
                                      tokens={"secret-token": "acme"})) as srv:
        requests.get(srv.url + "/healthz")

``mode="thread"`` (default) runs the server in a daemon thread of this process and accepts a
ready ``adapter`` / ``codec`` / ``store`` (fast tests); ``mode="process"`` runs ``python -m
streamer.server`` in a subprocess (benchmarks, isolation), taking the settings as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from .settings import Settings

_READY = "CTXSTREAM_LISTENING"
_REPO_ROOT = Path(__file__).resolve().parent.parent


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _server(settings: Settings, app) -> uvicorn.Server:
    config = uvicorn.Config(app, log_level=settings.log_level, access_log=False, lifespan="on",
                            timeout_keep_alive=30, backlog=2048)
    return uvicorn.Server(config)


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass
class ServerHandle:
    url: str
    host: str
    port: int
    settings: Settings
    mode: str
    _server: Any = None
    _thread: threading.Thread | None = None
    _proc: subprocess.Popen | None = None
    _stopped: bool = field(default=False)

    @property
    def app(self):
        return self._server.config.app if self._server is not None else None

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc is not None else os.getpid()

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 15.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._server is not None:
            self._server.should_exit = True
            if self._thread is not None:
                self._thread.join(timeout)
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_in_background(settings: Settings, *, adapter=None, codec=None, store=None, mode: str = "thread",
                        port: int = 0, startup_timeout: float = 300.0) -> ServerHandle:
    """Start the streamer in the background and return once it is ready; see the module docstring.

    Binds ``settings.host`` and ``port`` (default 0: a free port; ``settings.port`` is ignored, the
    handle's ``settings.port`` is the real one).
    """
    settings = settings.model_copy(update={"port": int(port)})
    if mode == "thread":
        return _serve_thread(settings, adapter, codec, store, startup_timeout)
    if mode == "process":
        if adapter is not None or codec is not None or store is not None:
            raise ValueError("mode='process' builds its own model, codec and store from the settings")
        return _serve_process(settings, startup_timeout)
    raise ValueError(f"mode must be 'thread' or 'process', not {mode!r}")


def _serve_thread(settings, adapter, codec, store, timeout) -> ServerHandle:
    from .app import create_app

    sock = _bind(settings.host, settings.port)
    port = sock.getsockname()[1]
    server = _server(settings, create_app(settings, adapter=adapter, codec=codec, store=store))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            errors.append(exc)
        finally:
            sock.close()

    thread = threading.Thread(target=run, name=f"ctxstream-streamer-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(5)
            why = f": {errors[0]!r}" if errors else " (see the log for the lifespan error)"
            raise RuntimeError(f"streamer did not start{why}")
        time.sleep(0.02)
    settings = settings.model_copy(update={"port": port})
    return ServerHandle(_url(settings.host, port), settings.host, port, settings, "thread", server, thread)


def _serve_process(settings: Settings, timeout: float) -> ServerHandle:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(_REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    cmd = [sys.executable, "-m", "ctxstream.streamer.server", "--settings-json", settings.model_dump_json()]
    return spawn_server(cmd, settings, env=env, timeout=timeout)


def spawn_server(cmd: list[str], settings: Settings, *, env: dict[str, str] | None = None,
                 timeout: float = 300.0) -> ServerHandle:
    """Run ``cmd``, a process that serves through :func:`run_server` with ``announce=True`` (``settings``
    are the ones it serves), and return its handle once it listens; ``stop()`` sends it SIGTERM."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, env=env, text=True, bufsize=1)
    deadline = time.monotonic() + timeout
    port = None
    while port is None:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            if proc.poll() is None:
                proc.kill()
            raise RuntimeError(f"streamer process did not start (exit code {proc.poll()})")
        ready, _, _ = select.select([proc.stdout], [], [], min(left, 0.5))
        if ready:
            line = proc.stdout.readline()
            if line.startswith(_READY):
                port = int(line.split()[1])
    threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
    settings = settings.model_copy(update={"port": port})
    return ServerHandle(_url(settings.host, port), settings.host, port, settings, "process", _proc=proc)


def _drain(stream) -> None:
    for _ in iter(stream.readline, ""):
        pass


def run_server(settings: Settings, *, announce: bool = False, adapter=None, codec=None) -> None:
    """Serve in the foreground until SIGINT/SIGTERM. ``announce`` prints ``CTXSTREAM_LISTENING <port>``
    on stdout once the app is ready (how ``mode="process"`` and :func:`spawn_server` learn the port).
    ``adapter`` / ``codec``: ready ones, as ``create_app`` takes them (default: built from the settings)."""
    from .app import create_app

    sock = _bind(settings.host, settings.port)
    port = sock.getsockname()[1]
    model = adapter.info.name if adapter is not None else settings.model
    print(f"ctxstream streamer: store {settings.store}, model {model}, listening on "
          f"{_url(settings.host, port)} (API docs at /docs)", file=sys.stderr, flush=True)
    server = _server(settings, create_app(settings, adapter=adapter, codec=codec))
    if announce:
        def announce_when_ready() -> None:
            while not server.started and not server.should_exit:
                time.sleep(0.02)
            if server.started:
                print(f"{_READY} {port}", flush=True)

        threading.Thread(target=announce_when_ready, daemon=True).start()
    server.run(sockets=[sock])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run the streamer from JSON settings (used by mode='process')")
    parser.add_argument("--settings-json", required=True)
    args = parser.parse_args(argv)
    settings = Settings(**json.loads(args.settings_json))
    import logging

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run_server(settings, announce=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
