"""KV sinks: where a load's chunks go, in chunk order, on the loader's compute worker.

A sink takes each chunk as it is ready -- fetched bytes (:meth:`KvSink.add_blob`) or a recompute from
its token ids (:meth:`KvSink.recompute`) -- and at the end hands the model a
:class:`~ctxstream.loader.pipeline.PipelinedCache` whose pending layers come from a
:class:`~ctxstream.loader.pipeline.LayerSource` (layer ``l``'s KV is produced when the model reaches
layer ``l``). A recompute needs the KV of every chunk before it, so it first applies the pending
chunks into the sink's ``DynamicCache``; then the model extends that cache by the chunk's tokens on
the model's device (the GPU when the model is there).

* :class:`CpuSink` (the reference, CI's path): each fetched chunk is decoded on the CPU when it
  arrives (beside the later fetches); the source concatenates the decoded layers.
* :class:`GpuSink` (default when the model is on CUDA and the GPU decoder builds): each fetched chunk
  is received into pinned memory (:meth:`KvSink.receive_buffer`: the fetcher writes the body there as
  it arrives, so no copy is left after its last byte; bytes from elsewhere are copied in) and its host
  work done once (``GpuDecoder.prepare``: header parse,
  decode plans, packed tables); the source is a
  :class:`~ctxstream.loader.pipeline.GpuLayerSource`, whose copies and decode kernels run on side
  streams while the model computes earlier layers.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ctxstream.codec import Codec, CodecError
from ctxstream.model import ModelAdapter

from .calibration import run_model, sync_device
from .pipeline import DecodedLayerSource, GpuLayerSource, LayerSource, PipelinedCache, StackedSource

__all__ = ["KvSink", "CpuSink", "GpuSink", "make_sink", "sink_kinds", "default_sink_kind"]


class KvSink:
    """Base of the sinks (see the module docstring). Not thread-safe: one worker thread drives it."""

    kind = "sink"

    def __init__(self, adapter: ModelAdapter, codec: Codec):
        self.adapter = adapter
        self.codec = codec
        self.cache = adapter.make_cache()  # the applied prefix
        self.start_token = 0
        self.tokens = 0  # applied + pending
        self.pending_tokens = 0

    def begin(self, start: int = 0) -> None:
        """The first chunk will start at token ``start`` (0 for a whole context)."""
        self.start_token = self.tokens = start
        self.pending_tokens = 0

    def receive_buffer(self, nbytes: int):
        """Where the fetcher receives a chunk body of ``nbytes`` (a writable buffer handed back to
        :meth:`add_blob` as the blob), or None for the fetcher's own memory. Called on the event loop's
        thread while the worker drives the sink, so it touches no sink state."""
        return None

    # ------------------------------------------------------------------ chunks, in order
    def add_blob(self, blob: bytes, start: int, tokens: int, *, verified: bool) -> None:
        """A fetched chunk's bytes (``verified``: its checksum was checked at receive)."""
        if start != self.tokens:
            raise CodecError(f"chunk at token {start}, the sink is at {self.tokens}")
        self._add(blob, start, tokens, verified)
        self.tokens += tokens
        self.pending_tokens += tokens

    def recompute(self, token_ids) -> None:
        """Apply the pending chunks, then extend the cache by ``token_ids`` with the model."""
        self.apply()
        if self.cache.get_seq_length() != self.tokens - self.start_token:
            raise RuntimeError(f"cache holds {self.cache.get_seq_length()} tokens, the sink {self.tokens}")
        run_model(self.adapter, self.cache, token_ids)
        self.tokens += len(token_ids)

    def apply(self) -> None:
        """Put the pending chunks into the cache now (layer by layer)."""
        src = self._source()
        if src is None:
            return
        src.start()
        for layer in range(src.num_layers):
            k, v = src.layer(layer)
            self.cache.update(k.to(self.adapter.device, self.adapter.dtype),
                              v.to(self.adapter.device, self.adapter.dtype), layer)
        src.finish()
        self.pending_tokens = 0

    def finish(self):
        """The cache for the model: a :class:`PipelinedCache` over the applied prefix and the pending
        chunks (their layers are produced as the model reaches them), or the plain cache when nothing
        is pending. The caller runs the model on it (or ``materialize``s it), then the source's
        ``finish`` is called by :meth:`close` to surface integrity errors."""
        src = self._source()
        if src is None:
            self.source = None
            return self.cache
        self.source = StackedSource(self.cache, src)
        self.pending_tokens = 0
        return PipelinedCache(self.source, self.adapter.model.config)

    def close(self) -> None:
        """Wait for the last source and raise on its integrity errors."""
        src = getattr(self, "source", None)
        if src is not None:
            self.source = None
            src.finish()

    def sync(self) -> None:
        sync_device(self.adapter.device)

    # ------------------------------------------------------------------ per sink
    def _add(self, blob: bytes, start: int, tokens: int, verified: bool) -> None:
        raise NotImplementedError

    def _source(self) -> LayerSource | None:
        raise NotImplementedError


