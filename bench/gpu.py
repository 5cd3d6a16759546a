"""GPU decode throughput of a Llama-3-8B-shaped chunk, in GB/s of bf16 KV produced (run on a GPU).

The chunk: 32 layers, 8 KV heads, head_dim 128, 4096 tokens (512 MiB of bf16 K+V). A synthetic
codec profile of that shape (random orthogonal transforms, a decaying KLT-like spectrum of
coefficient stds, Laplacian coefficient tables built as ``profile._class_tables`` builds real
ones) and KV drawn from it; encoded on the CPU with ``Codec.encode`` (level ``q2``, 5 % fine
tokens from a random importance, the attention sink at position 0), decoded with
:class:`ctxstream.codec.gpu.GpuDecoder`, checked against ``Codec.decode``. Next to it: the card's
device-to-device copy, pinned host-to-device copy, an 8-bit dequantize+copy (quant8's format),
torch-ans if importable.

    python bench/gpu.py [--tokens 4096] [--level q2] [--reps 20] [--json PATH]

Writes ``bench/results/gpu-<device>.json`` (and a copy under ``$OUT`` when that is set).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time

import numpy as np
import torch

from ctxstream.codec import Codec, Profile, rans  # noqa: E402
from ctxstream.codec.profile import _class_tables  # noqa: E402
from ctxstream.model import ModelInfo, apply_rope, rope_cos_sin  # noqa: E402


# ------------------------------------------------------------------------------ synthetic model
def llama_info(layers: int = 32, kv_heads: int = 8, head_dim: int = 128, theta: float = 500000.0) -> ModelInfo:
    inv = (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)).astype(np.float32)
    return ModelInfo(
        name=f"synthetic-llama-{layers}x{kv_heads}x{head_dim}", num_layers=layers, num_kv_heads=kv_heads,
        head_dim=head_dim, num_attention_heads=4 * kv_heads, hidden_size=4 * kv_heads * head_dim,
        vocab_size=128256, rope_theta=theta, rope_type="default", inv_freq=tuple(float(v) for v in inv),
        attention_scaling=1.0, fingerprint=f"syn{layers:03d}{kv_heads:04d}{head_dim:05d}"[:16].ljust(16, "0"),
    )


def synthetic_profile(info: ModelInfo, *, seed: int = 0, spread: float = 3.0) -> Profile:
    """A profile of ``info``'s shape: coefficient std / q2-step spans 2**spread .. 2**-spread per head."""
    g = torch.Generator().manual_seed(seed)
    L, H, D = info.num_layers, info.num_kv_heads, info.head_dim
    q, _ = torch.linalg.qr(torch.randn(2, L, H, D, D, generator=g, dtype=torch.float64))
    ramp = torch.linspace(spread, -spread, D, dtype=torch.float64)
    jitter = 0.25 * torch.randn(2, L, H, 1, generator=g, dtype=torch.float64)
    coef_std = 0.32 * 2.0 ** (ramp + jitter - 0.5)  # q2 step units; ~2 bits per element at q2
    mean = torch.randn(2, L, H, D, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.1])[:, None, None, None]
    b = 1.0 / math.sqrt(2.0)  # unit-variance Laplacian
    u = torch.rand(2, 1, 1, 4096, D, generator=g, dtype=torch.float64) - 0.5
    z = -b * torch.sign(u) * torch.log1p(-2 * u.abs().clamp_max(0.5 - 1e-12))
    freqs, recon = _class_tables(z, torch.zeros(2, 1, 1, D, dtype=torch.float64),
                                 torch.eye(D, dtype=torch.float64).expand(2, 1, 1, D, D),
                                 torch.ones(2, 1, 1, D, dtype=torch.float64), 0.0)
    return Profile(fingerprint=info.fingerprint, mean=mean.float().numpy(), analysis=q.float().numpy(),
                   synthesis=q.transpose(-1, -2).contiguous().float().numpy(), coef_std=coef_std.float().numpy(),
                   freqs=freqs, recon=recon, calibration={"synthetic": True, "seed": seed, "spread": spread,
                                                          "deadzone": 0.0})


