"""FastAPI app factory: ``create_app(settings)``; the lifespan loads the model, codec and store.

Tests and embedders may pass a ready ``adapter``, ``codec`` and/or ``store``; what the lifespan
creates it also closes (the store, the encode thread pool).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from ctxstream.codec import Codec
from ctxstream.model import ModelAdapter

from .api.routes import ROUTERS
from .api.routes.sessions import open_sessions
from .ingest import ContextService
from .metrics import Metrics
from .settings import Settings
from .state import StreamerState
from .storage import Store, StoreError, StoreFullError, make_store
from .storage.observed import ObservedStore

log = logging.getLogger(__name__)


class RequestMetrics:
    """Pure ASGI middleware: requests by route template, method and status, and their latency."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}
        t0 = time.perf_counter()

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.inc("requests_total", route=path, method=method, status=str(status["code"]))
            self.metrics.observe("request_seconds", time.perf_counter() - t0, route=path, method=method)


MAX_HEADER_BYTES = 64 << 10  # request line + headers; larger requests answer 431


class HeaderLimit:
    """Pure ASGI guard: a request whose path + headers exceed ``MAX_HEADER_BYTES`` gets 431 with a reason
    before any route runs. (uvicorn's httptools parser itself has no header cap: this bounds what the
    app processes, a front proxy bounds what is buffered.)"""

    def __init__(self, app, limit: int = MAX_HEADER_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
            size += sum(len(k) + len(v) + 4 for k, v in scope.get("headers") or ())
            if size > self.limit:
                body = (f'{{"detail":"request headers of {size} bytes exceed the limit of {self.limit} bytes"}}').encode()
                await send({"type": "http.response.start", "status": 431,
                            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                        (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def build_store(settings: Settings) -> Store:
    return make_store(settings.store, data_dir=settings.data_dir, redis_url=settings.redis_url,
                      redis_prefix=settings.redis_prefix, memory_bytes=settings.memory_bytes, fsync=settings.fsync,
                      redis_cluster_nodes=settings.redis_cluster_nodes,
                      redis_cluster_wait_replicas=settings.redis_cluster_wait_replicas,
                      redis_cluster_retry_s=settings.redis_cluster_retry_s)


def create_app(settings: Settings | None = None, *, adapter: ModelAdapter | None = None, codec: Codec | None = None,
               store: Store | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        t0 = time.perf_counter()
        ad = adapter or ModelAdapter.load(settings.model, cache_dir=settings.cache_dir)
        cd = codec or Codec.for_model(ad, cache_dir=settings.cache_dir)
        if cd.info.fingerprint != ad.info.fingerprint:
            raise ValueError("codec and model adapter are for different models")
        backend = store if store is not None else build_store(settings)  # an empty MemoryStore is falsy
        st_store = ObservedStore(backend, lambda op, secs: metrics.observe("store_op_seconds", secs, op=op,
                                                                           store=backend.name))
        await st_store.ping()
        executor = ThreadPoolExecutor(settings.encode_workers, thread_name_prefix="ctxstream-encode")
        service = ContextService(ad, cd, st_store, chunk_tokens=settings.chunk_tokens, executor=executor,
                                 metrics=metrics, id_secret=settings.id_secret)
        await service.open()  # the id key; finishes deletes a crash interrupted
        app.state.sessions = await open_sessions(settings, ad, cd)  # /v1/sessions: the tier hierarchy, recovered
        app.state.streamer = StreamerState(settings=settings, adapter=ad, codec=cd, store=st_store, service=service,
                                           executor=executor, metrics=metrics, started=time.time())
        if not settings.tokens:
            log.warning("no bearer tokens configured: uploads are impossible (give --token TENANT:TOKEN)")
        log.info("streamer ready in %.2f s: model %s (%s), profile %s, store %s", time.perf_counter() - t0,
                 ad.info.name, ad.info.fingerprint, cd.profile.id if cd.profile else None, st_store.name)
        try:
            yield
        finally:
            await app.state.sessions.close()
            executor.shutdown(wait=True, cancel_futures=True)
            if store is None:
                await st_store.close()

    app = FastAPI(title="ctxstream streamer", version="0.1.0", lifespan=lifespan,
                  description="Uploads contexts, encodes their KV at every codec level, streams the chunks.")
    for router in ROUTERS:
        app.include_router(router)

    @app.exception_handler(StoreFullError)
    async def store_full(request, exc: StoreFullError):
        # a store that cannot hold an upload refuses it (nothing acknowledged is evicted): 507 with the reason
        log.warning("%s %s: store full: %s", request.method, request.url.path, exc)
        metrics.inc("store_errors_total")
        return JSONResponse({"detail": f"insufficient storage: {exc}"}, status_code=507)

    @app.exception_handler(StoreError)
    async def store_unavailable(request, exc: StoreError):
        # a tier down (Redis stopped), disk full, I/O error: a retryable 503 with the reason, never a 500
        log.warning("%s %s: store error: %s", request.method, request.url.path, exc)
        metrics.inc("store_errors_total")
        return JSONResponse({"detail": f"store unavailable: {exc}"}, status_code=503, headers={"Retry-After": "1"})

    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(HeaderLimit)
    app.state.settings = settings
    app.state.metrics = metrics
    return app
