"""Quality of a loaded context: log-probs of a continuation given the loaded cache, compared with the
exact KV's. One place for the loader benchmark and the replay harness."""

from __future__ import annotations

import math

import torch
from ctxstream.model import cache_kw


@torch.no_grad()
def score(adapter, result, cont: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``cont[1:]`` given ``result.cache`` (which already holds ``cont[0]``) and
    ``result.first_logits``: ``([len(cont) - 1, vocab], [len(cont) - 1])`` (log-probs, targets)."""
    ids = torch.tensor([cont[1:-1]])
    out = adapter.model(input_ids=ids, **cache_kw(adapter.model, result.cache), use_cache=True)
    logits = torch.cat([result.first_logits[None], out.logits[0]], 0).float()
    return torch.log_softmax(logits, -1), torch.tensor(cont[1:])


def quality(logp: torch.Tensor, target: torch.Tensor, ref_logp: torch.Tensor) -> dict:
    """Perplexity of ``target`` under ``logp``, its difference to the reference's, and top-1 agreement."""
    nll = float(-logp.gather(1, target[:, None]).mean())
    ref_nll = float(-ref_logp.gather(1, target[:, None]).mean())
    return {"ppl": math.exp(nll), "dppl": math.exp(nll) - math.exp(ref_nll),
            "top1": float((logp.argmax(-1) == ref_logp.argmax(-1)).float().mean())}