def synthetic_kv(info: ModelInfo, profile: Profile, tokens: int, *, start: int = 0, seed: int = 1,
                 dtype=torch.bfloat16, device="cpu"):
    """KV ``[L, H, T, D]`` drawn from the profile: Laplacian coefficients -> synthesis + mean -> RoPE."""
    g = torch.Generator(device=device).manual_seed(seed)
    std = torch.from_numpy(profile.coef_std).to(device)[:, :, :, None, :]  # [2, L, H, 1, D]
    u = torch.rand((2, info.num_layers, info.num_kv_heads, tokens, info.head_dim), generator=g, device=device) - 0.5
    c = -std / math.sqrt(2.0) * torch.sign(u) * torch.log1p(-2 * u.abs().clamp_max(0.5 - 2.0**-25))
    del u
    x = torch.matmul(c, torch.from_numpy(profile.synthesis).to(device)) + torch.from_numpy(profile.mean).to(device)[:, :, :, None]
    del c
    cos, sin = rope_cos_sin(info, torch.arange(start, start + tokens))
    keys = apply_rope(x[0], cos.to(device), sin.to(device)).to(dtype)
    values = x[1].to(dtype)
    return keys.cpu(), values.cpu()


def synthetic_codec(layers=32, kv_heads=8, head_dim=128, seed=0) -> Codec:
    info = llama_info(layers, kv_heads, head_dim)
    return Codec(info, synthetic_profile(info, seed=seed))


