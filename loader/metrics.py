"""Loader metrics in a Prometheus registry of their own, fed one finished :class:`LoadReport` at a time.

A process that loads contexts (a serving engine, ``ctxstream ask``) exposes them with
``prometheus_client.start_http_server(port, registry=metrics.registry)`` or renders them with
``metrics.render()``. Label values are bounded: ``policy`` is the policy's name, ``choice`` a codec level
or ``text``, ``outcome`` ``met``/``missed``/``none`` (no SLO).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from .report import LoadReport

#: Seconds: TTFT, load and first-token times (10 ms .. 2 min).
TIME_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0)
#: Relative forecast error of the throughput a chunk's choice was made with (|predicted - measured| / measured).
ERROR_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)


class LoaderMetrics:
    """TTFT, load time, choices per chunk, throughput forecast error, SLO outcome and recoveries."""

    def __init__(self, registry: CollectorRegistry | None = None, namespace: str = "ctxstream_loader"):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r, ns = self.registry, namespace
        self.ttft = Histogram("ttft_seconds", "time to first token of a load (load + prompt prefill)", ["policy"],
                              namespace=ns, buckets=TIME_BUCKETS_S, registry=r)
        self.load = Histogram("load_seconds", "time until the whole context is in the cache", ["policy"],
                              namespace=ns, buckets=TIME_BUCKETS_S, registry=r)
        self.chunks = Counter("chunks", "chunks loaded, by what was finally used", ["policy", "choice"],
                              namespace=ns, registry=r)
        self.bytes = Counter("bytes", "chunk body bytes received", ["policy"], namespace=ns, registry=r)
        self.forecast_error = Histogram("forecast_error_ratio",
                                        "relative error of the throughput forecast a chunk was chosen with",
                                        ["policy"], namespace=ns, buckets=ERROR_BUCKETS, registry=r)
        self.slo = Counter("loads", "finished loads by SLO outcome", ["policy", "outcome"], namespace=ns,
                           registry=r)
        self.recovered = Counter("recoveries", "chunks recovered after a failure, by how", ["policy", "how"],
                                 namespace=ns, registry=r)

    def record(self, report: LoadReport) -> None:
        """Account one finished load."""
        pol = report.policy
        if report.ttft_s is not None:
            self.ttft.labels(pol).observe(report.ttft_s)
        self.load.labels(pol).observe(report.load_s)
        self.bytes.labels(pol).inc(report.bytes)
        for row in report.chunks:
            self.chunks.labels(pol, row.final or "none").inc()
            if row.predicted_bps and row.throughput_bps:
                self.forecast_error.labels(pol).observe(abs(row.predicted_bps - row.throughput_bps) / row.throughput_bps)
            if row.recovered:
                self.recovered.labels(pol, row.recovered).inc()
        outcome = "none" if report.slo_met is None else ("met" if report.slo_met else "missed")
        self.slo.labels(pol, outcome).inc()

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)
