"""What the app holds while it runs (``app.state.streamer``)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ctxstream.codec import Codec
from ctxstream.model import ModelAdapter

from .ingest import ContextService
from .metrics import Metrics
from .settings import Settings
from .storage import Store


@dataclass
class StreamerState:
    settings: Settings
    adapter: ModelAdapter
    codec: Codec
    store: Store
    service: ContextService
    executor: ThreadPoolExecutor
    metrics: Metrics
    uploads_in_progress: int = 0
    started: float = 0.0
