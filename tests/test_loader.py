"""The loader end to end on loopback against the real streamer (tiny model; real model where marked slow)."""

from __future__ import annotations

import asyncio
import io
import json
import random
import urllib.request
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

pytest.importorskip("ctxstream.streamer.server")

from aiohttp import ClientSession, web  # noqa: E402

from ctxstream.model import cache_kw
from ctxstream.codec import Codec  # noqa: E402
from ctxstream.model import ModelAdapter  # noqa: E402
from ctxstream.loader import ContextLoader, FetchOptions, LoaderContext, LoaderError, PlanOptions, load_context  # noqa: E402
from ctxstream.loader.calibration import run_model  # noqa: E402
from ctxstream.policies import TEXT, Policy  # noqa: E402
from ctxstream.streamer.server import serve_in_background  # noqa: E402
from ctxstream.streamer.settings import Settings  # noqa: E402
from ctxstream.traces.shaping import RateShaper  # noqa: E402

TOKEN = "test-token-123"
N_TOKENS = 1000  # 4 chunks of 256 (the last 232)


def upload(url: str, ids: list[int]) -> dict:
    req = urllib.request.Request(url + "/v1/contexts", data=json.dumps({"token_ids": ids}).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def _gpu_reason():
    from ctxstream.codec import gpu

    return gpu.unavailable_reason()


@pytest.fixture(scope="module", params=["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def tiny(request):
    """The client's model and codec, per KV sink: ``cpu`` (the reference, CI) and ``gpu`` (the model on
    CUDA, GPU decode + layer-wise loading; skipped without CUDA + nvcc) -- every test runs on both."""
    adapter = ModelAdapter.tiny_random()
    if request.param == "gpu":
        reason = _gpu_reason()
        if reason is not None:
            pytest.skip(f"GPU sink needs CUDA + nvcc: {reason}")
        import copy

        adapter = ModelAdapter(copy.deepcopy(adapter.model).to("cuda"), adapter.tokenizer, adapter.name)
    return adapter, Codec.for_model(ModelAdapter.tiny_random())


@pytest.fixture(scope="module")
def server(tiny):
    _, codec = tiny
    adapter = ModelAdapter.tiny_random()  # the streamer computes on the CPU
    settings = Settings(model="tiny-random", store="memory", tokens={TOKEN: "acme"})
    with serve_in_background(settings, adapter=adapter, codec=codec) as srv:
        yield srv


@pytest.fixture(scope="module")
def context(server, tiny):
    rng = random.Random(7)
    ids = [rng.randrange(3, 500) for _ in range(N_TOKENS)]
    body = upload(server.url, ids)
    assert body["manifest"]["tokens"] == N_TOKENS
    return body["id"], ids


_CONTEXT = None


def fresh_context() -> LoaderContext:
    """A context of its own: no remembered throughput, calibrated in memory (small prefixes)."""
    return LoaderContext(persist=False, calibration_prefixes=(64, 256))


def shared_test_context() -> LoaderContext:
    """One context for the module's loaders (calibrated once)."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = fresh_context()
    return _CONTEXT


def loader(server, tiny, **kw) -> ContextLoader:
    adapter, codec = tiny
    kw.setdefault("token", TOKEN)
    kw.setdefault("codec", codec)
    kw.setdefault("context", shared_test_context())
    return ContextLoader(server.url, model=adapter, **kw)


def kv_close(a, b, atol):
    return all(torch.allclose(x.cpu(), y.cpu(), atol=atol, rtol=0) for x, y in zip(a, b))


def sink_of(adapter) -> str:
    return "gpu" if adapter.device.type == "cuda" else "cpu"


def local_greedy(adapter, ids, n):
    cache = adapter.make_cache()
    tok = int(run_model(adapter, cache, ids).argmax())
    out = [tok]
    while len(out) < n:
        tok = int(run_model(adapter, cache, [tok]).argmax())
        out.append(tok)
    return out


# --------------------------------------------------------------------------------- correctness
class _RecordingContext(LoaderContext):
    """A context whose sinks record every buffer they give the fetcher (None: the fetcher's own)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.given = []

    def sink_factory(self, kind):
        make = super().sink_factory(kind)

        def wrapped(adapter, codec):
            sink = make(adapter, codec)
            own = sink.receive_buffer

            def receive_buffer(nbytes):
                buf = own(nbytes)
                self.given.append((nbytes, buf))
                return buf

            sink.receive_buffer = receive_buffer
            return sink

        return wrapped


async def test_fetched_bodies_land_where_the_sink_says(server, tiny, context):
    """Every fetched body is received into the sink's buffer: pinned memory on the GPU sink (no copy
    after the last byte), the fetcher's own on the CPU sink; the KV is the same either way."""
    adapter, _ = tiny
    ctx, ids = context
    rec = _RecordingContext(persist=False, calibration_prefixes=(64, 256))
    async with loader(server, tiny, policy="fp16", slo_s=None, context=rec) as cl:
        res = await cl.load(ctx, prompt_ids=[10, 11])
    assert [r.final for r in res.report.chunks] == ["fp16"] * 4
    assert [n for n, _ in rec.given] == [r.bytes for r in res.report.chunks]
    if adapter.device.type == "cuda":
        assert all(buf is not None and buf.base.is_pinned() for _, buf in rec.given)
    else:
        assert all(buf is None for _, buf in rec.given)
    k, v = adapter.cache_to_tensors(res.cache, 0, N_TOKENS)
    assert kv_close((k, v), adapter.compute_kv(ids), atol=2e-3)


async def test_fp16_stream_equals_local_prefill(server, tiny, context):
    adapter, _ = tiny
    ctx, ids = context
    prompt = [10, 11, 12, 13]
    async with loader(server, tiny, policy="fp16", slo_s=None) as cl:
        res = await cl.load(ctx, prompt_ids=prompt)
    rep = res.report
    assert rep.sink == sink_of(adapter)  # the model on CUDA: GPU decode + layer-wise loading by default
    assert [r.final for r in rep.chunks] == ["fp16"] * 4 and rep.failures == [] and rep.retries == 0
    assert rep.bytes == sum(r.bytes for r in rep.chunks) > 0
    k, v = adapter.cache_to_tensors(res.cache, 0, N_TOKENS)
    k_ref, v_ref = adapter.compute_kv(ids)
    assert k.shape == k_ref.shape
    assert kv_close((k, v), (k_ref, v_ref), atol=2e-3)  # fp16 rounding
    # greedy generation on the streamed cache == generation after a full local prefill
    streamed = res.generate(12)
    assert streamed == local_greedy(adapter, ids + prompt, 12)
    # the HF API on a streamed cache (no prompt run by the loader) gives the same tokens
    async with loader(server, tiny, policy="fp16", slo_s=None) as cl:
        res2 = await cl.load(ctx)
    assert res2.first_token is None and res2.cache.get_seq_length() == N_TOKENS
    full = torch.tensor([ids + prompt], device=adapter.device)
    out = adapter.model.generate(input_ids=full, **cache_kw(adapter.model, res2.cache), max_new_tokens=12, do_sample=False,
                                 pad_token_id=0)
    assert out[0, full.shape[1]:].tolist() == streamed


async def test_recompute_gives_the_senders_kv(server, tiny, context):
    adapter, _ = tiny
    ctx, ids = context
    async with loader(server, tiny, policy="text", slo_s=None) as cl:
        res = await cl.load(ctx)
    rep = res.report
    assert [r.final for r in rep.chunks] == [TEXT] * 4 and rep.bytes == 0
    assert all(r.recompute_s > 0 for r in rep.chunks)
    k_ref, v_ref = adapter.compute_kv(ids)  # what the streamer computed and encoded
    assert kv_close(adapter.cache_to_tensors(res.cache), (k_ref, v_ref), atol=1e-4)
    assert rep.quality == 1.0


async def test_lossy_levels_decode_and_report(server, tiny, context):
    adapter, _ = tiny
    ctx, ids = context
    k_ref, v_ref = adapter.compute_kv(ids)
    errs = {}
    for lv in ("q0", "q4", "quant8"):
        async with loader(server, tiny, policy=f"fixed:{lv}", slo_s=None) as cl:
            res = await cl.load(ctx)
        assert [r.final for r in res.report.chunks] == [lv] * 4
        k, v = adapter.cache_to_tensors(res.cache)
        errs[lv] = float((k - k_ref).abs().mean() + (v - v_ref).abs().mean())
        d = res.report.to_dict()
        json.dumps(d)
        assert d["choices"] == {lv: 4} and len(d["chunks"]) == 4
        # the report's quality is 1 - the streamer's per-chunk estimates (manifest) of what was loaded
        assert all(lv in c.quality for c in res.manifest.chunks)
        assert d["quality"] == pytest.approx(1.0 - sum(c.quality[lv] for c in res.manifest.chunks))
    assert errs["q0"] < errs["q4"] and errs["quant8"] < errs["q4"]


async def test_profile_is_fetched_from_the_server(server, tiny, context, tmp_path, monkeypatch):
    adapter, codec = tiny
    ctx, ids = context
    lctx = LoaderContext(cache_dir=tmp_path, persist=False, calibration_prefixes=(64, 256))  # no local profile
    async with ContextLoader(server.url, model=adapter, policy="fixed:q2", slo_s=None, token=TOKEN,
                             context=lctx) as cl:
        res = await cl.load(ctx)
    assert [r.final for r in res.report.chunks] == ["q2"] * 4
    got = lctx.codecs[(adapter.info.fingerprint, codec.profile.id)]
    assert got.profile.id == codec.profile.id
    # the levels first met in that load were calibrated after it (not inside its budget)
    assert "q2" in cl.calibration.decode.s_per_token


async def test_auth_and_unknown_context_fail_clearly(server, tiny, context):
    ctx, _ = context
    async with loader(server, tiny, policy="fp16", token=None) as cl:
        with pytest.raises(LoaderError, match="401"):
            await cl.load(ctx)
    async with loader(server, tiny, policy="fp16") as cl:
        with pytest.raises(LoaderError, match="404"):
            await cl.load("0" * 32)


# --------------------------------------------------------------------------------- adaptation
async def test_slo_choices_move_with_rate(server, tiny, context):
    """Under each fixed (in-process shaped) rate the slo policy's quality rises with the rate and
    the SLO is met (text recompute of the tiny model is always fast enough, so it is feasible: on
    the slow links slo recomputes, lossless, instead of fetching a lossy level)."""
    ctx, _ = context
    slo = 0.6
    quality, finals = {}, {}
    for rate in (0.3e6, 3e6, 30e6, 1e9):
        # a 4 KiB bucket: the default one (5 ms of the rate, 18.75 KB at 30 Mbit/s) refills while the
        # first chunks are recomputed, and a body here is ~35 KB, so half of it would pass at loopback
        # speed and the forecast would rightly read a link up to ~2-3x the nominal rate
        shaper = RateShaper(rate, burst_bytes=4096)
        async with loader(server, tiny, policy="slo", slo_s=slo, shaper=shaper, plan=PlanOptions(prior_bps=rate)) as cl:
            # the prior is the configured rate; each later chunk uses the measured throughput
            res = await cl.load(ctx, prompt_ids=[5, 6])
        rep = res.report
        quality[rate] = rep.quality
        finals[rate] = [r.final for r in rep.chunks]
        assert rep.slo_met, (rate, rep.ttft_s, [r.final for r in rep.chunks])
        if rate <= 30e6:  # the shaper, not loopback, limits the forecast
            assert all(r.predicted_bps < rate * 2 for r in rep.chunks)
            assert rep.final_bps is None or rep.final_bps < rate * 2
    rates = sorted(quality)
    # (estimates below 1e-6 -- fp16 and quant8 of this tiny model -- count as exact: on slow links
    # text is exact, on fast ones the lossless-ish levels are fetched)
    qs = [quality[r] for r in rates]
    assert all(b >= a - 1e-6 for a, b in zip(qs, qs[1:])), (quality, finals)
    assert quality[rates[-1]] >= 1.0 - 1e-6 and TEXT in finals[rates[0]] and set(finals[rates[-1]]) - {TEXT}


async def test_mpc_meets_slo_on_a_slow_link(server, tiny, context):
    ctx, _ = context
    async with loader(server, tiny, policy="mpc", slo_s=0.6, shaper=RateShaper(1e6), plan=PlanOptions(prior_bps=1e6)) as cl:
        res = await cl.load(ctx, prompt_ids=[5])
    assert res.report.slo_met and res.cache.get_seq_length() == N_TOKENS + 1


async def test_throughput_prior_is_remembered_per_server(server, tiny, context):
    ctx, _ = context
    async with loader(server, tiny, policy="fp16", slo_s=None, shaper=RateShaper(5e6), context=fresh_context()) as cl:
        first = await cl.load(ctx)
        second = await cl.load(ctx)
    assert first.report.prior_bps == 10e6  # the conservative default
    assert second.report.prior_bps == first.report.final_bps  # learned from the first load
    assert 2.5e6 < second.report.prior_bps < 10e6


# --------------------------------------------------------------------------------- faults
class CuttingProxy:
    """Loopback proxy to the streamer that cuts chosen chunk responses mid-body or corrupts them."""

    def __init__(self, upstream: str, cut: dict[int, int] | None = None, corrupt: dict[int, int] | None = None,
                 stall: dict[int, int] | None = None):
        self.upstream, self.cut, self.corrupt = upstream, dict(cut or {}), dict(corrupt or {})
        self.stall = dict(stall or {})
        self.log: list[tuple[int | None, str | None, int]] = []  # (chunk, range header, status)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        fwd = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "range", "if-range")}
        async with ClientSession() as s:
            async with s.get(self.upstream + request.path_qs, headers=fwd) as up:
                body = await up.read()
                status, headers = up.status, {k: v for k, v in up.headers.items()
                                              if k.lower() not in ("content-length", "transfer-encoding", "server", "date")}
        chunk = int(request.match_info["i"]) if "i" in request.match_info else None
        self.log.append((chunk, request.headers.get("Range"), status))
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = len(body)
        if chunk is not None and self.corrupt.get(chunk, 0) > 0:
            self.corrupt[chunk] -= 1
            body = bytearray(body)
            body[len(body) // 2] ^= 0xFF
            body = bytes(body)
        await resp.prepare(request)
        if chunk is not None and self.cut.get(chunk, 0) > 0:
            self.cut[chunk] -= 1
            await resp.write(body[: len(body) // 2])
            await asyncio.sleep(0.01)
            request.transport.close()  # connection reset mid-body
            return resp
        if chunk is not None and self.stall.get(chunk, 0) > 0:
            self.stall[chunk] -= 1
            await resp.write(body[: len(body) // 3])
            await asyncio.sleep(3.0)  # the link goes silent mid-body
            request.transport.close()
            return resp
        await resp.write(body)
        await resp.write_eof()
        return resp

    async def __aenter__(self):
        app = web.Application()
        app.router.add_get("/v1/contexts/{cid}/chunks/{i}", self.handle)
        app.router.add_get("/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()


async def test_chunk_cut_mid_transfer_resumes_with_range(server, tiny, context):
    adapter, codec = tiny
    ctx, ids = context
    async with CuttingProxy(server.url, cut={1: 1, 3: 2}) as proxy:
        async with ContextLoader(proxy.url, model=adapter, policy="fp16", slo_s=None, token=TOKEN, codec=codec,
                                 context=fresh_context()) as cl:
            res = await cl.load(ctx)
    rep = res.report
    assert [r.final for r in rep.chunks] == ["fp16"] * 4
    assert rep.chunks[1].retries == 1 and rep.chunks[3].retries == 2 and rep.retries == 3
    assert rep.chunks[1].recovered == "range-resume" and rep.failures and rep.failures[0]["chunk"] == 1
    ranged = [(c, r, s) for c, r, s in proxy.log if r]
    assert ranged and all(s == 206 for _, _, s in ranged) and {c for c, _, _ in ranged} == {1, 3}
    k_ref, v_ref = adapter.compute_kv(ids)
    assert kv_close(adapter.cache_to_tensors(res.cache), (k_ref, v_ref), atol=2e-3)


async def test_fetcher_receives_into_the_callers_buffer_across_a_range_resume(server, tiny, context):
    """``Fetcher.chunk(into=...)``: the body lands in the buffer the caller gives (what a sink reads
    directly), also when the transfer is cut and resumed with a Range request; ``into`` giving None
    leaves the fetcher its own buffer; a buffer of the wrong size is refused."""
    import numpy as np

    from ctxstream.loader.fetcher import Fetcher
    from ctxstream.loader.throughput import ThroughputEstimator

    adapter, codec = tiny
    ctx, _ = context
    async with loader(server, tiny, policy="fp16", slo_s=None) as cl:
        man = await cl.fetch_manifest(ctx)
    given = []

    def into(n):
        given.append(np.full(n, 0xAB, np.uint8))  # (not zeros: every byte must be written)
        return given[-1]

    est = ThroughputEstimator(1e9)
    direct = Fetcher(server.url, token=TOKEN)
    try:
        own = await direct.chunk(ctx, man.chunks[1], "fp16", est, codec.limits)
    finally:
        await direct.close()
    async with CuttingProxy(server.url, cut={1: 1}) as proxy:
        f = Fetcher(proxy.url, token=TOKEN)
        try:
            got = await f.chunk(ctx, man.chunks[1], "fp16", est, codec.limits, into=into)
            assert got.data is given[-1] and got.verified and got.retries == 1 and got.recovered == "range-resume"
            assert bytes(memoryview(got.data)) == bytes(own.data)
            assert len(given) == 1  # one buffer for the whole fetch, resumed in place
            none = await f.chunk(ctx, man.chunks[2], "fp16", est, codec.limits, into=lambda n: None)
            assert codec.header(none.data).start == man.chunks[2].start and none.verified
            with pytest.raises(ValueError, match="writable buffer"):
                await f.chunk(ctx, man.chunks[0], "fp16", est, codec.limits, into=lambda n: np.empty(n - 1, np.uint8))
        finally:
            await f.close()


async def test_unfetchable_chunk_is_recomputed_and_corruption_refetched(server, tiny, context):
    adapter, codec = tiny
    ctx, ids = context
    async with CuttingProxy(server.url, cut={2: 100}, corrupt={0: 1}) as proxy:
        async with ContextLoader(proxy.url, model=adapter, policy="fp16", slo_s=None, token=TOKEN, codec=codec,
                                 fetch=FetchOptions(max_retries=2), context=fresh_context()) as cl:
            res = await cl.load(ctx)
    rep = res.report
    assert [r.final for r in rep.chunks] == ["fp16", "fp16", TEXT, "fp16"]
    assert rep.chunks[2].recovered == "recomputed" and rep.chunks[2].choice == "fp16"
    assert rep.chunks[0].recovered == "refetch" and "checksum" in rep.chunks[0].error
    assert {f["chunk"] for f in rep.failures} == {0, 2}
    k_ref, v_ref = adapter.compute_kv(ids)
    assert kv_close(adapter.cache_to_tensors(res.cache), (k_ref, v_ref), atol=2e-3)


async def test_stalled_transfer_times_out_and_resumes(server, tiny, context):
    adapter, codec = tiny
    ctx, _ = context
    async with CuttingProxy(server.url, stall={2: 1}) as proxy:
        async with ContextLoader(proxy.url, model=adapter, policy="quant8", slo_s=None, token=TOKEN, codec=codec,
                                 fetch=FetchOptions(stall_timeout_s=0.3), context=fresh_context()) as cl:
            res = await cl.load(ctx)
    row = res.report.chunks[2]
    assert row.final == "quant8" and row.retries == 1 and row.recovered == "range-resume"
    assert "Timeout" in row.error and row.fetch_s < 2.5
    assert res.cache.get_seq_length() == N_TOKENS


async def test_level_the_client_cannot_decode_is_dropped(server, tiny, context):
    """A level whose parameters differ from the client's codec (e.g. after a codec upgrade) fails to
    decode: that chunk is recomputed and the policy is no longer offered the level."""
    from dataclasses import replace

    from ctxstream.codec.codec import DEFAULT_LEVELS

    adapter, codec = tiny
    ctx, ids = context
    other = [replace(s, step=s.step * 1.5) if s.name == "q2" else s for s in DEFAULT_LEVELS]
    client_codec = Codec(adapter.info, codec.profile, levels=other)
    class BestLevel(Policy):  # always fetch the best level offered (slo would recompute: it is lossless)
        def select(self, state):
            return state.levels[0]

    async with loader(server, tiny, policy=BestLevel(), slo_s=None, codec=client_codec, plan=PlanOptions(levels=("q2", "q3")),
                      shaper=RateShaper(1e6)) as cl:
        res = await cl.load(ctx)
    rep = res.report
    finals = [r.final for r in rep.chunks]
    assert "q2" not in finals and finals[-1] == "q3" and finals[0] == TEXT, finals
    assert rep.chunks[0].choice == "q2" and "differ" in rep.chunks[0].error
    k_ref, v_ref = adapter.compute_kv(ids)
    k, v = adapter.cache_to_tensors(res.cache)
    assert k.shape == k_ref.shape and torch.allclose(k[:, :, :256], k_ref[:, :, :256], atol=1e-4)


# --------------------------------------------------------------------------------- sync + CLI
def test_sync_wrapper_and_cli_ask_json(server, tiny, context):
    adapter, codec = tiny
    ctx, _ = context
    res = load_context(server.url, ctx, model=adapter, policy="slo", slo_s=5.0, token=TOKEN, codec=codec,
                       context=fresh_context())
    assert res.report.slo_met and res.cache.get_seq_length() == N_TOKENS

    from ctxstream.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(["ask", "--server", server.url, "--context", ctx, "--model", "tiny-random", "--token", TOKEN,
                   "--device", adapter.device.type,
                   "--policy", "slo", "--slo", "5", "--rate", "100mbit", "--max-new-tokens", "5", "--json",
                   "what is it?"])
    assert rc == 0, err.getvalue()
    rep = json.loads(out.getvalue())
    assert rep["sink"] == sink_of(adapter)  # --device cuda: the GPU sink by default
    assert rep["slo_met"] is True and rep["ttft_s"] > 0 and len(rep["chunks"]) == 4
    assert {"index", "final", "bytes", "fetch_s", "decode_s", "recompute_s", "throughput_bps"} <= set(rep["chunks"][0])
    assert isinstance(rep["answer"], str)
    assert "chunk 1/4" in err.getvalue() and "first token" in err.getvalue()


# --------------------------------------------------------------------------------- parts
def test_calibration_is_measured_and_persisted(tiny, tmp_path):
    from ctxstream.loader.calibration import (Calibration, calibrate_decode, calibrate_recompute, load_calibration,
                                              save_calibration)

    adapter, codec = tiny
    rec = calibrate_recompute(adapter, prefixes=(128, 512), repeats=1)
    assert len(rec.samples) == 6 and all(s > 0 for *_, s in rec.samples)
    assert rec.step_s(512) >= rec.step_s(0) > 0 and rec.prompt_s(3, 100) > 0
    assert [k[0] for k in rec.knots] == [128, 256, 640] and rec.knots[2][1] >= rec.knots[1][1] >= rec.knots[0][1]
    assert rec.seconds(256, 0) > rec.seconds(64, 0) > 0 and rec.seconds(64, 4096) >= rec.seconds(64, 0)
    dec = calibrate_decode(adapter, codec, ["fp16", "q2"], tokens=16)
    assert set(dec.s_per_token) == {"fp16", "q2"} and dec.seconds("q2", 256) > 0
    assert dec.bytes_per_token["fp16"] > dec.bytes_per_token["q2"] and dec.apply_s_per_token > 0
    cal = Calibration(adapter.info.name, adapter.info.fingerprint, rec, dec)
    cal.observe("q2", 256, 0, 2.0 * dec.seconds("q2", 256))  # twice the calibrated time: halfway there
    assert cal.decode_factor == pytest.approx(2 ** 0.5) and cal.ingest_s("q2", 256) == pytest.approx(
        dec.seconds("q2", 256) * 2 ** 0.5)
    # many chunks decided before any was measured report the same slowness: the factor settles at
    # it (measured against the calibrated model, not each chunk's stale estimate) instead of a clamp
    for _ in range(12):
        cal.observe("q2", 256, 0, 2.0 * dec.seconds("q2", 256))
    assert cal.decode_factor == pytest.approx(2.0, rel=1e-3)
    cal.observe("text", 128, 512, 0.5 * rec.seconds(128, 512))
    assert cal.recompute_factor == pytest.approx(0.5 ** 0.5)
    path = tmp_path / "cal.json"
    save_calibration(path, cal)
    got = load_calibration(path)
    assert got.recompute.seconds(100, 100) == pytest.approx(rec.seconds(100, 100))
    assert got.decode.s_per_token == dec.s_per_token and got.decode_factor == cal.decode_factor
    assert load_calibration(path, max_age_s=-1) is None
    assert load_calibration(tmp_path / "missing.json") is None


def test_calibration_once_per_machine_on_disk_for_any_context_length(tiny, tmp_path, monkeypatch):
    import ctxstream.loader.context as lc

    adapter, codec = tiny
    first = LoaderContext(cache_dir=tmp_path, calibration_prefixes=(64, 256))
    cal = first.calibration(adapter, "cpu", codec)
    assert {"fp16", "quant8", "q2"} <= set(cal.decode.s_per_token)
    assert list((tmp_path / "calibration").glob(f"{adapter.info.fingerprint}-cpu-*.json"))
    # any context length: the fit extrapolates (grows with the prefix), no new measurement
    assert cal.recompute_s(256, 16384) >= cal.recompute_s(256, 4096) >= cal.recompute_s(256, 0) > 0

    def no_measuring(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(lc, "calibrate_recompute", no_measuring)
    monkeypatch.setattr(lc, "calibrate_decode", no_measuring)
    again = LoaderContext(cache_dir=tmp_path).calibration(adapter, "cpu", codec)  # a new process, say
    assert again.decode.s_per_token == cal.decode.s_per_token


async def test_calibration_is_never_inside_the_load_budget(server, tiny, context, monkeypatch):
    """A loader opened without calibrating measures in its first load, off the SLO clock."""
    import time as _time

    import ctxstream.loader.context as lc

    adapter, codec = tiny
    ctx, _ = context
    real = lc.calibrate_recompute

    def slow(*a, **k):
        _time.sleep(1.5)  # a busy host
        return real(*a, **k)

    monkeypatch.setattr(lc, "calibrate_recompute", slow)
    async with loader(server, tiny, policy="slo", slo_s=1.0, context=fresh_context(), plan=PlanOptions(calibrate_on_open=False)) as cl:
        t = _time.perf_counter()
        res = await cl.load(ctx, prompt_ids=[5])
        wall = _time.perf_counter() - t
    assert wall > 1.5 and res.report.ttft_s < wall - 1.4 and res.report.slo_met
    assert res.report.calibration["sink"] == sink_of(adapter)


def test_throughput_estimator():
    from ctxstream.loader import ThroughputEstimator

    est = ThroughputEstimator(10e6, window=3, min_sample_bytes=1000)
    assert est.estimate() == 10e6 and est.error() == 0.0
    est.add(500, 1e-6)  # too small to say anything: pooled
    assert est.samples == 0 and est.estimate() == 10e6
    est.add(500, 0.001)  # pooled: 1000 bytes in ~1 ms = 8 Mbit/s
    assert est.samples == 1 and est.estimate() == pytest.approx(8e6, rel=1e-3)
    assert est.error() == pytest.approx(0.25, rel=1e-2)  # forecast 10 vs actual 8
    for _ in range(3):
        est.add(10_000, 0.01)  # 8 Mbit/s
    est.add(10_000, 0.001)  # one fast outlier: 80 Mbit/s
    assert est.estimate() == pytest.approx(3 / (2 / 8e6 + 1 / 80e6), rel=1e-6)  # harmonic mean: not fooled
    assert est.error() == pytest.approx(0.9, rel=1e-3)


# --------------------------------------------------------------------------------- real model
@pytest.fixture(scope="module")
def real_server():
    adapter = ModelAdapter.load()
    codec = Codec.for_model(adapter)
    settings = Settings(store="memory", tokens={TOKEN: "acme"})
    with serve_in_background(settings, adapter=adapter, codec=codec) as srv:
        yield srv, adapter, codec


@pytest.mark.slow
async def test_real_model_fp16_generation_matches_local_prefill(real_server):
    srv, adapter, codec = real_server
    from ctxstream.codec.profile import calibration_text
    from ctxstream.loader import chat_prompt_ids

    ids = adapter.tokenize(calibration_text()[20000:23000])[:600]
    ctx = upload(srv.url, ids)["id"]
    prompt = chat_prompt_ids(adapter, "Summarise the text above in one sentence.", ids)
    async with ContextLoader(srv.url, model=adapter, policy="fp16", slo_s=None, token=TOKEN, codec=codec,
                             context=fresh_context()) as cl:
        res = await cl.load(ctx, prompt_ids=prompt)
    async with ContextLoader(srv.url, model=adapter, policy="text", slo_s=None, token=TOKEN, codec=codec) as cl:
        text_res = await cl.load(ctx)  # calibration is cached per model: no second measurement
    assert [r.final for r in res.report.chunks] == ["fp16"] * 3
    streamed = res.generate(16)
    assert streamed == local_greedy(adapter, ids + prompt, 16)
    k_ref, v_ref = adapter.compute_kv(ids)
    assert kv_close(adapter.cache_to_tensors(text_res.cache), (k_ref, v_ref), atol=1e-3)
    assert kv_close(adapter.cache_to_tensors(res.cache, 0, len(ids)), (k_ref, v_ref), atol=0.05)



# --------------------------------------------------------------------------------- rebuilt parts
class Alternate(Policy):
    """text for odd chunks, fp16 for even ones: recomputes land between fetched chunks."""

    name = "alternate"

    def select(self, state):
        return TEXT if state.index % 2 else "fp16"


async def test_recompute_between_fetched_chunks_gives_the_senders_kv(server, tiny, context):
    adapter, _ = tiny
    ctx, ids = context
    prompt = [7, 8, 9]
    async with loader(server, tiny, policy=Alternate(), slo_s=None) as cl:
        res = await cl.load(ctx, prompt_ids=prompt)
    assert [r.final for r in res.report.chunks] == ["fp16", TEXT, "fp16", TEXT]
    k_ref, v_ref = adapter.compute_kv(ids)
    assert kv_close(adapter.cache_to_tensors(res.cache, 0, N_TOKENS), (k_ref, v_ref), atol=2e-3)
    assert res.generate(8) == local_greedy(adapter, ids + prompt, 8)


async def test_a_body_of_another_level_is_refetched_then_recomputed(server, tiny, context):
    """The fetcher checks that the chunk's header carries the level, start and length asked for."""
    from ctxstream.loader import FetchFailed
    from ctxstream.loader.fetcher import Fetcher, FetchOptions
    from ctxstream.loader.throughput import ThroughputEstimator

    adapter, codec = tiny
    ctx, _ = context

    async def swap(request):  # serves q4 whatever level is asked for
        async with ClientSession() as s:
            async with s.get(server.url + request.path, params={"level": "q4"},
                             headers={"Authorization": request.headers.get("Authorization", "")}) as up:
                return web.Response(status=up.status, body=await up.read())

    app = web.Application()
    app.router.add_get("/v1/contexts/{cid}/chunks/{i}", swap)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    try:
        async with loader(server, tiny, policy="fp16", slo_s=None) as cl:
            man = await cl.fetch_manifest(ctx)
        # a manifest entry without sizes or checksums: only the header can tell
        from dataclasses import replace

        entry = replace(man.chunks[1], sizes={}, checksums={})
        f = Fetcher(url, token=TOKEN, options=FetchOptions(max_retries=3))
        try:
            with pytest.raises(FetchFailed, match="asked for q2"):
                await f.chunk(ctx, entry, "q2", ThroughputEstimator(1e9), codec.limits)
            got = await f.chunk(ctx, entry, "q4", ThroughputEstimator(1e9), codec.limits)
            assert got.level == "q4" and codec.header(got.data).level == "q4" and not got.verified
        finally:
            await f.close()
    finally:
        await runner.cleanup()


async def test_every_finished_load_is_handed_to_metrics(server, tiny, context):
    from ctxstream.loader.metrics import LoaderMetrics

    ctx, _ = context
    m = LoaderMetrics()
    async with loader(server, tiny, policy="fp16", slo_s=30.0, metrics=m) as cl:
        await cl.load(ctx, prompt_ids=[5])
        await cl.load(ctx, prompt_ids=[5])
    text = m.render().decode()
    assert 'ctxstream_loader_chunks_total{choice="fp16",policy="fixed:fp16"} 8.0' in text
    assert 'ctxstream_loader_loads_total{outcome="met",policy="fixed:fp16"} 2.0' in text
    assert 'ctxstream_loader_ttft_seconds_count{policy="fixed:fp16"} 2.0' in text


def test_one_slo_default_for_api_and_cli():
    import argparse

    from ctxstream.loader import DEFAULT_SLO_S, cli

    p = argparse.ArgumentParser()
    cli.register(p.add_subparsers())
    args = p.parse_args(["ask", "q", "--server", "http://x", "--context", "c"])
    assert args.slo is None  # resolved to the loader's default in cmd_ask
    cl = ContextLoader("http://x", model=ModelAdapter.tiny_random(), context=fresh_context())
    assert cl.slo_s == DEFAULT_SLO_S


def test_retries_share_one_backoff():
    from ctxstream.loader.fetcher import backoff_s

    waits = [backoff_s(a) for a in range(1, 10)]
    assert waits == sorted(waits) and waits[0] > 0 and max(waits) == 0.5
