"""Client side of ctxstream: load a context's KV from a streamer into a transformers cache.

    from ctxstream.loader import ContextLoader
    async with ContextLoader(url, model=adapter, policy="slo", slo_s=2.0) as cl:
        result = await cl.load(context_id, prompt_ids=question_ids)   # result.cache, result.report

Loader metrics: ``ContextLoader(..., metrics=LoaderMetrics())`` records every finished load in the
object's Prometheus registry (``metrics.registry``, ``metrics.render()``).
"""

from __future__ import annotations

import asyncio
from typing import Sequence

from .chat import ChatError, ChatReply, ChatSession
from .calibration import Calibration, DecodeModel, RecomputeModel, calibrate_decode, calibrate_recompute
from .context import DEFAULT_PRIOR_BPS, LoaderContext, shared_context
from .core import DEFAULT_SLO_S, ContextLoader, LoaderError, LoadResult
from .fetcher import Fetched, FetchFailed, FetchOptions
from .metrics import LoaderMetrics
from .planner import Decision, PlanOptions, Planner
from .sink import CpuSink, GpuSink, KvSink
from .prompt import chat_prompt_ids
from .report import ChunkRow, LoadReport
from .throughput import ThroughputEstimator


def load_context(server_url: str, context_id: str, *, model, prompt_ids: Sequence[int] | None = None,
                 **kwargs) -> LoadResult:
    """Synchronous :meth:`ContextLoader.load` (runs its own event loop; not from async code)."""

    async def run() -> LoadResult:
        async with ContextLoader(server_url, model=model, **kwargs) as cl:
            return await cl.load(context_id, prompt_ids=prompt_ids)

    return asyncio.run(run())


__all__ = [
    "ContextLoader", "ChatSession", "ChatReply", "ChatError", "LoadResult", "LoadReport", "ChunkRow", "LoaderError", "load_context", "chat_prompt_ids",
    "Calibration", "RecomputeModel", "DecodeModel", "calibrate_recompute", "calibrate_decode",
    "ThroughputEstimator", "DEFAULT_PRIOR_BPS", "DEFAULT_SLO_S", "LoaderContext", "shared_context",
    "Fetched", "FetchFailed", "FetchOptions", "Decision", "PlanOptions", "Planner", "KvSink", "CpuSink", "GpuSink", "LoaderMetrics",
]
