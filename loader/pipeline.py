"""Layer-wise pipelined loading (AttentionStore's pre-loading): the model runs layer ``l`` on the new
tokens while layer ``l + 1``'s KV is still being decoded and copied.

A :class:`PipelinedCache` is a transformers ``DynamicCache`` whose layers know, before any KV is
there, how many prefix tokens they *will* hold (so the model computes positions and masks as for a
full cache). The first ``update()`` of layer ``l`` (called by layer ``l``'s attention, through the
public Cache API: nothing in the model is patched) takes layer ``l``'s prefix KV from a
:class:`LayerSource` and appends the new tokens' KV to it, as ``DynamicLayer.update`` does:

* :class:`CpuLayerSource` (the reference, runs anywhere): decodes layer ``l`` of every chunk on the
  CPU when it is asked for (``IncrementalDecoder`` fed up to the end of that layer's section);
* :class:`GpuLayerSource`: each chunk is parsed and planned once on the host
  (:meth:`~ctxstream.codec.gpu.GpuDecoder.prepare`; section checksums too unless the receiver
  verified them as the bytes arrived: ``verified=True``); :meth:`~GpuLayerSource.start` then queues
  every layer group's copy and decode kernels on a side CUDA stream before the model runs, with
  one CUDA event per group; ``layer(l)`` makes the model's stream wait on that event (a
  device-side wait: the host never blocks on the GPU), so the GPU decodes later layers while the
  model computes earlier ones. fp16 and quant8 chunks are copied and converted on the GPU per
  group. The GPU's integrity flags are checked once, in :meth:`GpuLayerSource.finish`.

    src = GpuLayerSource(GpuDecoder(codec), blobs, verified=True)   # or CpuLayerSource(codec, blobs)
    cache = PipelinedCache(src)
    logits = adapter.extend(cache, question_ids)               # decode and prefill overlap
    src.finish()                                               # raises if any chunk was corrupt

After the forward pass the cache is an ordinary ``DynamicCache`` (generation continues on it).
Only full-attention layers are supported (no sliding windows): other configs raise ``ValueError``.
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from ctxstream.codec import Codec
from ctxstream.codec.format import CHECK_BYTES, parse_header

__all__ = ["LayerSource", "CpuLayerSource", "DecodedLayerSource", "GpuLayerSource", "StackedSource", "PipelinedCache",
           "layer_groups"]


def _as_bytes(blob) -> bytes | memoryview:
    if isinstance(blob, torch.Tensor):
        return memoryview(blob.numpy()).cast("B")
    return blob


def layer_groups(num_layers: int, groups: str | int | Sequence[Sequence[int]] = "geometric") -> list[list[int]]:
    """Layers per decode launch, in order: ``int`` n -> groups of n; ``"geometric"`` -> 1, 1, 2, 4, 8, ...
    (the first layers come fast, later launches are large enough to fill the GPU); or explicit lists."""
    if isinstance(groups, str):
        if groups != "geometric":
            raise ValueError(f"unknown layer grouping {groups!r}")
        out, nxt, size = [], 0, 1
        while nxt < num_layers:
            out.append(list(range(nxt, min(num_layers, nxt + size))))
            nxt += size
            if len(out) > 1:
                size *= 2
        return out
    if isinstance(groups, int):
        if groups < 1:
            raise ValueError("group size must be >= 1")
        return [list(range(i, min(num_layers, i + groups))) for i in range(0, num_layers, groups)]
    out = [list(map(int, g)) for g in groups]
    if [x for g in out for x in g] != list(range(num_layers)):
        raise ValueError("layer groups must cover 0..num_layers-1 once, in order")
    return out


# ------------------------------------------------------------------------------------ sources
def _joined(ks: list[torch.Tensor], vs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pieces along the token axis (``layer_parts``) as one ``(keys, values)``; one piece is not copied."""
    return (ks[0], vs[0]) if len(ks) == 1 else (torch.cat(ks, 2), torch.cat(vs, 2))


