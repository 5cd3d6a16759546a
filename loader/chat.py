"""``ChatSession``: a multi-turn conversation whose KV the streamer keeps between turns (issue 18).

    async with ChatSession(url, model=adapter, token=tok, system="You are terse.") as chat:
        reply = await chat.send("Hello")        # reply.text, reply.ttft_s, reply.loaded_tokens, ...

Each :meth:`ChatSession.send`:

1. takes the session's **committed** history from the server (``GET /v1/sessions/{id}``) and loads
   it with :class:`~ctxstream.loader.ContextLoader` (the same planner, fetcher and sink as a
   context: per chunk a codec level or recompute, within the SLO);
2. prefills the new turn -- plus any tokens of the previous turns whose save has not committed yet
   (the next turn never waits for a save, and an unfinished save is never read: those tokens are
   recomputed) -- and generates the answer greedily;
3. saves the turn's KV (user turn + answer) as a KV delta, **asynchronously** (a task chained after
   the previous save; :meth:`ChatSession.flush` waits for them).

When the history plus the new turn would overflow the model's window (``window_tokens`` minus
``reserve_tokens`` for the answer), the server drops the oldest turns, keeps the system prompt, and
re-positions the kept KV (``POST /v1/sessions/{id}/truncate``; no model recompute).

The receiver does not keep KV between turns (as a serving engine frees it when the turn ends): the
history always comes from the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import torch

from ctxstream.errors import CtxstreamError
from ctxstream.manifest import Manifest, ManifestError
from ctxstream.model import ModelAdapter
from ctxstream.policies.adaptation import TEXT
from ctxstream.streamer.kvformat import CONTENT_TYPE as KV_CONTENT_TYPE
from ctxstream.streamer.kvformat import pack_kv

from .calibration import run_model
from .core import DEFAULT_SLO_S, ContextLoader, LoaderError
from .fetcher import Fetcher

log = logging.getLogger(__name__)

__all__ = ["ChatSession", "ChatReply", "ChatError"]


class ChatError(CtxstreamError, RuntimeError):
    """The server refused a session request (the message says why)."""


@dataclass(frozen=True)
class ChatReply:
    """One turn. Token counts: ``loaded_tokens`` history tokens whose KV came from the server,
    ``recomputed_tokens`` history tokens recomputed (the policy's text chunks, and tokens whose save
    had not committed), ``prompt_tokens`` the new turn's tokens (prefilled)."""

    text: str
    token_ids: list[int]
    turn: int
    ttft_s: float  # from send() to the first answer token
    history_tokens: int
    loaded_tokens: int
    recomputed_tokens: int
    prompt_tokens: int
    dropped_tokens: int  # dropped from the front of the history for the window (system kept)
    tier: str | None  # the tier the server found the history in (None: no history)
    choices: dict[str, int] = field(default_factory=dict)  # per chunk choice: level or text -> count
    version: int = 0  # the session version loaded
    generate_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["ttft_s"], d["generate_s"] = round(self.ttft_s, 4), round(self.generate_s, 4)
        return d


class _SessionFetcher(Fetcher):
    def chunk_url(self, context_id: str, index: int) -> str:
        return f"{self.server_url}/v1/sessions/{context_id}/chunks/{index}"


