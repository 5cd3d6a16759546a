"""Text corpora of ``../shared/data/corpora`` and their dev/eval splits (read in place, never copied).

Splits (``shared/data/README.md``): dev = tinyshakespeare + the first half of WikiText-2 (by
``= Title =`` article); eval = the second half of WikiText-2 + LongChat topic conversations.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ctxstream.errors import CtxstreamError
from .paths import DEFAULT_DATA_DIR


_ARTICLE = re.compile(r"^ = [^=].* = $", re.M)
_SPEAKER = re.compile(r"\s*(USER|ASSISTANT):\s*")  # LongChat marks turns inline, not only at line starts
LONGCHAT_TOPICS = "longchat/topics/conversations.jsonl"


class CorpusError(CtxstreamError, FileNotFoundError):
    """A corpus file is missing under the data folder."""


def _read(data_dir: Path, rel: str) -> str:
    path = Path(data_dir) / "corpora" / rel
    if not path.is_file():
        raise CorpusError(f"{path} not found (pass --data-dir pointing at shared/data)")
    return path.read_text(encoding="utf-8").replace("\r\n", "\n").replace("\r", "\n")


@dataclass(frozen=True)
class Conversation:
    """One LongChat topic conversation: ``messages`` are ``{"role": "user"|"assistant", "content": str}``
    in order, as a chat template takes them."""

    topic: str
    messages: tuple[dict, ...]


def _longchat_rows(data_dir: Path) -> list[dict]:
    return [json.loads(line) for line in _read(data_dir, LONGCHAT_TOPICS).splitlines() if line.strip()]


def longchat_conversations(data_dir: Path = DEFAULT_DATA_DIR) -> list[Conversation]:
    """The LongChat topic conversations (eval split), in the data set's order, split into messages."""
    out = []
    for row in _longchat_rows(data_dir):
        parts = _SPEAKER.split(row["conversation"])
        msgs = tuple({"role": "user" if who == "USER" else "assistant", "content": body.strip()}
                     for who, body in zip(parts[1::2], parts[2::2]) if body.strip())
        out.append(Conversation(str(row.get("topic", "")), msgs))
    return out


def wikitext_articles(data_dir: Path = DEFAULT_DATA_DIR) -> list[str]:
    text = _read(data_dir, "wikitext2/wiki.test.raw")
    starts = [m.start() for m in _ARTICLE.finditer(text)] + [len(text)]
    return [text[a:b] for a, b in zip(starts, starts[1:])]


def split_texts(split: str, data_dir: Path = DEFAULT_DATA_DIR) -> list[str]:
    """Long texts of a split, in a fixed order (each may be cut into many contexts)."""
    arts = wikitext_articles(data_dir)
    half = len(arts) // 2
    if split == "dev":
        return [_read(data_dir, "tinyshakespeare/input.txt"), "".join(arts[:half])]
    if split == "eval":
        convs = [row["conversation"] for row in _longchat_rows(data_dir)]
        return ["".join(arts[half:]), "\n\n".join(convs)]
    raise ValueError(f"unknown split {split!r} (dev or eval)")


def token_windows(tokenize, split: str, n: int, length: int,
                  data_dir: Path = DEFAULT_DATA_DIR) -> list[list[int]]:
    """``n`` windows of ``length`` token ids, alternating between the split's texts, spread over each."""
    streams = [tokenize(t) for t in split_texts(split, data_dir)]
    per = [(n + len(streams) - 1 - i) // len(streams) for i in range(len(streams))]
    out: list[list[int]] = []
    for ids, k in zip(streams, per):
        if len(ids) < length:
            raise CorpusError(f"a {split} text has {len(ids)} tokens, fewer than {length}")
        stride = max(1, (len(ids) - length) // max(1, k))
        out += [ids[i * stride : i * stride + length] for i in range(k)]
    # interleave the texts so that any prefix of the list mixes them
    mixed: list[list[int]] = []
    it: list[Iterator] = [iter(out[sum(per[:j]) : sum(per[: j + 1])]) for j in range(len(per))]
    while len(mixed) < n:
        for i in it:
            nxt = next(i, None)
            if nxt is not None and len(mixed) < n:
                mixed.append(nxt)
    return mixed
