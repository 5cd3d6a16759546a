"""What loaders share across loads: calibrations, codecs, GPU decoders and throughput priors.

One :class:`LoaderContext` is injected into every :class:`~ctxstream.loader.core.ContextLoader`
(``context=``); loaders without one share :func:`shared_context` (one per process). A benchmark,
replay or test that wants a clean slate makes its own ``LoaderContext()`` -- nothing is reset from
outside.

Calibration: measured once per machine, model and KV sink (:meth:`LoaderContext.calibration`; the
recompute fit holds for any context length), kept on disk under
``<cache_dir>/calibration/<fingerprint>-<sink>-<device>.json`` (``persist=False``: in memory only),
corrected online by every load (:meth:`LoaderContext.observe`) and saved again after the load -- a
load never measures inside its SLO budget. Levels the calibration has not seen (a profile first
fetched by a load) are estimated as the slowest calibrated level, corrected online, and measured
after that load (:meth:`LoaderContext.calibrate_levels`).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from ctxstream.codec import Codec, CodecError, Profile
from ctxstream.model import ModelAdapter, default_cache_dir

from .calibration import Calibration, calibrate_decode, calibrate_recompute, load_calibration, save_calibration

log = logging.getLogger(__name__)

DEFAULT_PRIOR_BPS = 10e6  # conservative first guess for a server never seen before (10 Mbit/s)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")
    return device.type


class LoaderContext:
    """Shared state of loaders (see the module docstring).

    ``cache_dir``: where calibrations and local profiles live (default ``~/.cache/ctxstream``);
    ``persist``: keep calibrations on disk; ``prior_bps``: throughput prior for a server never seen;
    ``calibration_prefixes``: prefix lengths the recompute fit is measured at (it extrapolates beyond);
    ``gpu_graphs``: the GPU sink records each chunk's decode as CUDA graphs as it arrives
    (:class:`~ctxstream.loader.sink.GpuSink`).
    """

    def __init__(self, *, cache_dir: str | Path | None = None, persist: bool = True,
                 prior_bps: float = DEFAULT_PRIOR_BPS, calibration_prefixes: tuple[int, ...] = (2048, 8192),
                 gpu_graphs: bool = False):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.persist = bool(persist)
        self.prior_bps = float(prior_bps)
        self.calibration_prefixes = tuple(int(p) for p in calibration_prefixes)
        self.gpu_graphs = bool(gpu_graphs)
        self.server_bps: dict[str, float] = {}  # server url -> last throughput estimate
        self.codecs: dict[tuple[str, str], Codec] = {}  # (fingerprint, profile id) -> codec
        self._calibrations: dict[tuple[str, str, str], Calibration] = {}  # (fingerprint, sink, device) ->
        self._decoders: dict[tuple[int, str], object] = {}  # (id(codec), device) -> GpuDecoder
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ throughput priors
    def throughput_prior(self, server_url: str) -> float:
        return self.server_bps.get(server_url.rstrip("/"), self.prior_bps)

    def remember_throughput(self, server_url: str, bps: float) -> None:
        self.server_bps[server_url.rstrip("/")] = float(bps)

    # ------------------------------------------------------------------ codecs and decoders
    def local_codec(self, adapter: ModelAdapter) -> Codec:
        """A codec from a profile cached on this machine (never built here), else reference formats only."""
        fp = adapter.info.fingerprint
        for (f, pid), c in self.codecs.items():
            if f == fp and pid:
                return c
        path = self.cache_dir / "profiles" / f"{fp}.ctxp"
        if path.is_file():
            try:
                prof = Profile.from_bytes(path.read_bytes())
                if prof.fingerprint == fp:
                    return self.add_codec(Codec(adapter.info, prof))
            except (CodecError, OSError) as exc:
                log.warning("ignoring unreadable local profile %s: %s", path, exc)
        return Codec(adapter.info, None)

    def add_codec(self, codec: Codec) -> Codec:
        if codec.profile is not None:
            self.codecs[(codec.info.fingerprint, codec.profile.id)] = codec
        return codec

    def gpu_decoder(self, codec: Codec, device: torch.device):
        """One GPU decoder per codec and device (its level tables and RoPE tables are reused)."""
        from ctxstream.codec import gpu

        key = (id(codec), str(device))
        with self._lock:
            dec = self._decoders.get(key)
            if dec is None or dec.codec is not codec:
                dec = self._decoders[key] = gpu.GpuDecoder(codec, device)
            return dec

    def sink_factory(self, kind: str):
        """``(adapter, codec) -> KvSink`` of ``kind`` (the GPU sink with this context's decoders)."""
        from .sink import GpuSink, make_sink

        if kind == "gpu":
            return lambda adapter, codec: GpuSink(adapter, codec, decoder=self.gpu_decoder(codec, adapter.device),
                                                  graphs=self.gpu_graphs)
        return lambda adapter, codec: make_sink(kind, adapter, codec)

    # ------------------------------------------------------------------ calibration
    def _key(self, adapter: ModelAdapter, sink: str) -> tuple[str, str, str]:
        return adapter.info.fingerprint, sink, _device_name(adapter.device)

    def _path(self, key) -> Path:
        return self.cache_dir / "calibration" / f"{key[0]}-{key[1]}-{key[2]}.json"

    def cached_calibration(self, adapter: ModelAdapter, sink: str) -> Calibration | None:
        return self._calibrations.get(self._key(adapter, sink))

    def calibration(self, adapter: ModelAdapter, sink: str, codec: Codec) -> Calibration:
        """This machine's speeds for ``adapter`` with ``sink``: from memory, else from disk, else measured
        (recompute, and every level of ``codec`` the calibration lacks). Blocking: call it off the event
        loop, before a load (``ContextLoader.open`` does)."""
        key = self._key(adapter, sink)
        with self._lock:
            cal = self._calibrations.get(key)
            if cal is None and self.persist:
                cal = load_calibration(self._path(key))
                if cal is not None and cal.fingerprint != key[0]:
                    cal = None
            changed = False
            if cal is None:
                rec = calibrate_recompute(adapter, prefixes=self.calibration_prefixes)
                cal = Calibration(adapter.info.name, key[0], rec, None, sink=sink, device=key[2])
                changed = True
            self._calibrations[key] = cal
            changed |= self._calibrate_missing(adapter, cal, codec)
            if changed:
                self.save(cal)
            return cal

    def missing_levels(self, cal: Calibration, codec: Codec) -> list[str]:
        have = cal.decode.s_per_token if cal.decode is not None else {}
        return [lv for lv in codec.all_levels if lv not in have and (lv in ("fp16", "quant8") or codec.profile)]

    def calibrate_levels(self, adapter: ModelAdapter, sink: str, codec: Codec) -> bool:
        """Measure the levels of ``codec`` that the calibration lacks (blocking; after a load)."""
        with self._lock:
            cal = self._calibrations.get(self._key(adapter, sink))
            if cal is None:
                return False
            changed = self._calibrate_missing(adapter, cal, codec)
            if changed:
                self.save(cal)
            return changed

    def _calibrate_missing(self, adapter, cal: Calibration, codec: Codec) -> bool:
        missing = self.missing_levels(cal, codec)
        if not missing:
            return False
        # the GPU's per-token costs are small next to its per-call ones: a longer sample resolves them
        tokens = 256 if cal.sink == "gpu" else 48
        new = calibrate_decode(adapter, codec, missing, sink=self.sink_factory(cal.sink), tokens=tokens)
        if cal.decode is None:
            cal.decode = new
        else:
            cal.decode.s_per_token.update(new.s_per_token)
            cal.decode.s_per_chunk.update(new.s_per_chunk)
            cal.decode.bytes_per_token.update(new.bytes_per_token)
            cal.decode.seconds_taken += new.seconds_taken
            if new.apply_s_per_token:
                cal.decode.apply_s_per_token = new.apply_s_per_token
                cal.decode.apply_s_per_call = new.apply_s_per_call
        cal.profile = codec.profile.id if codec.profile is not None else cal.profile
        return bool(new.s_per_token)

    def save(self, cal: Calibration) -> None:
        if not self.persist:
            return
        try:
            save_calibration(self._path((cal.fingerprint, cal.sink, cal.device)), cal)
        except OSError as exc:
            log.warning("cannot save the calibration: %s", exc)


_SHARED: LoaderContext | None = None
_SHARED_LOCK = threading.Lock()


def shared_context() -> LoaderContext:
    """The process's default context (for loaders given none)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = LoaderContext()
        return _SHARED
