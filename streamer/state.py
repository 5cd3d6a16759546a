"""What the app holds while it runs (``app.state.streamer``)."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

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
    uploads_in_progress: int = 0  # uploads holding an encoding slot (their bodies read)
    tenant_uploads: Counter = field(default_factory=Counter)  # tenant -> its uploads in flight (receiving too)
    started: float = 0.0
