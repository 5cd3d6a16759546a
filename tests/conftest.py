"""Shared fixtures: a real ``redis-server`` on a free loopback port, the tiny test model and codec,
and running streamers (real uvicorn on 127.0.0.1, see ``ctxstream.streamer.server.serve_in_background``).

* ``redis_server`` (session): URL of a private redis-server; skipped only if the binary is missing.
* ``redis_url``: that URL with the database flushed for this test.
* ``tiny_adapter`` / ``tiny_codec`` (session): ``ModelAdapter.tiny_random()`` and its codec.
* ``make_streamer(**settings)``: start a streamer (thread mode, tiny model unless ``adapter=``/``codec=``
  are given); stopped after the test. ``streamer``: one with the default test settings.
* ``TOKENS`` / ``auth(tenant)``: bearer tokens of the test tenants ``acme`` and ``umbrella``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ctxstream.streamer.storage.localcluster import free_ports

ROOT = Path(__file__).resolve().parent.parent

TOKENS = {"tok-acme-0001": "acme", "tok-umbrella-0002": "umbrella"}
TENANT_TOKEN = {tenant: token for token, tenant in TOKENS.items()}


def auth(tenant: str = "acme") -> dict[str, str]:
    return {"Authorization": f"Bearer {TENANT_TOKEN[tenant]}"}


def metric(text: str, sample: str, **labels: str) -> float | None:
    """The value of one sample (``ctxstream_requests_total``, ``..._count``) with exactly these labels in a
    Prometheus text exposition, or None when it is absent."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and s.labels == labels:
                return s.value
    return None


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range, so no client socket takes it before the
    server that is handed it binds it (or rebinds it after a restart)."""
    return free_ports(1)[0]


def pytest_report_header(config):
    binary = shutil.which("redis-server")
    return [f"redis-server: {binary} (the Redis tests start it on free loopback ports)" if binary else
            "redis-server: NOT FOUND -- every Redis test will be SKIPPED (apt-get install -y redis-server)"]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server binary not found (apt-get install -y redis-server)")
    import redis

    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(folder), "--protected-mode", "yes", "--loglevel", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"redis-server did not start: {proc.stderr.read().decode(errors='replace')}")
            time.sleep(0.05)
    client.close()
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def redis_url(redis_server):
    import redis

    client = redis.Redis.from_url(redis_server)
    client.flushall()
    client.close()
    return redis_server


@pytest.fixture(scope="session")
def tiny_adapter():
    from ctxstream.model import ModelAdapter

    return ModelAdapter.tiny_random()


@pytest.fixture(scope="session")
def tiny_codec(tiny_adapter, tmp_path_factory):
    from ctxstream.codec import Codec

    return Codec.for_model(tiny_adapter, cache_dir=tmp_path_factory.mktemp("codec-cache"))


@pytest.fixture(scope="session")
def small_adapter():
    """A 3-layer tiny random Llama (2 KV heads, head dim 16): the codec and quality tests' model."""
    from ctxstream.model import ModelAdapter

    return ModelAdapter.tiny_random(seed=1, layers=3, kv_heads=2, head_dim=16)


@pytest.fixture(scope="session")
def small_codec(small_adapter, tmp_path_factory):
    from ctxstream.codec import Codec

    return Codec.for_model(small_adapter, cache_dir=tmp_path_factory.mktemp("small-codec-cache"))


@pytest.fixture
def make_streamer(tiny_adapter, tiny_codec, tmp_path):
    """``make_streamer(adapter=None, codec=None, store_obj=None, **settings) -> ServerHandle``.

    ``store_obj`` is a ready :class:`ctxstream.streamer.storage.Store` (``store=`` is the settings' tier spec)."""
    from ctxstream.streamer.server import serve_in_background
    from ctxstream.streamer.settings import Settings

    handles = []

    def start(*, adapter=None, codec=None, store_obj=None, **overrides):
        fields = {"model": "tiny-random", "store": "memory", "data_dir": tmp_path / "data", "tokens": TOKENS,
                  "chunk_tokens": 64, "fsync": False, "log_level": "warning"}
        fields.update(overrides)
        handle = serve_in_background(Settings(**fields), adapter=adapter or tiny_adapter,
                                     codec=codec or tiny_codec, store=store_obj)
        handles.append(handle)
        return handle

    yield start
    for h in handles:
        h.stop()


@pytest.fixture
def streamer(make_streamer):
    return make_streamer()