class CpuSink(KvSink):
    """Decodes each chunk on the CPU as it arrives (``Codec.decoder().feed``)."""

    kind = "cpu"

    def __init__(self, adapter: ModelAdapter, codec: Codec):
        super().__init__(adapter, codec)
        self._chunks: list[list] = []

    def _add(self, blob, start, tokens, verified):
        dec = self.codec.decoder()
        layers = dec.feed(blob)
        if not dec.done:
            raise CodecError(f"{len(blob)} bytes do not hold a whole chunk")
        hdr = dec.header
        if hdr.start != start or hdr.shape[2] != tokens:
            raise CodecError(f"chunk holds tokens {hdr.start}+{hdr.shape[2]}, expected {start}+{tokens}")
        self._chunks.append(layers)

    def _source(self):
        if not self._chunks:
            return None
        src = DecodedLayerSource(self._chunks, device=self.adapter.device, dtype=self.adapter.dtype)
        self._chunks = []
        return src


class GpuSink(KvSink):
    """Pins each chunk and prepares its GPU decode as it arrives; decodes on side streams at the end.

    ``groups``: layer groups per decode launch (:func:`~ctxstream.loader.pipeline.layer_groups`).
    ``graphs``: also record each transform-coded chunk's decode as CUDA graphs when it arrives
    (``GpuDecoder.capture``: its bytes go to the GPU then, and its launches are queued once, off the
    load's critical path); the source then replays them, one graph launch per (layer group, chunk).
    Where any chunk of the load cannot be captured (fp16 / quant8, or CUDA refuses), the load decodes
    from the prepared chunks as without ``graphs``. ``decode_early`` (with ``graphs``): each captured
    chunk is also decoded at once, on the sink's stream, so the GPU decodes chunk ``i`` while chunk
    ``i + 1`` is in flight and the model waits only for the last one (the layer-wise source then waits
    for those decodes instead of replaying them)."""

    kind = "gpu"

    def __init__(self, adapter: ModelAdapter, codec: Codec, *, decoder=None, groups="geometric",
                 streams: int | None = None, graphs: bool = False, decode_early: bool = True):
        super().__init__(adapter, codec)
        from ctxstream.codec import gpu

        from .pipeline import layer_groups

        if adapter.device.type != "cuda":
            raise ValueError("the GPU sink needs the model on a CUDA device")
        self.decoder = decoder if decoder is not None and decoder.codec is codec else gpu.GpuDecoder(codec, adapter.device)
        self.groups = layer_groups(codec.info.num_layers, groups)
        self.streams = streams
        self.graphs = bool(graphs)
        self._early = torch.cuda.Stream(adapter.device) if self.graphs and decode_early else None
        self._pinned: list[torch.Tensor] = []
        self._prepared: list = []
        self._captured: list = []  # per chunk a CapturedChunk, or None (not captured)
        self._replayed: list = []  # captured chunks handed to sources, released at close()

    def receive_buffer(self, nbytes):
        # pinned memory (torch's caching host allocator: reused across chunks and loads), as a numpy
        # view whose base is the pinned tensor; the GPU copies from it directly. Allocated under the
        # model's device (the event loop's thread has none set: no context on another GPU)
        with torch.cuda.device(self.adapter.device):
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()

    @staticmethod
    def _received_pinned(blob) -> torch.Tensor | None:
        """The pinned tensor behind a body :meth:`receive_buffer` gave, else None."""
        base = blob.base if isinstance(blob, np.ndarray) else None
        if isinstance(base, torch.Tensor) and base.dtype == torch.uint8 and base.numel() == blob.nbytes \
                and base.is_pinned():
            return base
        return None

    def _add(self, blob, start, tokens, verified):
        pinned = self._received_pinned(blob)
        if pinned is None:  # bytes from elsewhere (a calibration, a caller): one copy into pinned memory
            pinned = torch.empty(len(blob), dtype=torch.uint8, pin_memory=True)
            with warnings.catch_warnings():  # read-only bytes: only ever read here
                warnings.simplefilter("ignore", UserWarning)
                src = torch.frombuffer(blob, dtype=torch.uint8)
            pinned.copy_(src)  # torch's copy, on all intra-op threads
        prep = self.decoder.prepare(pinned, self.groups, verify=not verified)
        if prep.header.start != start or prep.header.tokens != tokens:
            raise CodecError(f"chunk holds tokens {prep.header.start}+{prep.header.tokens}, expected {start}+{tokens}")
        self._pinned.append(pinned)
        self._prepared.append(prep)
        if self.graphs and (not self._captured or self._captured[-1] is not None):
            cap = self.decoder.capture(prep, pinned, dtype=self.adapter.dtype)
            if cap is not None and self._early is not None:
                cap.decode_now(self._early)
            self._captured.append(cap)
        else:  # one chunk without graphs: the load decodes from the prepared chunks
            self._captured.append(None)

    def _source(self):
        if not self._pinned:
            return None
        captured = self._captured if self.graphs and all(c is not None for c in self._captured) else None
        src = GpuLayerSource(self.decoder, self._pinned, dtype=self.adapter.dtype, groups=self.groups,
                             verified=True, streams=self.streams, prepared=None if captured else self._prepared,
                             captured=captured)
        if captured:
            self._replayed += captured
        else:  # a chunk could not be captured: the others' graphs are not used
            self._drain_early()
            for c in self._captured:
                if c is not None:
                    c.release()
        self._pinned, self._prepared, self._captured = [], [], []
        return src

    def _drain_early(self) -> None:
        """Wait for the decodes queued as chunks arrived (their graphs' scratch is about to be reused)."""
        if self._early is not None:
            self._early.synchronize()

    def close(self) -> None:
        """As :meth:`KvSink.close`, then free the graphs of every captured chunk (their memory is about
        the KV they decode: a long-lived loader must not wait for the garbage collector)."""
        try:
            super().close()
        finally:
            self._drain_early()
            for cc in self._replayed + [c for c in self._captured if c is not None]:
                cc.release()
            self._replayed, self._captured = [], []


_SINKS = {"cpu": CpuSink, "gpu": GpuSink}


def sink_kinds() -> list[str]:
    return list(_SINKS)


def default_sink_kind(adapter: ModelAdapter) -> str:
    """``gpu`` when the model is on CUDA and the GPU decoder is available there, else ``cpu``."""
    if adapter.device.type == "cuda":
        from ctxstream.codec import gpu

        if gpu.unavailable_reason() is None:
            return "gpu"
    return "cpu"


def make_sink(kind: str, adapter: ModelAdapter, codec: Codec, **kw) -> KvSink:
    if kind not in _SINKS:
        raise ValueError(f"unknown KV sink {kind!r}; known: {', '.join(_SINKS)}")
    return _SINKS[kind](adapter, codec, **kw)
