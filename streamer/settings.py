"""The streamer's settings: one typed object. Precedence: flags (or keyword arguments) over
``CTXSTREAM_*`` environment variables over the defaults below.

Every field has an environment variable: its name upper-cased behind ``CTXSTREAM_`` (``port`` ->
``CTXSTREAM_PORT``, ``redis_url`` -> ``CTXSTREAM_REDIS_URL``). Dict and list fields take JSON
(``CTXSTREAM_TOKENS='{"tok-acme-0001": "acme"}'``: bearer token -> tenant). No dotenv or secrets
files are read: what a server runs with is what its flags and environment say.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from ctxstream.model import DEFAULT_MODEL

from .storage import parse_cluster_nodes, parse_store_spec


ENV_PREFIX = "CTXSTREAM_"


class _EnvUnlessGiven(PydanticBaseSettingsSource):
    """The environment's values for the fields not given as arguments: a flag replaces its variable
    whole (pydantic-settings would otherwise merge dict fields such as ``tokens`` key by key)."""

    def __init__(self, settings_cls, env: PydanticBaseSettingsSource, init: InitSettingsSource):
        super().__init__(settings_cls)
        self._env, self._given = env, set(init.init_kwargs)

    def get_field_value(self, field, field_name):  # required by the base class; __call__ does the work
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._env().items() if k not in self._given}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="forbid", frozen=True, protected_namespaces=(), env_prefix=ENV_PREFIX)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # storage: tiers fastest first, joined by "+": memory | disk | redis | memory+disk | memory+redis ...
    store: str = "disk"
    data_dir: Path = Path("./ctxstream-data")
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "ctxstream:"
    # tier "redis-cluster": startup nodes "HOST:PORT,HOST:PORT" (any live ones; the rest is discovered) and
    # how many replicas must have a write before it is acknowledged (0: the master alone)
    redis_cluster_nodes: str = ""
    redis_cluster_wait_replicas: int = Field(1, ge=0, le=16)
    # how long one operation retries through a failover before the API answers 503 (set it above the
    # cluster's failover time, about cluster-node-timeout + 1-2 s, to hide failovers from loaders)
    redis_cluster_retry_s: float = Field(5.0, ge=0, le=600)
    memory_bytes: int = Field(512 << 20, gt=0)
    fsync: bool = True
    # multi-turn sessions (/v1/sessions): the tier hierarchy, fastest first, NAME:BYTES joined by "+"
    # (gpu | memory | disk | redis; disk under data_dir/sessions, Redis under redis_prefix + "sessions:"),
    # and the placement policy that evicts / prefetches (scheduler-size | scheduler | lru | fifo | lru-global | fifo-global)
    session_tiers: str = "memory:256M+disk:4G"
    session_placement: str = "scheduler-size"
    # model and codec
    model: str = DEFAULT_MODEL  # a model name/path, "tiny-random" or "tiny-random-LxHxD" (tests, benches)
    cache_dir: Path | None = None  # converted models and codec profiles (default ~/.cache/ctxstream)
    chunk_tokens: int = Field(256, ge=1, le=65536)
    encode_workers: int = Field(1, ge=1, le=64)
    # auth: bearer token -> tenant. Writes always need a token; reads only when read_auth.
    tokens: dict[str, str] = Field(default_factory=dict)
    read_auth: bool = True
    metrics_token: str | None = None  # when set, GET /metrics needs "Authorization: Bearer <metrics_token>"
    # limits
    max_upload_bytes: int = Field(256 << 20, gt=0)
    max_tokens: int = Field(16384, gt=0)
    max_concurrent_uploads: int = Field(2, ge=1)  # uploads encoding at once (a slot is taken after the body is read)
    max_uploads_per_tenant: int = Field(2, ge=1)  # one tenant's uploads in flight (receiving, encoding)
    body_timeout_s: float = Field(30.0, gt=0)  # the whole request body must arrive within this (else 408)
    max_json_bytes: int = Field(4 << 20, gt=0)  # a JSON upload body ({"text"} / {"token_ids"}) is refused above this
    # ids are keyed with this secret; None: a durable store keeps a generated one (meta.id-secret)
    id_secret: str | None = Field(None, min_length=16, repr=False)
    stream_piece_bytes: int = Field(256 << 10, ge=4096)  # response body piece size (256 KiB: fastest here)
    # served objects up to this size are checked against their checksum before the response starts
    # (a 404 when damaged); larger ones as their pieces are sent (see api/responses.py)
    verify_upfront_bytes: int = Field(4 << 20, ge=0)
    log_level: str = "warning"

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return (init_settings, _EnvUnlessGiven(settings_cls, env_settings, init_settings))

    @field_validator("store")
    @classmethod
    def _check_store(cls, v: str) -> str:
        return "+".join(parse_store_spec(v))

    @field_validator("session_tiers")
    @classmethod
    def _check_session_tiers(cls, v: str) -> str:
        from .hierarchy import HierarchyError, parse_tier_spec

        try:
            parse_tier_spec(v)
        except HierarchyError as exc:  # a StoreError: surfaced as the setting's validation error
            raise ValueError(str(exc)) from None
        return v

    @field_validator("session_placement")
    @classmethod
    def _check_session_placement(cls, v: str) -> str:
        from ctxstream.policies.placement import placement_names

        if v not in placement_names():
            raise ValueError(f"unknown placement {v!r}; choose from {', '.join(placement_names())}")
        return v

    @field_validator("metrics_token", mode="before")
    @classmethod
    def _empty_is_none(cls, v):
        return None if v == "" else v  # CTXSTREAM_METRICS_TOKEN= (empty) leaves /metrics open

    @field_validator("tokens")
    @classmethod
    def _check_tokens(cls, v: dict[str, str]) -> dict[str, str]:
        for token, tenant in v.items():
            if len(token) < 8:
                raise ValueError("bearer tokens must be at least 8 characters")
            if not tenant or any(c in tenant for c in "/\n\r\t "):
                raise ValueError(f"bad tenant name {tenant!r}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        tiers = self.store.split("+")
        if "redis" in tiers and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must be a redis://, rediss:// or unix:// URL")
        if "redis-cluster" in tiers:
            parse_cluster_nodes(self.redis_cluster_nodes)  # ValueError says what is wrong
            if "{" in self.redis_prefix or "}" in self.redis_prefix:
                raise ValueError("redis_prefix must not contain braces with the redis-cluster tier (a hash tag)")
        return self

    @property
    def tenants(self) -> set[str]:
        return set(self.tokens.values())

    @classmethod
    def from_args(cls, args: Any, **overrides: Any) -> "Settings":
        """Settings from an ``argparse`` namespace of ``ctxstream serve`` (``None`` = default)."""
        fields = {}
        for name in cls.model_fields:
            value = getattr(args, name, None)
            if value is not None:
                fields[name] = value
        tokens = getattr(args, "token", None)
        if tokens:
            fields["tokens"] = parse_token_args(tokens)
        fields.update(overrides)
        return cls(**fields)


def parse_token_args(values: list[str]) -> dict[str, str]:
    """``["TENANT:TOKEN", ...]`` -> ``{token: tenant}``."""
    out: dict[str, str] = {}
    for item in values:
        tenant, sep, token = item.partition(":")
        if not sep or not tenant or not token:
            raise ValueError(f"--token wants TENANT:TOKEN, got {item!r}")
        if token in out and out[token] != tenant:
            raise ValueError("the same token is given to two tenants")
        out[token] = tenant
    return out