class _SessionLoader(ContextLoader):
    """A :class:`ContextLoader` whose "context" is a session's committed history."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        f = self.fetcher
        self.fetcher = _SessionFetcher(f.server_url, token=f.token, shaper=f.shaper, options=f.options)
        self.last: dict | None = None

    async def fetch_manifest(self, context_id: str) -> Manifest:
        body = await self._get(f"/v1/sessions/{context_id}", f"session {context_id}")
        try:
            self.last = json.loads(body)
            return Manifest.from_dict(self.last["manifest"])
        except (ValueError, KeyError, TypeError, ManifestError) as exc:
            raise LoaderError(f"bad session manifest for {context_id}: {exc}") from exc


class ChatSession:
    """A conversation with ``model`` over a session on the streamer at ``server_url``.

    ``session``: an existing session id to continue (None: a new one). ``system``: the system prompt
    (first turn of a new session). ``policy`` / ``slo_s``: the loader's adaptation policy and TTFT
    target for the history. ``window_tokens``: the model's context window (default: its config's
    ``max_position_embeddings``); ``reserve_tokens``: kept free for the answer. Other keyword
    arguments go to :class:`ContextLoader` (``context=``, ``sink=``, ``fetch=``, ``plan=``)."""

    def __init__(self, server_url: str, model: ModelAdapter, *, token: str | None = None, session: str | None = None,
                 system: str | None = None, policy: str = "slo", slo_s: float | None = DEFAULT_SLO_S,
                 window_tokens: int | None = None, reserve_tokens: int = 128, max_new_tokens: int = 64,
                 **loader_kwargs):
        self.server_url = server_url.rstrip("/")
        self.adapter = model
        self.token = token
        self.session = session
        self.system = system
        self.window = int(window_tokens or getattr(model.model.config, "max_position_embeddings", 2048))
        self.reserve = int(reserve_tokens)
        if self.reserve >= self.window:
            raise ValueError(f"reserve_tokens {self.reserve} >= window {self.window}")
        self.max_new_tokens = int(max_new_tokens)
        self.loader = _SessionLoader(self.server_url, model, policy, slo_s, token=token, **loader_kwargs)
        self.token_ids: list[int] = []  # the whole conversation as this side knows it
        self.saved_tokens = 0  # tokens the server has committed (updated when a save finishes)
        self.turns = 0
        self._save: asyncio.Task | None = None
        self._http: aiohttp.ClientSession | None = None

    # ---------------------------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> "ChatSession":
        try:
            await self.open()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def _call(self, method: str, path: str, **kw) -> tuple[int, Any]:
        async with self._http.request(method, self.server_url + path, headers={**self._headers(), **kw.pop("headers", {})},
                                      **kw) as r:
            body = await r.read()
            try:
                data = json.loads(body) if body else None
            except ValueError:
                data = body.decode("utf-8", "replace")
            return r.status, data

    async def open(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300))
        await self.loader.open()
        if self.session is None:
            self.session = secrets.token_hex(8)
            status, data = await self._call("POST", "/v1/sessions", json={"id": self.session})
            if status != 201:
                raise ChatError(f"cannot create session: HTTP {status}: {data}")
            return
        status, data = await self._call("GET", f"/v1/sessions/{self.session}")
        if status != 200:
            raise ChatError(f"no session {self.session}: HTTP {status}: {data}")
        self.token_ids = [t for c in data["manifest"]["chunks"] for t in c["token_ids"]]
        self.saved_tokens = len(self.token_ids)
        self.turns = len({s["turn"] for s in data["segments"] if not s["system"]})

    async def flush(self) -> None:
        """Wait for the saves in flight (raises the last one's error)."""
        if self._save is not None:
            await self._save

    async def close(self) -> None:
        try:
            if self._save is not None:
                await asyncio.gather(self._save, return_exceptions=True)
        finally:
            await self.loader.close()
            if self._http is not None:
                await self._http.close()
                self._http = None

    # ---------------------------------------------------------------------------------- a turn
    def _turn_ids(self, text: str, *, first: bool) -> tuple[list[int], list[int]]:
        """``(system ids, user turn ids)`` in the model's chat template (system ids only on the first
        turn of a session with a system prompt; later turns start a new line after the answer)."""
        tok = self.adapter.tokenizer
        sys_msg = [{"role": "system", "content": self.system or "-"}]
        try:
            out = tok.apply_chat_template(sys_msg + [{"role": "user", "content": text}], tokenize=False,
                                          add_generation_prompt=True)
        except (ValueError, TypeError, AttributeError, KeyError):
            out = None
        marker = "<|im_start|>user"
        if isinstance(out, str) and marker in out:
            i = out.index(marker)
            if first and self.system:
                return self.adapter.tokenize(out[:i]), self.adapter.tokenize(out[i:])
            return [], self.adapter.tokenize(("" if first else "\n") + out[i:])
        head = self.adapter.tokenize(f"{self.system}\n\n") if first and self.system else []
        return head, self.adapter.tokenize(f"{'' if first else chr(10)}User: {text}\nAssistant:")

    async def send(self, text: str) -> ChatReply:
        """One user turn: load the history, prefill the turn, generate, save asynchronously."""
        if self._http is None:
            raise ChatError("the chat session is not open (use 'async with ChatSession(...)')")
        t0 = time.perf_counter()
        first = not self.token_ids
        sys_ids, user_ids = self._turn_ids(text, first=first)
        new = sys_ids + user_ids
        dropped = 0
        if len(self.token_ids) + len(new) > self.window - self.reserve:
            dropped = await self._truncate(self.window - self.reserve - len(new))
        history = len(self.token_ids)
        loaded = recomputed = 0
        choices: dict[str, int] = {}
        tier, version = None, 0
        committed = self.saved_tokens  # a save still in flight is not read: its tokens are recomputed
        result = None
        for _attempt in range(2):
            if not committed:
                break
            result = await self.loader.load(self.session, prompt_ids=self.token_ids[committed:] + new)
            if result.manifest.tokens == committed:
                break
            committed, result = result.manifest.tokens, None  # a save committed meanwhile: load that version
        if result is not None:
            if result.manifest.token_ids != self.token_ids[:committed]:
                raise ChatError("the server's history is not this conversation's (another writer?)")
            for row, c in zip(result.report.chunks, result.manifest.chunks):
                choices[row.final] = choices.get(row.final, 0) + 1
                loaded += 0 if row.final == TEXT else c.tokens
                recomputed += c.tokens if row.final == TEXT else 0
            recomputed += history - committed
            cache, first_tok = result.cache, result.first_token
            info = self.loader.last or {}
            tier, version = info.get("tier"), int(info.get("version", 0))
        else:
            def prefill():
                cache = self.adapter.make_cache()
                logits = run_model(self.adapter, cache, self.token_ids + new)
                return cache, int(logits.argmax())

            cache, first_tok = await asyncio.to_thread(prefill)
            recomputed = history
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        answer = await asyncio.to_thread(self._generate, cache, first_tok)
        gen_s = time.perf_counter() - t1
        start = len(self.token_ids)
        self.token_ids = self.token_ids + new + answer
        self.turns += 1
        pieces = ([(start, sys_ids, True)] if sys_ids else []) + [(start + len(sys_ids), user_ids + answer, False)]
        self._post_save(cache, pieces)
        return ChatReply(self.adapter.detokenize(answer), answer, self.turns, ttft, history, loaded, recomputed,
                         len(new), dropped, tier, choices, version, gen_s)

    def _generate(self, cache, first_tok: int) -> list[int]:
        from .core import _stop_ids

        stops = _stop_ids(self.adapter)
        out, tok = [first_tok], first_tok
        while len(out) < self.max_new_tokens and tok not in stops:
            tok = int(run_model(self.adapter, cache, [tok]).argmax())
            out.append(tok)
        run_model(self.adapter, cache, [tok])  # the last token's KV too: the saved turn is whole
        return out

    # ---------------------------------------------------------------------------------- saving
    def _post_save(self, cache, pieces: list[tuple[int, list[int], bool]]) -> None:
        """Post each ``(start, ids, system)`` piece as a KV delta, after the previous save; returns at
        once (the tensors are copied first: the cache is not touched again)."""
        deltas = []
        for start, ids, system in pieces:
            k, v = self.adapter.cache_to_tensors(cache, start, start + len(ids))
            deltas.append((start, ids, system, k.detach().to("cpu", torch.float16).clone(),
                           v.detach().to("cpu", torch.float16).clone()))
        prev, turn = self._save, self.turns

        async def run() -> None:
            if prev is not None:
                await prev
            for start, ids, system, k, v in deltas:  # a turn's pieces share its number
                body = await asyncio.to_thread(pack_kv, ids, k, v, fingerprint=self.adapter.info.fingerprint)
                status, data = await self._call(
                    "POST", f"/v1/sessions/{self.session}/turns", data=body,
                    params={"start": str(start), "role": "system" if system else "turn",
                            "system": "true" if system else "false", "turn": str(turn)},
                    headers={"Content-Type": KV_CONTENT_TYPE})
                if status != 201:
                    raise ChatError(f"saving turn {turn} failed: HTTP {status}: {data}")
                self.saved_tokens = start + len(ids)

        self._save = asyncio.get_running_loop().create_task(run())

    async def _truncate(self, max_tokens: int) -> int:
        """Drop the oldest turns on the server (system kept, the rest re-positioned). Waits for the
        saves in flight first (a truncation rewrites the manifest they extend)."""
        await self.flush()
        status, data = await self._call("POST", f"/v1/sessions/{self.session}/truncate",
                                        json={"max_tokens": max(0, max_tokens), "keep_system": True})
        if status != 200:
            raise ChatError(f"cannot truncate session {self.session}: HTTP {status}: {data}")
        status, man = await self._call("GET", f"/v1/sessions/{self.session}")
        if status != 200:
            raise ChatError(f"session {self.session}: HTTP {status}: {man}")
        before = len(self.token_ids)
        self.token_ids = [t for c in man["manifest"]["chunks"] for t in c["token_ids"]]
        self.saved_tokens = len(self.token_ids)
        return before - len(self.token_ids)