class LayerSource:
    """Produces the prefix KV of each layer: ``layer(l)`` -> ``(keys, values)`` ``[1, kv_heads,
    prefix_tokens, head_dim]`` on the model's device, usable on the current stream."""

    num_layers: int
    prefix_tokens: int

    def start(self) -> None:
        """Begin producing layers (idempotent; ``PipelinedCache`` calls it)."""

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def layer_parts(self, index: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Layer ``index``'s prefix KV as consecutive pieces along the token axis (their concatenation
        is :meth:`layer`): a source that decodes chunk by chunk hands its pieces over, and the cache
        joins them with the new tokens in one copy."""
        k, v = self.layer(index)
        return [k], [v]

    def finish(self) -> None:
        """Wait for everything started and raise on any integrity error."""


def _chunk_headers(codec: Codec, blobs) -> list:
    """Parsed headers of ``blobs``; checks that the chunks are contiguous in token positions."""
    if not blobs:
        raise ValueError("no chunks")
    infos = [parse_header(_as_bytes(b), codec.limits) for b in blobs]
    pos = infos[0].header.start
    for i, hi in enumerate(infos):
        codec._check_header(hi)
        if hi.header.start != pos:
            raise ValueError(f"chunk {i} starts at token {hi.header.start}, expected {pos} (chunks must be contiguous)")
        pos += hi.header.tokens
    return infos


class CpuLayerSource(LayerSource):
    """Reference source: layer ``l`` of each chunk is decoded on the CPU when ``layer(l)`` is called."""

    def __init__(self, codec: Codec, blobs: Sequence, *, device=None, dtype: torch.dtype = torch.float32):
        self.codec = codec
        self.blobs = [_as_bytes(b) for b in blobs]
        self.infos = _chunk_headers(codec, self.blobs)
        self.num_layers = codec.info.num_layers
        self.start_token = self.infos[0].header.start
        self.prefix_tokens = sum(hi.header.tokens for hi in self.infos)
        self.device = torch.device(device or "cpu")
        self.dtype = dtype
        self._decoders = [codec.decoder() for _ in self.blobs]
        self._fed = [0] * len(self.blobs)
        self._got: list[dict[int, object]] = [{} for _ in self.blobs]
        self.served: list[int] = []  # layers in the order they were asked for

    def layer(self, index: int):
        ks, vs = [], []
        for c, (blob, hi, dec) in enumerate(zip(self.blobs, self.infos, self._decoders)):
            if index not in self._got[c]:
                end = hi.section_offsets()[index] + hi.header.sections[index] + CHECK_BYTES
                if end > self._fed[c]:
                    for lk in dec.feed(blob[self._fed[c]:end]):
                        self._got[c][lk.layer] = lk
                    self._fed[c] = end
            lk = self._got[c].pop(index)
            ks.append(lk.keys)
            vs.append(lk.values)
        self.served.append(index)
        k = ks[0] if len(ks) == 1 else torch.cat(ks, 1)
        v = vs[0] if len(vs) == 1 else torch.cat(vs, 1)
        return k[None].to(self.device, self.dtype), v[None].to(self.device, self.dtype)

    def finish(self) -> None:
        for c, (blob, dec) in enumerate(zip(self.blobs, self._decoders)):
            if self._fed[c] < len(blob):
                dec.feed(blob[self._fed[c]:])
                self._fed[c] = len(blob)
            dec.result()  # raises if bytes are missing


class DecodedLayerSource(LayerSource):
    """Chunks already decoded on the CPU (per chunk, per layer :class:`~ctxstream.codec.LayerKV`):
    ``layer(l)`` concatenates layer ``l`` of every chunk and moves it to the model's device and dtype,
    as the model reaches that layer (the CPU sink decodes each chunk as it arrives, beside the fetches)."""

    def __init__(self, chunks: Sequence[Sequence], *, device=None, dtype: torch.dtype = torch.float32):
        if not chunks:
            raise ValueError("no chunks")
        self.chunks = [list(c) for c in chunks]
        self.num_layers = len(self.chunks[0])
        if any(len(c) != self.num_layers for c in self.chunks):
            raise ValueError("chunks with different layer counts")
        self.prefix_tokens = sum(int(c[0].keys.shape[1]) for c in self.chunks)
        self.device = torch.device(device or "cpu")
        self.dtype = dtype

    def layer(self, index: int):
        ks = [c[index].keys for c in self.chunks]
        vs = [c[index].values for c in self.chunks]
        k = ks[0] if len(ks) == 1 else torch.cat(ks, 1)
        v = vs[0] if len(vs) == 1 else torch.cat(vs, 1)
        for c in self.chunks:  # handed over once: the cache owns the concatenation
            c[index] = None
        return k[None].to(self.device, self.dtype), v[None].to(self.device, self.dtype)


class StackedSource(LayerSource):
    """KV already in a cache (``base``: a ``DynamicCache`` of the first tokens, e.g. up to a
    recomputed chunk) followed by ``source``'s layers."""

    def __init__(self, base, source: LayerSource):
        self.base, self.source = base, source
        self.num_layers = source.num_layers
        self.base_tokens = base.get_seq_length() if base is not None and len(base.layers) else 0
        self.prefix_tokens = self.base_tokens + source.prefix_tokens

    def start(self) -> None:
        self.source.start()

    def layer(self, index: int):
        return _joined(*self.layer_parts(index))

    def layer_parts(self, index: int):
        ks, vs = self.source.layer_parts(index)
        if not self.base_tokens:
            return ks, vs
        b = self.base.layers[index]
        return ([b.keys, *(k.to(b.keys.device, b.keys.dtype) for k in ks)],
                [b.values, *(v.to(b.values.device, b.values.dtype) for v in vs)])

    def finish(self) -> None:
        self.source.finish()


