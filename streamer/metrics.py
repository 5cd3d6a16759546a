"""Prometheus text-format metrics (no client library): counters, gauges and summaries with labels."""

from __future__ import annotations

import threading
from collections import defaultdict


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    esc = lambda v: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")  # noqa: E731
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in sorted(labels.items())) + "}"


class Metrics:
    def __init__(self, prefix: str = "ctxstream"):
        self.prefix = prefix
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}
        self._values: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
        self.describe("requests_total", "counter", "HTTP requests by route, method and status")
        self.describe("bytes_served_total", "counter", "chunk bytes sent, by the store tier that served them")
        self.describe("chunks_served_total", "counter", "chunk responses sent, by level")
        self.describe("upload_seconds", "summary", "wall time of context uploads")
        self.describe("encode_seconds", "summary", "time spent encoding chunks (all levels)")
        self.describe("model_seconds", "summary", "time spent computing KV with the model")
        self.describe("uploads_total", "counter", "context uploads by kind and outcome")
        self.describe("chunks_encoded_total", "counter", "chunks encoded (all levels each)")
        self.describe("chunks_reused_total", "counter", "chunks already stored and not re-encoded")
        self.describe("uploads_in_progress", "gauge", "uploads being received or encoded")
        self.describe("store_objects", "gauge", "objects held by each store tier")
        self.describe("store_bytes", "gauge", "payload bytes held by each store tier")

    def describe(self, name: str, kind: str, help_text: str) -> None:
        self._help[name] = (kind, help_text)

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        with self._lock:
            self._values[name][tuple(sorted(labels.items()))] += value

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._values[name][tuple(sorted(labels.items()))] = value

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[name + "_sum"][key] += seconds
            self._values[name + "_count"][key] += 1

    def get(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, help_text) in self._help.items():
                full = f"{self.prefix}_{name}"
                lines.append(f"# HELP {full} {help_text}")
                lines.append(f"# TYPE {full} {kind}")
                series = [name] if kind != "summary" else [name + "_sum", name + "_count"]
                for s in series:
                    for key, value in sorted(self._values.get(s, {}).items()):
                        v = int(value) if float(value).is_integer() else value
                        lines.append(f"{self.prefix}_{s}{_labels(dict(key))} {v}")
        return "\n".join(lines) + "\n"
