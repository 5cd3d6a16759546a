"""The policies' hedge end to end: a fetch running past ``Policy.fetch_timeout_s`` is abandoned and
the chunk recomputed (loopback streamer, tiny model, the stalling proxy of test_loader)."""

from __future__ import annotations

import pytest

pytest.importorskip("ctxstream.streamer.server")

from ctxstream.loader import ContextLoader, FetchOptions, LoaderContext  # noqa: E402
from ctxstream.policies import TEXT, FixedPolicy  # noqa: E402
from tests.test_loader import TOKEN, CuttingProxy, N_TOKENS, context, kv_close, server, tiny  # noqa: E402,F401


class HedgedQuant8(FixedPolicy):
    """quant8 everywhere, with a 0.3 s hedge on every fetch."""

    def __init__(self):
        super().__init__("quant8")

    def fetch_timeout_s(self, state, choice):
        return 0.3


async def test_a_stalled_fetch_past_the_hedge_is_recomputed(server, tiny, context):
    adapter, codec = tiny
    ctx, ids = context
    async with CuttingProxy(server.url, stall={2: 1}) as proxy:  # chunk 2: a third, then 3 s of silence
        async with ContextLoader(proxy.url, model=adapter, policy=HedgedQuant8(), slo_s=None, token=TOKEN,
                                 codec=codec, fetch=FetchOptions(stall_timeout_s=10.0),
                                 context=LoaderContext(persist=False, calibration_prefixes=(64, 256))) as cl:
            res = await cl.load(ctx)
    rep = res.report
    assert [r.final for r in rep.chunks] == ["quant8", "quant8", TEXT, "quant8"]
    row = rep.chunks[2]
    assert row.choice == "quant8" and row.recovered == "recomputed" and "hedge" in row.error
    assert 0.25 <= row.fetch_s < 1.5  # abandoned at the hedge, not after the 3 s stall
    assert rep.load_s < 2.5
    k_ref, v_ref = adapter.compute_kv(ids)
    assert res.cache.get_seq_length() == N_TOKENS
    assert kv_close(adapter.cache_to_tensors(res.cache)[:1], (k_ref,), atol=0.2)  # quant8 + exact text chunk
