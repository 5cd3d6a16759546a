"""The question after a loaded context, formatted with the model's chat template."""

from __future__ import annotations

from typing import Sequence

from ctxstream.model import ModelAdapter

_SENTINEL = "\x1eCTXSTREAM-QUESTION\x1e"


def chat_prompt_ids(adapter: ModelAdapter, question: str, context_ids: Sequence[int] | None = None) -> list[int]:
    """Token ids to append after ``context_ids`` so the model answers ``question``.

    If the context already starts a user turn of the chat template (it was uploaded as
    ``<template head> + text``), the question continues that turn; otherwise the context is a
    preamble and the question is a whole chat turn (template head included) after it.
    """
    tok = adapter.tokenizer
    try:
        text = tok.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                       add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - no chat template: plain continuation
        return adapter.tokenize("\n\n" + question + "\n")
    if not isinstance(text, str) or _SENTINEL not in text:
        return adapter.tokenize("\n\n" + question + "\n")
    head, _, tail = text.partition(_SENTINEL)
    head_ids = adapter.tokenize(head) if head else []
    if context_ids is not None and head_ids and list(context_ids[: len(head_ids)]) == head_ids:
        return adapter.tokenize("\n\n" + question + tail)
    return adapter.tokenize("\n\n" + head + question + tail)
