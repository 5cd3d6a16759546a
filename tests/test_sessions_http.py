"""The sessions resource over HTTP against a real streamer on loopback (issue 18)."""

from __future__ import annotations

import httpx
import torch

from ctxstream.codec import Codec
from ctxstream.manifest import Manifest, checksum_hex
from ctxstream.streamer.kvformat import CONTENT_TYPE, pack_kv

from conftest import auth


def _turn(srv, sid, ids, tenant="acme", **kw):
    return httpx.post(f"{srv.url}/v1/sessions/{sid}/turns", json={"token_ids": ids, **kw}, headers=auth(tenant),
                      timeout=60)


def test_conversation_manifest_chunks_every_level_and_exact_kv(make_streamer, tiny_adapter, tiny_codec):
    srv = make_streamer(session_tiers="memory:64M")
    r = httpx.post(f"{srv.url}/v1/sessions", json={"id": "chat-1"}, headers=auth())
    assert r.status_code == 201 and r.json()["id"] == "chat-1"
    assert httpx.post(f"{srv.url}/v1/sessions", json={"id": "chat-1"}, headers=auth()).status_code == 409
    g = torch.Generator().manual_seed(3)
    turns = [torch.randint(1, tiny_adapter.info.vocab_size, (n,), generator=g).tolist() for n in (10, 80, 7)]
    for i, ids in enumerate(turns):
        r = _turn(srv, "chat-1", ids, role="system" if i == 0 else "user", system=i == 0, turn=i)
        assert r.status_code == 201, r.text
        assert r.json()["delta_tokens"] == len(ids)
    man = httpx.get(f"{srv.url}/v1/sessions/chat-1", headers=auth()).json()
    assert man["tokens"] == 97 and man["version"] == 4 and man["tier"] == "memory"
    assert [s["tokens"] for s in man["segments"]] == [10, 80, 7] and man["segments"][0]["system"]
    m = Manifest.from_dict(man["manifest"])  # a context manifest: the loader reads it as one
    assert [c.tokens for c in m.chunks] == [10, 64, 16, 7]  # chunk_tokens 64 within each segment
    assert m.token_ids == [t for ids in turns for t in ids]
    # every level of every chunk is served with its checksum; fp16 decodes to the model's own KV
    full = tiny_adapter.make_cache()
    tiny_adapter.extend(full, m.token_ids)
    k_ref, v_ref = tiny_adapter.cache_to_tensors(full)
    for c in m.chunks:
        for lv in m.levels:
            r = httpx.get(f"{srv.url}/v1/sessions/chat-1/chunks/{c.index}", params={"level": lv}, headers=auth())
            assert r.status_code == 200 and len(r.content) == c.sizes[lv]
            assert checksum_hex(r.content) == c.checksums[lv] == r.headers["x-checksum-xxh3"]
        blob = httpx.get(f"{srv.url}/v1/sessions/chat-1/chunks/{c.index}", params={"level": "fp16"},
                         headers=auth()).content
        k, v = tiny_codec.decode(blob)
        sl = slice(c.start, c.start + c.tokens)
        torch.testing.assert_close(k, k_ref[:, :, sl].float(), atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(v, v_ref[:, :, sl].float(), atol=2e-2, rtol=1e-2)
    # Range
    r = httpx.get(f"{srv.url}/v1/sessions/chat-1/chunks/1", params={"level": "q2"},
                  headers={**auth(), "Range": "bytes=5-"})
    assert r.status_code == 206 and len(r.content) == m.chunks[1].sizes["q2"] - 5


def test_kv_turn_truncate_repositions_and_delete(make_streamer, tiny_adapter, tiny_codec):
    srv = make_streamer(session_tiers="memory:64M")
    httpx.post(f"{srv.url}/v1/sessions", json={"id": "kv"}, headers=auth())
    g = torch.Generator().manual_seed(5)
    ids = [torch.randint(1, tiny_adapter.info.vocab_size, (n,), generator=g).tolist() for n in (6, 20, 12)]
    cache = tiny_adapter.make_cache()
    base = 0
    for i, turn in enumerate(ids):
        tiny_adapter.extend(cache, turn)
        k, v = tiny_adapter.cache_to_tensors(cache, base)
        body = pack_kv(turn, k, v, fingerprint=tiny_adapter.info.fingerprint)
        r = httpx.post(f"{srv.url}/v1/sessions/kv/turns", content=body,
                       params={"start": base, "system": str(i == 0).lower(), "role": "user"},
                       headers={**auth(), "Content-Type": CONTENT_TYPE})
        assert r.status_code == 201, r.text
        base += len(turn)
    # a stale start is a conflict, not a silent overwrite
    r = httpx.post(f"{srv.url}/v1/sessions/kv/turns", content=body, params={"start": 0},
                   headers={**auth(), "Content-Type": CONTENT_TYPE})
    assert r.status_code == 409
    r = httpx.post(f"{srv.url}/v1/sessions/kv/truncate", json={"max_tokens": 20}, headers=auth())
    assert r.status_code == 200 and r.json()["tokens"] == 18  # system 6 + newest 12
    m = Manifest.from_dict(httpx.get(f"{srv.url}/v1/sessions/kv", headers=auth()).json()["manifest"])
    assert m.token_ids == ids[0] + ids[2] and [c.start for c in m.chunks] == [0, 6]
    # the kept turn is re-positioned: its keys are the stored ones rotated for 6.. instead of 26..
    from ctxstream.positions import reposition

    k_all, _ = tiny_adapter.cache_to_tensors(cache)
    want = reposition(k_all[:, :, 26:38].float(), 26, 6, tiny_adapter.info)
    blob = httpx.get(f"{srv.url}/v1/sessions/kv/chunks/1", params={"level": "fp16"}, headers=auth()).content
    k, _ = tiny_codec.decode(blob)
    torch.testing.assert_close(k, want, atol=2e-2, rtol=1e-2)
    assert httpx.delete(f"{srv.url}/v1/sessions/kv", headers=auth()).status_code == 204
    assert httpx.get(f"{srv.url}/v1/sessions/kv", headers=auth()).status_code == 404


def test_tenant_isolation_and_bad_input(make_streamer):
    srv = make_streamer(session_tiers="memory:16M")
    assert httpx.post(f"{srv.url}/v1/sessions", json={"id": "mine"}, headers=auth("acme")).status_code == 201
    assert _turn(srv, "mine", [1, 2, 3]).status_code == 201
    # another tenant: the same id is another (absent) session
    assert httpx.get(f"{srv.url}/v1/sessions/mine", headers=auth("umbrella")).status_code == 404
    assert httpx.get(f"{srv.url}/v1/sessions/mine/chunks/0", params={"level": "fp16"},
                     headers=auth("umbrella")).status_code == 404
    assert _turn(srv, "mine", [4], tenant="umbrella").status_code == 404
    assert httpx.delete(f"{srv.url}/v1/sessions/mine", headers=auth("umbrella")).status_code == 404
    assert httpx.get(f"{srv.url}/v1/sessions/mine").status_code == 401
    bad = [
        httpx.post(f"{srv.url}/v1/sessions", json={"id": "../x"}, headers=auth()),
        httpx.post(f"{srv.url}/v1/sessions", json={"id": "a" * 200}, headers=auth()),
        httpx.post(f"{srv.url}/v1/sessions", content=b"{", headers={**auth(), "Content-Type": "application/json"}),
        _turn(srv, "mine", []),
        _turn(srv, "mine", [1.5]),
        _turn(srv, "mine", [10 ** 9]),
        _turn(srv, "mine", [1], role="x y"),
        httpx.post(f"{srv.url}/v1/sessions/mine/turns", content=b"xx",
                   headers={**auth(), "Content-Type": CONTENT_TYPE}, params={"start": 3}),
        httpx.post(f"{srv.url}/v1/sessions/mine/turns", content=b"x", headers={**auth(), "Content-Type": "text/plain"}),
        httpx.get(f"{srv.url}/v1/sessions/mine/chunks/0", params={"level": "nope"}, headers=auth()),
        httpx.get(f"{srv.url}/v1/sessions/mine/chunks/9", params={"level": "fp16"}, headers=auth()),
        httpx.get(f"{srv.url}/v1/sessions/mine/chunks/0", params={"level": "fp16"},
                  headers={**auth(), "Range": "bytes=99999-"}),
        httpx.post(f"{srv.url}/v1/sessions/mine/truncate", json={"max_tokens": -1}, headers=auth()),
        httpx.put(f"{srv.url}/v1/queue", json={"sessions": "mine"}, headers=auth()),
    ]
    codes = [r.status_code for r in bad]
    assert all(400 <= c < 500 for c in codes), codes
    assert all(r.json().get("detail") for r in bad if r.headers.get("content-type", "").startswith("application/json"))
    assert codes[5] == 422 and codes[8] == 415 and codes[11] == 416


def test_restart_recovers_sessions_from_disk_and_redis(make_streamer, redis_url, tmp_path):
    for tiers in ("memory:16K+disk:64M", "memory:16K+redis:64M"):
        data = tmp_path / tiers.replace(":", "_").replace("+", "_")
        srv = make_streamer(session_tiers=tiers, data_dir=data, redis_url=redis_url)
        httpx.post(f"{srv.url}/v1/sessions", json={"id": "keep"}, headers=auth())
        for n in range(3):
            assert _turn(srv, "keep", list(range(1 + 40 * n, 41 + 40 * n))).status_code == 201
        before = httpx.get(f"{srv.url}/v1/sessions/keep", headers=auth()).json()
        assert before["tier"] != "memory"  # 3 turns x every level exceed the 16 KB memory tier
        srv.stop()
        srv2 = make_streamer(session_tiers=tiers, data_dir=data, redis_url=redis_url)
        after = httpx.get(f"{srv2.url}/v1/sessions/keep", headers=auth()).json()
        assert after["manifest"] == before["manifest"] and after["version"] == before["version"]
        for c in after["manifest"]["chunks"]:
            r = httpx.get(f"{srv2.url}/v1/sessions/keep/chunks/{c['index']}", params={"level": "q1"}, headers=auth())
            assert r.status_code == 200 and checksum_hex(r.content) == c["checksums"]["q1"]
        # the next turn writes only its delta
        r = _turn(srv2, "keep", [7, 8, 9])
        assert r.status_code == 201 and r.json()["delta_tokens"] == 3 and r.json()["tokens"] == 123
        srv2.stop()


def test_queue_endpoint_and_header_prefetch_into_memory(make_streamer):
    srv = make_streamer(session_tiers="memory:40K+disk:64M", session_placement="scheduler")
    for sid in ("a", "b", "c"):
        httpx.post(f"{srv.url}/v1/sessions", json={"id": sid}, headers=auth())
        assert _turn(srv, sid, list(range(1, 60))).status_code == 201
    tiers = {sid: httpx.get(f"{srv.url}/v1/sessions/{sid}", headers=auth()).json()["tier"] for sid in "abc"}
    cold = [s for s, t in tiers.items() if t != "memory"]
    assert cold, tiers  # the memory tier holds fewer sessions than there are
    r = httpx.put(f"{srv.url}/v1/queue", json={"sessions": [cold[0]]}, headers=auth())
    assert r.status_code == 200 and r.json()["prefetched"] == [cold[0]]
    assert httpx.get(f"{srv.url}/v1/sessions/{cold[0]}", headers=auth()).json()["tier"] == "memory"
    # the header form, on any sessions request; another tenant's queue names its own sessions only
    other = [s for s in "abc" if s != cold[0] and
             httpx.get(f"{srv.url}/v1/sessions/{s}", headers=auth()).json()["tier"] != "memory"]
    assert other  # the prefetch moved another session down
    httpx.get(f"{srv.url}/v1/sessions/{cold[0]}", headers={**auth(), "X-Ctxstream-Queue": other[0]})
    assert httpx.get(f"{srv.url}/v1/sessions/{other[0]}", headers={**auth(), "X-Ctxstream-Queue": other[0]}
                     ).json()["tier"] == "memory"


def test_chat_session_loads_history_from_the_server_saves_async_and_truncates(make_streamer, tiny_adapter,
                                                                              tmp_path):
    import asyncio

    from ctxstream.loader import ChatSession, LoaderContext, PlanOptions

    srv = make_streamer(session_tiers="memory:64M")

    async def go():
        ctx = LoaderContext(cache_dir=tmp_path / "loader")
        async with ChatSession(srv.url, tiny_adapter, token="tok-acme-0001", system="Be brief.", policy="fp16",
                               slo_s=None, window_tokens=400, reserve_tokens=40, max_new_tokens=12, context=ctx,
                               plan=PlanOptions(calibrate_on_open=False)) as chat:
            r1 = await chat.send("hello there")
            assert r1.turn == 1 and r1.history_tokens == 0 and r1.loaded_tokens == 0 and r1.tier is None
            await chat.flush()
            r2 = await chat.send("and again")
            # the whole committed history came from the server's memory tier, nothing recomputed
            assert r2.history_tokens == len(chat.token_ids) - r2.prompt_tokens - len(r2.token_ids)
            assert r2.loaded_tokens == r2.history_tokens > 0 and r2.recomputed_tokens == 0
            assert r2.tier == "memory" and set(r2.choices) == {"fp16"}
            # the answer from the loaded history is the one a full recompute gives (greedy, first tokens)
            ids = chat.token_ids[: len(chat.token_ids) - len(r2.token_ids)]
            cache = tiny_adapter.make_cache()
            ref = int(tiny_adapter.extend(cache, ids)[-1].argmax())
            assert r2.token_ids[0] == ref
            # a save that has not finished is never read and never waited for
            gate = asyncio.Event()
            real = chat._call

            async def slow(method, path, **kw):
                if path.endswith("/turns"):
                    await gate.wait()
                return await real(method, path, **kw)

            chat._call = slow
            saved = chat.saved_tokens
            r3 = await asyncio.wait_for(chat.send("third"), 60)
            assert chat.saved_tokens == saved < r3.history_tokens
            assert r3.loaded_tokens == saved and r3.recomputed_tokens == r3.history_tokens - saved
            gate.set()
            chat._call = real
            await chat.flush()
            # overflow: the oldest turns are dropped on the server, the system prompt is kept
            dropped = 0
            for i in range(12):
                r = await chat.send(f"message number {i} " + "x" * 30)
                dropped += r.dropped_tokens
                assert r.history_tokens + r.prompt_tokens <= 400 - 40
            assert dropped > 0
            await chat.flush()
            sid, tokens = chat.session, list(chat.token_ids)
        man = httpx.get(f"{srv.url}/v1/sessions/{sid}", headers=auth()).json()
        assert [t for c in man["manifest"]["chunks"] for t in c["token_ids"]] == tokens
        assert man["segments"][0]["system"] and tokens[: man["segments"][0]["tokens"]] == tiny_adapter.tokenize(
            "Be brief.\n\n")
        # a new process continues the session by id
        async with ChatSession(srv.url, tiny_adapter, token="tok-acme-0001", session=sid, policy="fp16", slo_s=None,
                               window_tokens=400, reserve_tokens=40, max_new_tokens=4, context=ctx) as again:
            r = await again.send("back")
            assert r.loaded_tokens == len(tokens) or r.dropped_tokens > 0

    asyncio.run(go())


def test_chat_cli_json_turns(make_streamer, capsys, monkeypatch, tmp_path):
    import json

    from ctxstream.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    srv = make_streamer(session_tiers="memory:64M")
    rc = main(["chat", "--server", srv.url, "--token", "tok-acme-0001", "--model", "tiny-random", "--json",
               "--policy", "fp16", "--system", "S", "--max-new-tokens", "5", "--message", "one", "--message", "two"])
    assert rc == 0
    turns = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [t["turn"] for t in turns] == [1, 2]
    assert turns[0]["loaded_tokens"] == 0 and turns[0]["recomputed_tokens"] == 0
    # turn 2 follows at once: the first turn's save may still be in flight (then its tokens are recomputed)
    assert turns[1]["ttft_s"] > 0
    assert turns[1]["loaded_tokens"] + turns[1]["recomputed_tokens"] == turns[1]["history_tokens"] > 0
    sid = turns[0]["session"]
    rc = main(["chat", "--server", srv.url, "--token", "tok-acme-0001", "--model", "tiny-random", "--json",
               "--policy", "fp16", "--session", sid, "--message", "three", "--max-new-tokens", "3"])
    third = json.loads(capsys.readouterr().out)
    assert rc == 0 and third["session"] == sid and third["tier"] == "memory"
    assert third["loaded_tokens"] == third["history_tokens"] > turns[1]["history_tokens"]
    assert third["recomputed_tokens"] == 0
    assert main(["chat", "--server", srv.url, "--token", "tok-acme-0001", "--model", "tiny-random",
                 "--session", "nope", "--message", "x"]) == 2


def test_evicted_session_is_gone_and_starts_again(make_streamer):
    """A session the placement policy dropped from the store answers 404 (not a manifest naming chunks
    that are gone), can be created again, and its next turn starts at token 0."""
    srv = make_streamer(session_tiers="memory:40K", session_placement="lru")
    ids = list(range(1, 60))
    httpx.post(f"{srv.url}/v1/sessions", json={"id": "old"}, headers=auth())
    assert _turn(srv, "old", ids).status_code == 201
    for n in range(8):  # newer sessions until the single 40 KB tier has dropped the oldest
        httpx.post(f"{srv.url}/v1/sessions", json={"id": f"new{n}"}, headers=auth())
        assert _turn(srv, f"new{n}", ids).status_code == 201
        r = httpx.get(f"{srv.url}/v1/sessions/old", headers=auth())
        if r.status_code != 200:
            break
        assert r.json()["tier"] == "memory"  # while listed, it is stored
    assert r.status_code == 404, r.text
    assert httpx.get(f"{srv.url}/v1/sessions/old/chunks/0", params={"level": "fp16"}, headers=auth()).status_code == 404
    late = httpx.post(f"{srv.url}/v1/sessions/old/turns", json={"token_ids": [5, 6]}, headers=auth())
    assert late.status_code == 404  # not appended after history that is gone
    assert httpx.post(f"{srv.url}/v1/sessions", json={"id": "old"}, headers=auth()).status_code == 201
    r = _turn(srv, "old", ids)
    assert r.status_code == 201 and r.json()["tokens"] == len(ids) and r.json()["delta_tokens"] == len(ids)
    man = httpx.get(f"{srv.url}/v1/sessions/old", headers=auth()).json()
    c = man["manifest"]["chunks"][0]
    got = httpx.get(f"{srv.url}/v1/sessions/old/chunks/0", params={"level": "fp16"}, headers=auth())
    assert got.status_code == 200 and checksum_hex(got.content) == c["checksums"]["fp16"]