# ----------------------------------------------------------------------------------- timing
def cuda_time(fn, reps: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` (CUDA events around each call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return float(np.median(times))


def wall_time(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def pipelined(submit, reps: int, warmup: int = 2) -> float:
    """Seconds per chunk when chunks are submitted back to back (chunk i+1 queued before chunk i's
    result is taken: the host's parsing overlaps the GPU); every result is checked."""
    for _ in range(warmup):
        submit().result()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    prev = None
    for _ in range(reps):
        cur = submit()
        if prev is not None:
            prev.result()
        prev = cur
    prev.result()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--level", default="q2")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-cpu-check", action="store_true", help="skip the CPU Codec.decode comparison")
    ap.add_argument("--json", default=None)
    ap.add_argument("--blob-cache", default=None, help="reuse / save the encoded chunk at this path")
    ap.add_argument("--study", action="store_true", help="host-side profile of submit(), then exit")
    ap.add_argument("--ncu-target", action="store_true", help="one warm decode (to run under ncu), then exit")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU")
    from ctxstream.codec import gpu

    dev = torch.device("cuda", 0)
    name = torch.cuda.get_device_name(dev)
    T, level = args.tokens, args.level
    res: dict = {"device": name, "torch": torch.__version__, "host": platform.node(),
                 "rans_c": rans.HAVE_C, "shape": [args.layers, 8, T, 128], "level": level}
    t0 = time.perf_counter()
    codec = synthetic_codec(args.layers)
    info = codec.info
    keys, values = synthetic_kv(info, codec.profile, T, device=dev)
    importance = torch.rand(T, generator=torch.Generator().manual_seed(3))
    res["setup_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if args.blob_cache and os.path.exists(args.blob_cache):
        with open(args.blob_cache, "rb") as fh:
            blob = fh.read()
    else:
        blob = codec.encode(keys, values, level, start=0, importance=importance)
        if args.blob_cache:
            with open(args.blob_cache, "wb") as fh:
                fh.write(blob)
    res["encode_cpu_s"] = time.perf_counter() - t0
    if args.ncu_target or args.study:
        return study(args, codec, blob, dev)
    kv_bytes = 2 * keys.numel() * 2  # bf16 K + V
    res["kv_bytes_bf16"] = kv_bytes
    res["chunk_bytes"] = len(blob)
    res["bits_per_element"] = 8 * len(blob) / (2 * keys.numel())
    res["fine_tokens"] = len(codec.header(blob).params.get("fine", []))
    print(f"{name}: chunk {list(keys.shape)} level {level}: {len(blob) / 2**20:.1f} MiB, "
          f"{res['bits_per_element']:.2f} bits/element, encode {res['encode_cpu_s']:.1f}s (CPU, C={rans.HAVE_C})",
          flush=True)

    blob_dev = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(dev)
    rows = []

    def row(what, seconds, produced=kv_bytes, note=""):
        gbps = produced / seconds / 1e9
        rows.append({"what": what, "ms": seconds * 1e3, "GBps": gbps, "note": note})
        print(f"  {what:<52} {seconds * 1e3:9.3f} ms {gbps:9.1f} GB/s  {note}", flush=True)
        return gbps

    # ---- the GPU decoder: bf16 compute (fast) and fp32; device-resident chunk, no checksums
    for compute, fused in (("bf16", True), ("bf16", False), ("fp32", False)):
        dec = gpu.GpuDecoder(codec, dev, compute=compute, verify_checksums=False, fused=fused,
                             fp32_matmul_out=not fused)
        fn = lambda: dec.decode(blob, device_blob=blob_dev, out_dtype=torch.bfloat16)  # noqa: E731
        t = wall_time(fn, args.reps)
        what = f"GpuDecoder {compute}{', fused Triton synthesis' if fused else ', bmm + finish kernel'}"
        row(what + ": one chunk (latency)", t)
        t = pipelined(lambda: dec.submit(blob, device_blob=blob_dev, out_dtype=torch.bfloat16), args.reps)
        g = row(what + ": chunks back to back", t,
                note=f"smem={dec.last_geometry.smem} ntw={dec.last_geometry.ntw} tpb={dec.last_geometry.tpb}")
        if compute == "bf16" and fused:
            res["decode_GBps"] = g
            res["decode_latency_ms"] = rows[-2]["ms"]
            res["escapes"] = dec.last_escapes
            dec.record_timings = True
            fn()
            res["stages_ms_bf16"] = dict(dec.timings)
            # GPU time of the kernels after the upload (the first stages also hold host-side gaps)
            res["gpu_kernels_ms"] = sum(v for k, v in dec.timings.items() if k not in ("upload+realign", "alloc"))
            print("    stages (ms):", {k: round(v, 3) for k, v in dec.timings.items()}, f"escapes {dec.last_escapes}",
                  flush=True)
            dec.record_timings = False
        elif compute == "bf16":
            res["decode_unfused_GBps"] = g
        else:
            res["decode_fp32_GBps"] = g
    # (b) the same with every section's xxh3 verified on the host inside the decode path; the design
    # verifies at receive time (the loader checks each section as its bytes arrive), so decode_GBps
    # is the pre-verified figure above
    dec = gpu.GpuDecoder(codec, dev, compute="bf16", verify_checksums=True)
    t = pipelined(lambda: dec.submit(blob, device_blob=blob_dev, out_dtype=torch.bfloat16), args.reps)
    res["decode_verified_on_path_GBps"] = row("GpuDecoder bf16 + host xxh3 of every section (on the path)", t)
    res["checksum_at"] = "receive"
    res["decode_GBps_note"] = ("bf16 fused, device-resident chunk, back to back, header parse + plan + kernels; "
                               "bytes pre-verified (section xxh3 checked at receive time, off the GPU path); "
                               "decode_verified_on_path_GBps: with that check inside the decode path")
    dec = gpu.GpuDecoder(codec, dev, compute="bf16", verify_checksums=False, variant="global")
    t = pipelined(lambda: dec.submit(blob, device_blob=blob_dev, out_dtype=torch.bfloat16), max(3, args.reps // 2))
    res["decode_global_tables_GBps"] = row("GpuDecoder bf16, tables in global memory (L1/L2)", t)
    # end to end from host memory: checksums + parse + H2D + decode
    dec = gpu.GpuDecoder(codec, dev, compute="bf16", verify_checksums=True)
    pinned = torch.frombuffer(bytearray(blob), dtype=torch.uint8).pin_memory()
    t = pipelined(lambda: dec.submit(pinned, out_dtype=torch.bfloat16), args.reps)
    res["decode_from_pinned_host_GBps"] = row("GpuDecoder bf16 from pinned host memory (xxh3, parse, H2D)", t)
    t = wall_time(lambda: dec.decode(blob, out_dtype=torch.bfloat16), max(3, args.reps // 4))
    res["decode_from_host_bytes_GBps"] = row("GpuDecoder bf16 from a bytes object (+ pageable copy)", t)
    t0 = time.perf_counter()
    for _ in range(5):
        dec._plan(blob, None)
    res["host_parse_ms"] = (time.perf_counter() - t0) / 5 * 1e3
    # symbols only (rANS alone) and coefficients (decode + dequant + escapes)
    dec = gpu.GpuDecoder(codec, dev, compute="bf16", verify_checksums=False)
    dec.record_timings = True
    dec.decode_symbols(blob)
    sym_ms = dec.timings.get("decode", float("nan"))
    dec.decode_coefficients(blob, dtype=torch.bfloat16)
    coef_ms = dec.timings.get("decode", float("nan"))
    res["rans_symbols_per_s"] = 2 * keys.numel() / (sym_ms / 1e3)
    res["kernel_decode_dequant_bf16_GBps"] = row("  kernel: rANS + dequant -> bf16 coefficients", coef_ms / 1e3)
    row("  kernel: rANS -> uint8 symbols", sym_ms / 1e3, note=f"{res['rans_symbols_per_s'] / 1e9:.1f} G symbols/s")

    # ---- correctness on this chunk against the CPU codec
    dec = gpu.GpuDecoder(codec, dev, compute="bf16", verify_checksums=True)
    k_gpu, v_gpu = dec.decode(blob, out_dtype=torch.bfloat16)
    res["symbols_exact_layer0"] = bool(_symbols_match(codec, blob, dec))
    if not args.no_cpu_check:
        t0 = time.perf_counter()
        k_cpu, v_cpu = codec.decode(blob)
        res["cpu_decode_s"] = time.perf_counter() - t0
        row("CPU Codec.decode (reference, all cores)", res["cpu_decode_s"])
        for nm, a, b in (("keys", k_gpu, k_cpu), ("values", v_gpu, v_cpu)):
            d = (a.float().cpu() - b.float()).abs()
            scale = b.float().abs().max().item()
            res[f"max_abs_diff_{nm}"] = d.max().item()
            res[f"max_abs_{nm}"] = scale
            res[f"mean_abs_diff_{nm}"] = d.mean().item()
        print(f"  vs CPU: max |diff| K {res['max_abs_diff_keys']:.4g} (|K| max {res['max_abs_keys']:.3g}), "
              f"V {res['max_abs_diff_values']:.4g} (|V| max {res['max_abs_values']:.3g}); symbols exact: "
              f"{res['symbols_exact_layer0']}", flush=True)
        del k_cpu, v_cpu
    del k_gpu, v_gpu

    # ---- baselines
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), 10)
    res["d2d_copy_GBps_written"] = row("device-to-device copy (1 GiB; GB/s written)", t, produced=n,
                                       note=f"{2 * n / t / 1e9:.0f} GB/s read+written")
    del src, dst
    host = torch.empty(1 << 28, dtype=torch.uint8, pin_memory=True)
    t = cuda_time(lambda: host.to(dev, non_blocking=True), 10)
    res["h2d_pinned_GBps"] = row("host-to-device, pinned (256 MiB)", t, produced=host.numel())
    res["h2d_pinned_compressed_KV_GBps"] = res["h2d_pinned_GBps"] * kv_bytes / len(blob)
    print(f"  -> PCIe-limited KV rate of this chunk from pinned host memory: "
          f"{res['h2d_pinned_compressed_KV_GBps']:.0f} GB/s of bf16 KV", flush=True)
    del host
    q = torch.randint(-127, 128, (2, *keys.shape), dtype=torch.int8, device=dev)
    scale = (torch.rand((2, *keys.shape[:3], 1), device=dev) * 0.01).to(torch.bfloat16)
    out = torch.empty(q.shape, dtype=torch.bfloat16, device=dev)
    t = cuda_time(lambda: torch.mul(q, scale, out=out), 10)
    res["quant8_dequant_GBps"] = row("8-bit dequantize+copy (quant8 layout, torch.mul)", t)
    del q, scale, out
    try:
        import torch_ans  # noqa: F401

        res["torch_ans"] = "importable (not benchmarked: API differs)"
    except ImportError:
        res["torch_ans"] = "not installed: skipped"
    print(f"  torch-ans: {res['torch_ans']}")
    res["rows"] = rows
    res["target_GBps"] = 200.0
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"gpu-{slug}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(res, fh, indent=1)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"gpu-{slug}.json"), "w") as fh:
            json.dump(res, fh, indent=1)
    print(f"decode_GBps = {res['decode_GBps']:.1f} (target 200) -> {path}")


def study(args, codec, blob, dev) -> None:
    from ctxstream.codec import gpu

    blob_dev = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(dev)
    if args.ncu_target:
        dec = gpu.GpuDecoder(codec, dev, verify_checksums=False)
        for _ in range(3):
            dec.decode_coefficients(blob, dtype=torch.bfloat16)
        dec.decode_coefficients(blob, dtype=torch.bfloat16)  # the profiled one (--launch-skip 3)
        torch.cuda.synchronize()
        return
    dec = gpu.GpuDecoder(codec, dev, verify_checksums=False)
    for _ in range(3):
        dec.decode(blob, device_blob=blob_dev, out_dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t_sub, prev = 0.0, None
    for _ in range(20):  # two chunks in flight, as the pipelined bench
        t0 = time.perf_counter()
        cur = dec.submit(blob, device_blob=blob_dev, out_dtype=torch.bfloat16)
        t_sub += time.perf_counter() - t0
        if prev is not None:
            prev.result()
        prev = cur
    prev.result()
    print(f"  host time of submit(): {t_sub / 20 * 1e3:.3f} ms per chunk", flush=True)
    t0 = time.perf_counter()
    for _ in range(20):
        dec._plan(blob, None)
    print(f"  host time of _plan(): {(time.perf_counter() - t0) / 20 * 1e3:.3f} ms per chunk", flush=True)
    import cProfile
    import pstats

    pr = cProfile.Profile()
    prev = None
    pr.enable()
    for _ in range(20):
        cur = dec.submit(blob, device_blob=blob_dev, out_dtype=torch.bfloat16)
        if prev is not None:
            prev.result()
        prev = cur
    prev.result()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(30)


def _symbols_match(codec, blob, dec) -> bool:
    """Layer 0's symbols from the GPU equal the CPU decoder's (rans.decode on the same bytes)."""
    from ctxstream.codec.format import parse_header

    sym = dec.decode_symbols(blob, layers=[0])[0].cpu().numpy()
    hi = parse_header(blob, codec.limits)
    h = hi.header
    spec = codec.spec(h.level)
    _, H, T, D = h.shape
    blocks = -(-T // spec.block)
    n = 2 * H * blocks
    off = hi.section_offsets()[0]
    n_words, ek, ev = np.frombuffer(blob, "<u4", 3, off)
    states = np.frombuffer(blob, "<u4", n, off + 12)
    sizes = np.frombuffer(blob, "<u4", n, off + 12 + 4 * n)
    words = np.frombuffer(blob, "<u2", int(n_words), off + 12 + 8 * n + 4 * int(ek + ev))
    from ctxstream.codec.codec import _ChunkContext

    ctx = _ChunkContext.make(codec.info, spec, h.start, T, h.params.get("fine", []))
    ti = codec._tables(spec).stream_tables(0, blocks, ctx.fine_padded)
    ref = rans.decode(words, sizes, states, ti, codec.profile.tables, spec.block * D)
    return np.array_equal(ref, sym)


if __name__ == "__main__":
    main()
