"""The benches' streamer process (bench/streamer_process.py): it serves what is uploaded to it, with the
bench model's fingerprint, to a ContextLoader in another process; it holds no weights to compute KV with."""

import asyncio
import os

import pytest
import torch

from bench.gpu_ttft import TOKEN, upload_kv
from bench.streamer_process import UploadOnlyAdapter, info_from_json, info_to_json, start_process
from ctxstream.codec import Codec
from ctxstream.loader import ContextLoader
from ctxstream.model import ModelAdapter, ModelError
from ctxstream.streamer.settings import Settings


@pytest.fixture(scope="module")
def adapter():
    return ModelAdapter.tiny_random(seed=3)


def test_model_info_round_trips_through_json(adapter):
    assert info_from_json(info_to_json(adapter.info)) == adapter.info
    with pytest.raises(ModelError, match="upload KV"):
        UploadOnlyAdapter(adapter.info).compute_kv_with_importance([1, 2, 3])


def test_a_loader_reads_the_upload_from_the_streamer_process(adapter):
    codec = Codec(adapter.info, None)
    settings = Settings(store="memory", tokens={TOKEN: "bench"}, chunk_tokens=32, max_tokens=4096)
    ids = list(range(1, 97))
    keys, values = adapter.compute_kv(ids)
    with start_process(settings, adapter=adapter, codec=codec) as srv:
        assert srv.alive() and srv.pid != os.getpid()
        body = upload_kv(srv.url, ids, keys, values)
        assert body["manifest"]["fingerprint"] == adapter.info.fingerprint

        async def load():
            async with ContextLoader(srv.url, model=adapter, policy="fixed:fp16", token=TOKEN, codec=codec,
                                     slo_s=None) as cl:
                return await cl.load(body["id"])

        out = asyncio.run(load())
        k, v = ModelAdapter.cache_to_tensors(out.cache)
        assert torch.allclose(k, keys.to(k.dtype), atol=1e-2) and torch.allclose(v, values.to(v.dtype), atol=1e-2)
        assert srv.alive()
    assert not srv.alive()  # stopped with the with-block
