"""Settings precedence (flags over ``CTXSTREAM_*`` environment over defaults) and the optional
``/metrics`` token, against a real streamer."""

from __future__ import annotations

import argparse

import httpx
import pytest
from pydantic import ValidationError

from ctxstream.streamer.settings import Settings


def test_environment_configures_every_field_and_flags_win(monkeypatch, tmp_path):
    monkeypatch.setenv("CTXSTREAM_PORT", "9123")
    monkeypatch.setenv("CTXSTREAM_STORE", "memory+disk")
    monkeypatch.setenv("CTXSTREAM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CTXSTREAM_TOKENS", '{"tok-env-00001": "envco"}')
    monkeypatch.setenv("CTXSTREAM_READ_AUTH", "false")
    s = Settings()
    assert (s.port, s.store, s.data_dir, s.tokens, s.read_auth) == (9123, "memory+disk", tmp_path,
                                                                    {"tok-env-00001": "envco"}, False)
    # a flag overrides its variable; an absent flag (None) leaves the environment's value
    args = argparse.Namespace(port=9999, store=None, token=["acme:tok-flag-0001"])
    s = Settings.from_args(args)
    assert (s.port, s.store, s.tokens) == (9999, "memory+disk", {"tok-flag-0001": "acme"})


def test_bad_environment_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CTXSTREAM_PORT", "not-a-port")
    with pytest.raises(ValidationError, match="port"):
        Settings()
    monkeypatch.delenv("CTXSTREAM_PORT")
    monkeypatch.setenv("CTXSTREAM_STORE", "tape")
    with pytest.raises(ValidationError, match="unknown store tier"):
        Settings()


def test_defaults_without_environment(monkeypatch):
    for name in list(__import__("os").environ):
        if name.startswith("CTXSTREAM_"):
            monkeypatch.delenv(name)
    s = Settings()
    assert (s.port, s.store, s.metrics_token) == (8000, "disk", None)


def test_metrics_token_guards_metrics_only(make_streamer):
    srv = make_streamer(metrics_token="metrics-secret-1")
    assert httpx.get(srv.url + "/metrics").status_code == 401
    assert httpx.get(srv.url + "/metrics", headers={"Authorization": "Bearer wrong-token"}).status_code == 401
    r = httpx.get(srv.url + "/metrics", headers={"Authorization": "Bearer metrics-secret-1"})
    assert r.status_code == 200 and "ctxstream_requests_total" in r.text
    assert httpx.get(srv.url + "/healthz").status_code == 200
