"""Throughput forecast from the chunks as they stream (no oracle): harmonic mean of recent samples,
with the recent maximum relative forecast error (RobustMPC's discount)."""

from __future__ import annotations

from collections import deque


class ThroughputEstimator:
    """Samples are (bytes, seconds) of chunk bodies; the forecast is the harmonic mean of the last
    ``window`` sample rates (robust to one fast outlier), the prior until there is a sample.

    Bodies smaller than ``min_sample_bytes`` say little about the rate (they fit in socket buffers
    and shaper bursts), so consecutive small bodies are pooled into one sample once they add up.
    """

    def __init__(self, prior_bps: float, window: int = 5, min_seconds: float = 1e-4,
                 min_sample_bytes: int = 64 * 1024):
        if not prior_bps > 0:
            raise ValueError("prior_bps must be > 0")
        self.prior_bps = float(prior_bps)
        self.window = int(window)
        self.min_seconds = float(min_seconds)
        self.min_sample_bytes = int(min_sample_bytes)
        self._rates: deque[float] = deque(maxlen=self.window)
        self._errors: deque[float] = deque(maxlen=self.window)
        self._pool_bytes, self._pool_s = 0, 0.0
        self.samples = 0

    def estimate(self) -> float:
        if not self._rates:
            return self.prior_bps
        return len(self._rates) / sum(1.0 / r for r in self._rates)

    def error(self) -> float:
        """Max relative error |forecast - actual| / actual of the recent forecasts (0 before any)."""
        return max(self._errors, default=0.0)

    def add(self, nbytes: int, seconds: float) -> float | None:
        """Record a body of ``nbytes`` received in ``seconds``; returns the rate of this body (bits/s).
        The forecast only changes once ``min_sample_bytes`` have been pooled."""
        if nbytes <= 0:
            return None
        body_rate = nbytes * 8.0 / max(seconds, self.min_seconds)
        self._pool_bytes += nbytes
        self._pool_s += max(0.0, seconds)
        if self._pool_bytes < self.min_sample_bytes:
            return body_rate
        rate = self._pool_bytes * 8.0 / max(self._pool_s, self.min_seconds)
        self._pool_bytes, self._pool_s = 0, 0.0
        predicted = self.estimate()
        self._errors.append(abs(predicted - rate) / rate)
        self._rates.append(rate)
        self.samples += 1
        return body_rate
