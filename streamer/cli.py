"""``ctxstream serve`` (run the streamer) and ``ctxstream upload`` (send a context to one)."""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import sys
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the context streamer (HTTP API, OpenAPI at /docs)",
                       description="Run the streamer. Each flag overrides its CTXSTREAM_* environment variable "
                                   "(--redis-url over CTXSTREAM_REDIS_URL; CTXSTREAM_TOKENS takes JSON {token: tenant}).")
    p.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="listen port (default 8000; 0 = any free port)")
    p.add_argument("--store", default=None,
                   help="tiers fastest first joined by '+': memory, disk, redis, redis-cluster (default disk), e.g. memory+disk")
    p.add_argument("--data-dir", dest="data_dir", type=Path, default=None,
                   help="disk store folder (default ./ctxstream-data)")
    p.add_argument("--redis-url", dest="redis_url", default=None, help="default redis://127.0.0.1:6379/0")
    p.add_argument("--redis-prefix", dest="redis_prefix", default=None, help="key prefix in Redis (default ctxstream:)")
    p.add_argument("--redis-cluster-nodes", dest="redis_cluster_nodes", default=None, metavar="HOST:PORT,...",
                   help="Redis Cluster startup nodes for the redis-cluster tier")
    p.add_argument("--redis-cluster-wait-replicas", dest="redis_cluster_wait_replicas", type=int, default=None,
                   help="replicas that must have a write before it is acknowledged (default 1; 0: master only)")
    p.add_argument("--redis-cluster-retry-s", dest="redis_cluster_retry_s", type=float, default=None,
                   help="seconds an operation retries through a failover before answering 503 (default 5)")
    p.add_argument("--memory-bytes", dest="memory_bytes", type=int, default=None, help="memory tier size (bytes)")
    p.add_argument("--session-tiers", dest="session_tiers", default=None, metavar="NAME:BYTES+...",
                   help="session tier hierarchy, fastest first (memory:256M+disk:4G; gpu|memory|disk|redis)")
    p.add_argument("--session-placement", dest="session_placement", default=None,
                   help="session placement policy: scheduler-size (default), scheduler, lru, fifo, lru-global, fifo-global")
    p.add_argument("--model", default=None,
                   help="model name or path (default: the default model); tiny-random for tests")
    p.add_argument("--cache-dir", dest="cache_dir", type=Path, default=None,
                   help="model/profile cache (default ~/.cache/ctxstream)")
    p.add_argument("--chunk-tokens", dest="chunk_tokens", type=int, default=None, help="tokens per chunk (256)")
    p.add_argument("--encode-workers", dest="encode_workers", type=int, default=None, help="encoder threads (1)")
    p.add_argument("--token", action="append", metavar="TENANT:TOKEN",
                   help="bearer token of a tenant (repeatable); without any, one is generated and printed")
    p.add_argument("--no-read-auth", dest="read_auth", action="store_false", default=None,
                   help="let reads (manifests, chunks, profiles) through without a token")
    p.add_argument("--max-upload-bytes", dest="max_upload_bytes", type=int, default=None)
    p.add_argument("--max-tokens", dest="max_tokens", type=int, default=None, help="tokens per context")
    p.add_argument("--max-concurrent-uploads", dest="max_concurrent_uploads", type=int, default=None)
    p.add_argument("--no-fsync", dest="fsync", action="store_false", default=None,
                   help="skip fsync on disk writes (faster, not crash-safe)")
    p.add_argument("--metrics-token", dest="metrics_token", default=None,
                   help="bearer token GET /metrics needs (default: /metrics is open)")
    p.add_argument("--log-level", dest="log_level", default=None, help="uvicorn/app log level (warning)")
    p.set_defaults(func=cmd_serve)

    u = sub.add_parser("upload", help="upload a context (text file, or a .kv file in the binary KV format)")
    u.add_argument("file", type=Path, help="a UTF-8 text file, or a KV file (starts with b'CXKV'); '-' = stdin text")
    u.add_argument("--server", required=True, help="streamer URL, e.g. http://127.0.0.1:8000")
    u.add_argument("--token", default=None, help="bearer token of your tenant")
    u.add_argument("--json", action="store_true", help="print the manifest JSON instead of the context id")
    u.add_argument("--timeout", type=float, default=600.0)
    u.set_defaults(func=cmd_upload)


def cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .server import run_server
    from .settings import Settings

    try:
        settings = Settings.from_args(args)
    except (ValidationError, ValueError) as exc:
        print(f"ctxstream serve: bad settings: {exc}", file=sys.stderr)
        return 2
    if not settings.tokens:
        token = secrets.token_urlsafe(24)
        settings = settings.model_copy(update={"tokens": {token: "default"}})
        print(f"no --token given: tenant 'default' may upload with  Authorization: Bearer {token}", file=sys.stderr)
    run_server(settings)
    return 0


def upload(server: str, body: bytes, content_type: str, token: str | None, timeout: float = 600.0) -> dict:
    """POST a context; returns the JSON answer (``id``, ``manifest``, ...). Raises RuntimeError with the reason."""
    req = urllib.request.Request(server.rstrip("/") + "/v1/contexts", data=body, method="POST",
                                 headers={"Content-Type": content_type})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail")
        except Exception:  # noqa: BLE001
            detail = exc.reason
        raise RuntimeError(f"upload failed: HTTP {exc.code}: {detail}") from None
    except urllib.error.URLError as exc:
        raise RuntimeError(f"cannot reach {server}: {exc.reason}") from None


def cmd_upload(args: argparse.Namespace) -> int:
    from .kvformat import CONTENT_TYPE, MAGIC

    data = sys.stdin.buffer.read() if str(args.file) == "-" else args.file.read_bytes()
    if data.startswith(MAGIC):
        body, ctype = data, CONTENT_TYPE
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            print(f"ctxstream upload: {args.file} is neither UTF-8 text nor a KV file", file=sys.stderr)
            return 2
        body, ctype = json.dumps({"text": text}).encode(), "application/json"
    try:
        answer = upload(args.server, body, ctype, args.token, args.timeout)
    except RuntimeError as exc:
        print(f"ctxstream upload: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer["manifest"]) if args.json else answer["id"])
    return 0