class GpuLayerSource(LayerSource):
    """Decodes chunks layer group by layer group on a side CUDA stream (see the module docstring).

    ``blobs``: the chunks in token order (bytes-like or CPU uint8 tensors; copied once into pinned
    memory here unless already pinned). ``groups``: see :func:`layer_groups`.

    The host work is done once per chunk, here in the constructor (``GpuDecoder.prepare``: header
    parse, one decode plan per layer group, every group's small tables packed in one pinned
    buffer); a serving loader does it as each chunk's bytes arrive. ``verified=True``: the caller
    has already checked every section's xxh3 as the bytes were received (at network rate, off the
    GPU path), so it is not repeated; ``False`` (default): checked here, once per chunk, on the host.

    Consecutive chunks of one transform-coded level form a run (``merge=True``, default; at most
    ``max_run_tokens`` tokens; :meth:`~ctxstream.codec.gpu.GpuDecoder.merge`), decoded as one chunk:
    a 16K-token context at one level is 1 set of launches per layer group instead of 8.
    :meth:`start` then queues, on side streams (run ``r`` on stream ``r % streams``, so the runs'
    kernels run side by side), per run one copy of its tables and per (layer group, run) the copies
    of that group's bytes and the group's kernels, writing straight into one ``[layers, kv_heads,
    tokens, head_dim]`` buffer per K and V (no concatenation), and one CUDA event per (group,
    stream): no host sync, no parsing, no small uploads. ``threaded=False`` (default):
    everything is queued in :meth:`start`, before the model's first layer (the host is then free for
    the forward pass and the GPU runs decode kernels beside the model's); ``True``: a host thread
    queues them while the model runs (they share the GIL with the forward pass).

    ``captured``: the chunks' decodes already recorded as CUDA graphs, one
    :class:`~ctxstream.codec.gpu.CapturedChunk` per blob (:meth:`~ctxstream.codec.gpu.GpuDecoder.capture`,
    done as each chunk arrives, their bytes already on the GPU): :meth:`start` then replays, per layer
    group, each chunk's graph on side stream ``c % streams`` (one graph launch per (group, chunk)
    instead of the host queueing every copy and kernel: the host work is off the load's critical
    path), each chunk writing its own buffers; :meth:`layer_parts` hands over the chunks' pieces. A
    chunk already decoded as it arrived (``CapturedChunk.decode_now``) is waited for, not replayed.
    """

    def __init__(self, decoder, blobs: Sequence, *, dtype: torch.dtype = torch.bfloat16,
                 groups: str | int | Sequence[Sequence[int]] = "geometric", threaded: bool = False,
                 verified: bool = False, priority: int = 0, streams: int | None = None, prepared=None,
                 merge: bool = True, max_run_tokens: int = 16384, captured=None):
        self.decoder = decoder
        self.codec = decoder.codec
        self.device = decoder.device
        self.dtype = dtype
        self.pinned = []
        for b in blobs:
            if isinstance(b, torch.Tensor) and b.is_pinned():
                self.pinned.append(b)
            else:
                src = b if isinstance(b, torch.Tensor) else torch.frombuffer(bytearray(b), dtype=torch.uint8)
                self.pinned.append(src.pin_memory())
        if not self.pinned:
            raise ValueError("no chunks")
        self.num_layers = self.codec.info.num_layers
        self.groups = layer_groups(self.num_layers, groups)
        self.verified = verified
        self.captured = None if captured is None else list(captured)
        if self.captured is not None:
            if len(self.captured) != len(self.pinned) or any(
                    cc is None or cc.prep.groups != self.groups or cc.keys.dtype != dtype for cc in self.captured):
                raise ValueError("captured chunks must be one per blob, made with the same layer groups and dtype")
            prepared = [cc.prep for cc in self.captured]
        if prepared is not None:
            if len(prepared) != len(self.pinned) or any(p.groups != self.groups for p in prepared):
                raise ValueError("prepared chunks must be one per blob, made with the same layer groups")
            self.prepared = list(prepared)
        else:
            self.prepared = [decoder.prepare(b, self.groups, verify=not verified) for b in self.pinned]
        pos = self.start_token = self.prepared[0].header.start
        for i, p in enumerate(self.prepared):
            if p.header.start != pos:
                raise ValueError(f"chunk {i} starts at token {p.header.start}, expected {pos} (chunks must be contiguous)")
            pos += p.header.tokens
        self.prefix_tokens = pos - self.start_token
        # runs of chunks decoded together (GpuDecoder.merge): one set of launches per (group, run)
        from ctxstream.codec.gpu import run_bounds

        bounds = (run_bounds(self.prepared, max_run_tokens) if merge and self.captured is None else
                  [(i, i + 1) for i in range(len(self.prepared))])  # (a run of one is the chunk itself)
        self.runs = [(i, j, decoder.merge(self.prepared[i:j], check=False)) for i, j in bounds]
        _, self.kv_heads, _, self.head_dim = self.prepared[0].header.shape
        self.threaded = threaded
        # chunk c is decoded on side stream c % streams: the chunks' kernels run side by side (one
        # rANS kernel's latency hardly depends on how many streams it decodes)
        # (default: 8 for transform-coded chunks; 1 where all are fp16 / quant8, whose copies are
        # bound by the one host-to-device link and are best issued in layer order)
        if streams is None:
            streams = 8 if any(p.plans is not None for p in self.prepared) else 1
        self.streams = [torch.cuda.Stream(self.device, priority=priority)
                        for _ in range(max(1, min(int(streams), len(self.runs))))]
        self.stream = self.streams[0]
        self._ready = [threading.Event() for _ in range(self.num_layers)]
        self._events: list[list[torch.cuda.Event]] = [[] for _ in range(self.num_layers)]
        self._pending: list = []  # PendingDecode objects, checked in finish()
        self._keys = self._values = None
        self._handed: set = set()  # streams the KV buffers were handed to
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._started = False
        self.done_event: torch.cuda.Event | None = None  # recorded after the last group

    # ------------------------------------------------------------------------------ producer
    def start(self) -> None:
        if self._started:
            return
        self._started = True
        # the side streams start after whatever the caller queued so far (e.g. buffers being filled)
        cur = torch.cuda.current_stream(self.device)
        for st in self.streams:
            st.wait_stream(cur)
        if self.threaded:
            self._thread = threading.Thread(target=self._produce, name="ctxstream-layer-decode", daemon=True)
            self._thread.start()
        else:
            self._produce()

    def _produce(self) -> None:
        try:
            with torch.cuda.device(self.device):
                if self.captured is not None:
                    self._queue_replays()
                else:
                    self._queue_decodes()
                for st in self.streams[1:]:
                    self.streams[0].wait_stream(st)
                self.done_event = torch.cuda.Event()
                self.done_event.record(self.streams[0])
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._error = exc
        finally:
            for ev in self._ready:
                ev.set()

    def _group_queued(self, group: list[int], used: int) -> None:
        """Every decode of layer ``group`` is queued on the first ``used`` streams: one event per stream,
        and the group's layers are ready for the consumer."""
        evs = []
        for st in self.streams[: min(len(self.streams), used)]:
            ev = torch.cuda.Event()
            ev.record(st)
            evs.append(ev)
        for layer in group:
            self._events[layer] = evs
            self._ready[layer].set()

    def _queue_decodes(self) -> None:
        """Per layer group, per run of chunks: its bytes' copies and kernels on side stream ``r % streams``,
        writing into one ``[layers, kv_heads, tokens, head_dim]`` buffer per K and V."""
        dev, dec, streams = self.device, self.decoder, self.streams
        ns = len(streams)
        with torch.cuda.stream(streams[0]):
            shape = (self.num_layers, self.kv_heads, self.prefix_tokens, self.head_dim)
            self._keys = torch.empty(shape, dtype=self.dtype, device=dev)
            self._values = torch.empty(shape, dtype=self.dtype, device=dev)
        for st in streams[1:]:  # written there too: not reused before those writes are done
            st.wait_stream(streams[0])
            self._keys.record_stream(st)
            self._values.record_stream(st)
        tables = []
        for r, (_, _, p) in enumerate(self.runs):
            with torch.cuda.stream(streams[r % ns]):
                tables.append(p.host.to(dev, non_blocking=True) if p.host is not None else None)
        starts = np.cumsum([0] + [p.header.tokens for p in self.prepared])
        for gi, group in enumerate(self.groups):
            g0, g1 = group[0], group[-1] + 1
            for r, (c0, c1, prep) in enumerate(self.runs):
                with torch.cuda.stream(streams[r % ns]):
                    o0, o1 = prep.spans[gi]
                    raw = torch.empty(o1 - o0, dtype=torch.uint8, device=dev)
                    if prep.parts is None:
                        raw.copy_(self.pinned[c0][o0:o1], non_blocking=True)
                    else:  # each member's group bytes into its place in the run's buffer
                        for m, a0, a1, dst in prep.parts[gi]:
                            raw[dst : dst + a1 - a0].copy_(self.pinned[c0 + m][a0:a1], non_blocking=True)
                    t0, t1 = int(starts[c0]), int(starts[c1])
                    out = (self._keys[g0:g1, :, t0:t1], self._values[g0:g1, :, t0:t1])
                    pend = dec.launch_prepared(prep, gi, raw, tables[r], out)
                if pend is not None:
                    self._pending.append(pend)
            self._group_queued(group, len(self.runs))

    def _queue_replays(self) -> None:
        """Captured chunks (``captured``): per layer group, each chunk's graph replayed on side stream
        ``c % streams`` (or, for a chunk decoded as it arrived, that stream waits for its decode);
        each chunk writes its own KV buffers."""
        streams, ns = self.streams, len(self.streams)
        for c, cc in enumerate(self.captured):
            cc.keys.record_stream(streams[c % ns])
            cc.values.record_stream(streams[c % ns])
        for gi, group in enumerate(self.groups):
            for c, cc in enumerate(self.captured):
                with torch.cuda.stream(streams[c % ns]):
                    self._pending.append(cc.decoded(gi))
            self._group_queued(group, len(self.captured))

    # ------------------------------------------------------------------------------ consumer
    def _buffers(self) -> list[torch.Tensor]:
        if self.captured is not None:
            return [b for cc in self.captured for b in (cc.keys, cc.values)]
        return [self._keys, self._values]

    def _wait(self, index: int) -> None:
        """Make the current stream wait (on the device) for layer ``index``, whose buffers are used there
        (the host waits only until the layer's work is queued: a threaded producer allocates them)."""
        self._ready[index].wait()
        if self._error is not None:
            raise self._error
        cur = torch.cuda.current_stream(self.device)
        for ev in self._events[index]:  # device-side waits: the host does not block
            cur.wait_event(ev)
        if cur not in self._handed:  # allocated on another stream, used (and freed) on this one
            for b in self._buffers():
                b.record_stream(cur)
            self._handed.add(cur)

    def layer_parts(self, index: int):
        if self.captured is None:
            return super().layer_parts(index)
        self._wait(index)
        return ([cc.keys[index][None] for cc in self.captured], [cc.values[index][None] for cc in self.captured])

    def layer(self, index: int):
        if self.captured is not None:
            return _joined(*self.layer_parts(index))
        self._wait(index)
        return self._keys[index][None], self._values[index][None]

    def finish(self) -> None:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        for p in self._pending:
            p.result()
        self._pending.clear()
        if self.done_event is not None:
            self.done_event.synchronize()


