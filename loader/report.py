"""The load report: what the loader chose per chunk, how long each step took, what failed."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ChunkRow:
    index: int
    tokens: int
    choice: str = ""  # what the policy chose: a level or "text"
    final: str = ""  # what was used: the level, or "text" (also when a failed fetch was recomputed)
    bytes: int = 0  # body bytes received for this chunk (all attempts)
    fetch_s: float = 0.0
    decode_s: float = 0.0
    recompute_s: float = 0.0
    throughput_bps: float | None = None  # measured over this chunk's body
    predicted_bps: float | None = None  # the forecast the choice was made with
    throughput_err: float | None = None  # the forecast error the choice was made with
    remaining_s: float | None = None  # budget left when the choice was made
    decide_s: float = 0.0  # time the policy took to choose
    work_est_s: float | None = None  # the decode/recompute estimate the choice was made with
    queued_s: float | None = None  # when its data was ready for the compute worker (since load start)
    done_s: float | None = None  # when it was in the cache (since load start)
    retries: int = 0
    error: str | None = None  # the last failure (fetch, checksum, decode)
    recovered: str | None = None  # "range-resume", "refetch", "recomputed"


@dataclass
class LoadReport:
    context_id: str
    server: str
    policy: str
    slo_s: float | None
    model: str = ""
    sink: str = ""  # the KV sink: "cpu" (reference decode) or "gpu" (GPU decode, layer-wise)
    tokens: int = 0
    chunk_tokens: int = 0
    chunks: list[ChunkRow] = field(default_factory=list)
    manifest_s: float = 0.0
    setup_s: float = 0.0  # profile fetch during this load
    load_s: float = 0.0  # from load() until every chunk is in hand (decoded, prepared or recomputed)
    first_token_s: float | None = None  # pending layers' decode + prompt prefill + first token, after load_s
    ttft_s: float | None = None  # load_s + first_token_s (or load_s when there is no prompt)
    slo_met: bool | None = None
    prior_bps: float = 0.0
    final_bps: float | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)  # {"chunk", "error", "recovered"}
    quality: float | None = None  # token-weighted quality score of the final choices (1 = exact)
    calibration: dict[str, Any] = field(default_factory=dict)
    answer: str | None = None

    @property
    def retries(self) -> int:
        return sum(c.retries for c in self.chunks)

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.chunks)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.chunks:
            out[c.final] = out.get(c.final, 0) + 1
        return out

    def finish(self, slo_s: float | None) -> None:
        self.ttft_s = self.load_s + (self.first_token_s or 0.0)
        self.slo_met = None if slo_s is None else bool(self.ttft_s <= slo_s)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["retries"] = self.retries
        d["bytes"] = self.bytes
        d["choices"] = self.counts()
        return d

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)
