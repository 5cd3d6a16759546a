"""The streamer's Prometheus metrics (prometheus-client), in a registry of their own per app.

Every metric is declared here once, with its kind and label names; callers use the small facade
``inc`` / ``set`` / ``observe`` / ``get`` by name. Label values are bounded by construction: ``route``
is the route *template* (``/v1/contexts/{ctx_id}``, or ``unmatched``), ``tier`` a store tier name,
``level`` a codec level, ``kind`` one of the accepted upload content types, ``op`` a store operation.
The registry also holds the process and platform collectors (CPU, RSS, open files, GC).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401  (re-exported for the route)

#: Seconds, for request latency and store operations (100 µs .. 30 s).
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0, 10.0, 30.0)
#: Seconds, for ingest work (model forward, encoding, whole uploads: 1 ms .. 10 min).
WORK_BUCKETS_S = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: Bytes of one chunk response (1 KiB .. 256 MiB, powers of 4).
SIZE_BUCKETS_B = tuple(float(1024 * 4 ** i) for i in range(10))

# name -> (kind, help, label names[, buckets])
_DEFINITIONS: dict[str, tuple] = {
    "requests_total": ("counter", "HTTP requests by route template, method and status", ("route", "method", "status")),
    "request_seconds": ("histogram", "HTTP request latency (until the response is sent) by route template and method",
                        ("route", "method"), LATENCY_BUCKETS_S),
    "bytes_served_total": ("counter", "chunk bytes sent, by the store tier that served them", ("tier",)),
    "chunk_response_bytes": ("histogram", "bytes of each chunk response, by level", ("level",), SIZE_BUCKETS_B),
    "chunks_served_total": ("counter", "chunk responses sent, by level", ("level",)),
    "upload_seconds": ("histogram", "wall time of context uploads", (), WORK_BUCKETS_S),
    "encode_seconds": ("histogram", "time spent encoding one chunk at every level", (), WORK_BUCKETS_S),
    "model_seconds": ("histogram", "time spent computing a context's KV with the model", (), WORK_BUCKETS_S),
    "uploads_total": ("counter", "context uploads by kind and outcome", ("kind", "outcome")),
    "chunks_encoded_total": ("counter", "chunks encoded (all levels each)", ()),
    "chunks_reused_total": ("counter", "chunks already stored and not re-encoded", ()),
    "prefix_lookups_total": ("counter", "POST /v1/lookup answers by outcome (hit, miss)", ("outcome",)),
    "prefix_hit_tokens_total": ("counter", "tokens of the stored prefixes POST /v1/lookup found", ()),
    "uploads_in_progress": ("gauge", "uploads being received or encoded", ()),
    "store_objects": ("gauge", "objects held by each store tier", ("tier",)),
    "store_bytes": ("gauge", "payload bytes held by each store tier", ("tier",)),
    "store_errors_total": ("counter", "requests answered 503 because a store tier failed", ()),
    "store_op_seconds": ("histogram", "store operation latency by operation and store", ("op", "store"),
                         LATENCY_BUCKETS_S),
}
_KINDS = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}


class Metrics:
    """One registry of the streamer's metrics (see the module docstring)."""

    def __init__(self, namespace: str = "ctxstream", *, process: bool = True):
        self.namespace = namespace
        self.registry = CollectorRegistry(auto_describe=True)
        if process:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        self._metrics = {}
        for name, (kind, help_text, labels, *buckets) in _DEFINITIONS.items():
            kw = {"buckets": buckets[0]} if buckets else {}
            self._metrics[name] = _KINDS[kind](name, help_text, labels, namespace=namespace, registry=self.registry,
                                               **kw)

    def _child(self, name: str, labels: dict[str, str]):
        metric = self._metrics[name]  # KeyError: a metric that was never declared
        return metric.labels(**{k: str(v) for k, v in labels.items()}) if labels else metric

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        self._child(name, labels).inc(value)

    def set(self, name: str, value: float, **labels: str) -> None:
        self._child(name, labels).set(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self._child(name, labels).observe(value)

    def get(self, name: str, **labels: str) -> float:
        """A counter's or gauge's current value, a histogram's observation count (0 if never set)."""
        sample = f"{self.namespace}_{name}"
        if _DEFINITIONS[name][0] == "histogram":
            sample += "_count"
        value = self.registry.get_sample_value(sample, {k: str(v) for k, v in labels.items()})
        return value or 0.0

    def render(self) -> bytes:
        """Everything in the Prometheus text exposition format."""
        return generate_latest(self.registry)