# ------------------------------------------------------------------------------------- cache
class PendingPrefixLayer(DynamicLayer):
    """A ``DynamicLayer`` that reports ``prefix_tokens`` before its KV exists and fetches it from the
    source at its first ``update``."""

    def __init__(self, source: LayerSource, index: int, **kwargs):
        super().__init__(**kwargs)
        self.source = source
        self.index = index
        self.pending = True

    def _take(self, like: torch.Tensor | None, dtype: torch.dtype | None = None, device=None,
              new: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Take the prefix from the source (``new``: the new tokens' KV, appended in the same copy)."""
        self.source.start()
        ks, vs = self.source.layer_parts(self.index)
        if like is not None:
            if ks[0].shape[1] != like.shape[1] or ks[0].shape[3] != like.shape[3]:
                raise ValueError(f"layer {self.index}: prefix KV {tuple(ks[0].shape)} does not fit the model's "
                                 f"{tuple(like.shape)}")
            dtype, device = like.dtype, like.device
        self.dtype, self.device = dtype, device
        ks = [k.to(device, dtype) for k in ks]
        vs = [v.to(device, dtype) for v in vs]
        if new is not None:
            ks.append(new[0])
            vs.append(new[1])
        self.keys = ks[0] if len(ks) == 1 else torch.cat(ks, -2)
        self.values = vs[0] if len(vs) == 1 else torch.cat(vs, -2)
        self.is_initialized = True
        self.pending = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.pending:  # prefix pieces and the new tokens joined in one copy (as DynamicLayer.update's cat)
            self._take(key_states, new=(key_states, value_states))
            return self.keys, self.values
        return super().update(key_states, value_states, *args, **kwargs)

    def get_seq_length(self) -> int:
        return self.source.prefix_tokens if self.pending else super().get_seq_length()

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        if self.pending:  # (query_length) in transformers 5.x; cache_position first in older 4.x
            q = args[-1] if args else kwargs.get("query_length", kwargs.get("cache_position"))
            q = q.shape[0] if isinstance(q, torch.Tensor) else int(q)
            return self.source.prefix_tokens + q, 0
        return super().get_mask_sizes(*args, **kwargs)

    def reset(self) -> None:
        self.pending = False
        super().reset()


class PipelinedCache(DynamicCache):
    """A ``DynamicCache`` whose layers take their prefix KV from ``source`` as the model reaches them."""

    def __init__(self, source: LayerSource, config=None):
        if config is not None:
            cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            types = getattr(cfg, "layer_types", None)
            if getattr(cfg, "sliding_window", None) and any(t != "full_attention" for t in (types or ["sliding"])):
                raise ValueError("PipelinedCache supports full-attention layers only")
            if cfg.num_hidden_layers != source.num_layers:
                raise ValueError(f"model has {cfg.num_hidden_layers} layers, the chunks {source.num_layers}")
        self.source = source
        Cache.__init__(self, layers=[PendingPrefixLayer(source, i) for i in range(source.num_layers)])

    def materialize(self, dtype: torch.dtype, device) -> None:
        """Take every pending layer now (for a caller that uses the cache without a forward pass first),
        then wait for the source and raise on its integrity errors."""
        for layer in self.layers:
            if getattr(layer, "pending", False):
                layer._take(None, dtype, torch.device(device))
        self.source.finish()

    @property
    def pending_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if getattr(layer, "pending", False)]
