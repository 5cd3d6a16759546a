"""Fuzzing of the untrusted-input parsers: the chunk bitstream decoder (``Codec.decode`` and the
incremental ``Codec.decoder().feed``) and the manifest parser (``Manifest.from_json``).

Oracle: every input either decodes to tensors of the header's shape and dtype, or raises a typed
``CodecError`` / ``ManifestError`` (both ``ValueError``). Any other exception, a hang (per-input
time bound) or unbounded memory (RSS bound) is a failure. Inputs are valid chunks of every level
mutated so that they get *past* the checksums, where the interesting code lives:

* raw bit flips, truncations, splices of two chunks, random bytes after the magic;
* header field mutations: the msgpack header decoded, one field replaced by a hostile value
  (huge/negative/float/inf ints, wrong types, long lists, nesting), re-packed with a *valid*
  header checksum;
* section body mutations with the section checksum recomputed (reaches the rANS decoder, escape
  lists, fp16/int8 payloads);
* section length changes (header and framing rewritten consistently).

Two modes:

* default (pytest): a few seconds of the same engine plus hypothesis-driven cases;
* long: ``python tests/test_fuzz.py --count 1000000 --json bench/results/fuzz.json`` (``scripts/fuzz.sh``)
  runs the engine for N inputs, with a watchdog (``faulthandler``: a hang kills the process with a
  traceback) and an RSS bound, and records what ran.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import random
import resource
import struct
import sys
import time
from pathlib import Path

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent

from ctxstream.codec import Codec, CodecError, DecodeLimits  # noqa: E402
from ctxstream.codec import rans  # noqa: E402
from ctxstream.codec.format import CHECK_BYTES, MAGIC, checksum, parse_header  # noqa: E402
from ctxstream.hostinfo import host_info  # noqa: E402
from ctxstream.manifest import Manifest, ManifestError  # noqa: E402

PER_INPUT_S = 2.0  # a single input may take at most this long (the largest valid one takes ~10 ms)
RSS_BOUND_MB = 2048  # the process's peak RSS stays under this


# ------------------------------------------------------------------------------------ corpus
def build_corpus(cache_dir: Path | None = None, adapter=None, codec=None):
    """Valid chunks of every level (start 0 with the sink token, start > 0 with fine tokens) and
    manifests, for the tiny test model."""
    from ctxstream.model import ModelAdapter

    adapter = adapter or ModelAdapter.tiny_random()
    codec = codec or Codec.for_model(adapter, cache_dir=cache_dir)
    ids = adapter.tokenize("The quick brown fox jumps over the lazy dog. " * 4)[:70]
    keys, values, imp = adapter.compute_kv_with_importance(ids)
    blobs = []
    for lv in codec.all_levels:
        blobs.append(codec.encode(keys, values, lv, start=0, importance=imp))
        blobs.append(codec.encode(keys[:, :, 3:40], values[:, :, 3:40], lv, start=3, importance=imp[3:40]))
    from ctxstream.manifest import ChunkEntry, checksum_hex

    entries = []
    for i, s in enumerate(range(0, len(ids), 32)):
        toks = tuple(ids[s:s + 32])
        entries.append(ChunkEntry(i, "%032x" % (i + 1), s, toks, {lv: 100 + i for lv in codec.all_levels},
                                  {lv: checksum_hex(bytes([i])) for lv in codec.all_levels}))
    man = Manifest(id="%032x" % len(entries), model=adapter.info.name, fingerprint=adapter.info.fingerprint,
                   profile=codec.profile.id, chunk_tokens=32, levels=tuple(codec.all_levels), chunks=tuple(entries))
    return codec, blobs, [man.to_json()]


# ------------------------------------------------------------------------------------ mutators
HOSTILE = [0, -1, 1, 2, 3, 7, 255, 256, 65535, 1 << 31, (1 << 32) - 1, 1 << 40, (1 << 63) - 1, (1 << 64) - 1,
           -(1 << 63), 0.5, -0.0, 1e308, float("inf"), float("-inf"), float("nan"), True, False, None, "",
           "x" * 40, "fp16", "q2", "float16", "bfloat16", b"\x00" * 9, [], [1], [0, 0], [1, 2, 3, 4],
           [1 << 20] * 4, [-1] * 4, [[1]], {}, {"a": 1}, {"step": 0.32, "block": 64, "fine": [0, 0]},
           list(range(300))]


def _hostile(rng: random.Random):
    if rng.random() < 0.25:
        return rng.randrange(-(1 << 63), 1 << 64) if rng.random() < 0.3 else rng.randrange(-3, 300)
    return rng.choice(HOSTILE)


def _split(blob: bytes):
    """``(header dict, [section bodies])`` of a valid chunk."""
    hi = parse_header(blob, DecodeLimits())
    hlen = struct.unpack_from("<I", blob, 4)[0]
    head = msgpack.unpackb(blob[8:8 + hlen], raw=False)
    bodies = [blob[off:off + n] for off, n in zip(hi.section_offsets(), hi.header.sections)]
    return head, bodies


def _join(head: dict, bodies: list[bytes], *, fix_sections: bool = True) -> bytes:
    if fix_sections:
        head = {**head, "sections": [len(b) for b in bodies]}
    packed = msgpack.packb(head, use_bin_type=True)
    prefix = struct.pack("<4sI", MAGIC, len(packed))
    out = prefix + packed + struct.pack("<Q", checksum(prefix + packed))
    return out + b"".join(b + struct.pack("<Q", checksum(b)) for b in bodies)


def _mutate_bytes(rng: random.Random, data: bytes, n_max: int = 8) -> bytes:
    b = bytearray(data)
    if not b:
        return bytes([rng.randrange(256)])
    for _ in range(rng.randint(1, n_max)):
        r = rng.random()
        pos = rng.randrange(len(b))
        if r < 0.5:
            b[pos] ^= 1 << rng.randrange(8)
        elif r < 0.8:
            b[pos] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
        elif r < 0.9 and len(b) > 1:
            del b[pos:pos + rng.randint(1, 16)]
        else:
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(b)


def mutate_chunk(rng: random.Random, blobs: list[bytes], parts: list) -> tuple[str, bytes]:
    """One hostile input derived from the corpus; returns ``(mutator name, bytes)``."""
    i = rng.randrange(len(blobs))
    blob = blobs[i]
    head, bodies = parts[i]
    r = rng.random()
    if r < 0.10:
        return "bitflip", _mutate_bytes(rng, blob)
    if r < 0.17:
        return "truncate", blob[: rng.randrange(len(blob) + 1)]
    if r < 0.22:
        other = blobs[rng.randrange(len(blobs))]
        return "splice", blob[: rng.randrange(len(blob) + 1)] + other[rng.randrange(len(other) + 1):]
    if r < 0.25:
        return "random", MAGIC + bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    if r < 0.50:  # one or two header fields hostile, valid checksums
        h = dict(head)
        for _ in range(rng.randint(1, 2)):
            key = rng.choice(list(h) + ["params", "extra"])
            if key == "params" and isinstance(h.get("params"), dict) and h["params"] and rng.random() < 0.7:
                p = dict(h["params"])
                p[rng.choice(list(p) + ["fine"])] = _hostile(rng)
                h["params"] = p
            elif rng.random() < 0.1:
                h.pop(key, None)
            else:
                h[key] = _hostile(rng)
        fix = rng.random() < 0.7 and "sections" not in h or rng.random() < 0.5
        try:
            return "header", _join(h, bodies, fix_sections=False if not fix else True)
        except (OverflowError, TypeError, ValueError):  # msgpack cannot pack it: send the raw header bytes
            return "header", _join(head, bodies)
    if r < 0.55:  # fine-token list of the transform-coded levels
        h = dict(head)
        p = dict(h.get("params") or {})
        t = h["shape"][2]
        fine = sorted(rng.sample(range(t), rng.randint(0, min(t, 6))))
        if fine and rng.random() < 0.6:
            fine[rng.randrange(len(fine))] = _hostile(rng) if rng.random() < 0.5 else rng.randrange(-2, t + 2)
        p["fine"] = fine
        h["params"] = p
        return "fine", _join(h, bodies)
    if r < 0.90:  # section bodies mutated, checksums recomputed: the decoders proper
        bs = list(bodies)
        for _ in range(rng.randint(1, 2)):
            j = rng.randrange(len(bs))
            if rng.random() < 0.3 and len(bs[j]) >= 12:  # the stream-size words at the front
                b = bytearray(bs[j])
                off = 4 * rng.randrange(min(len(b) // 4, 3 + 8))
                v = _hostile(rng)
                v = int(v) % (1 << 32) if isinstance(v, int) else rng.randrange(1 << 32)
                struct.pack_into("<I", b, off, v)
                bs[j] = bytes(b)
            else:
                bs[j] = _mutate_bytes(rng, bs[j], 4)
        return "section", _join(head, bs, fix_sections=rng.random() < 0.8)
    if r < 0.95:  # whole-layer swaps / drops / duplicates, consistent framing
        bs = list(bodies)
        op = rng.randrange(3)
        j, k = rng.randrange(len(bs)), rng.randrange(len(bs))
        if op == 0:
            bs[j], bs[k] = bs[k], bs[j]
        elif op == 1 and len(bs) > 1:
            del bs[j]
        else:
            bs.insert(j, bs[k])
        return "layers", _join(head, bs)
    # a chunk of another level / start with this one's header
    j = rng.randrange(len(blobs))
    return "crossheader", _join(head, parts[j][1])


def mutate_manifest(rng: random.Random, texts: list[str]) -> tuple[str, str | bytes]:
    text = rng.choice(texts)
    r = rng.random()
    if r < 0.3:
        return "bytes", _mutate_bytes(rng, text.encode())
    d = json.loads(text)
    for _ in range(rng.randint(1, 3)):
        target = d
        if rng.random() < 0.6 and isinstance(d.get("chunks"), list) and d["chunks"]:
            target = rng.choice(d["chunks"])
            if rng.random() < 0.3 and isinstance(target, dict):
                target = target.get(rng.choice(["sizes", "checksums"])) or target
        if not isinstance(target, dict):
            target = d
        key = rng.choice(list(target) + ["extra"])
        value = _hostile(rng)
        if isinstance(value, bytes):
            value = value.hex()
        if rng.random() < 0.05:
            value = "[" * 5000  # deep nesting when spliced into the text below
        target[key] = value
    out = json.dumps(d, allow_nan=True)
    return "fields", out.replace('"[[[[[', "[" * 5000, 1) if "[[[[[" in out else out


# ------------------------------------------------------------------------------------ oracle
class FuzzFailure(AssertionError):
    pass


def check_chunk(codec: Codec, data: bytes, rng: random.Random) -> str:
    """Decode ``data`` one-shot and incrementally (random piece sizes); both must agree and either
    succeed with the header's shape/dtype or raise a CodecError. Returns the outcome's name."""
    outcome = None
    try:
        k, v = codec.decode(data)
        h = codec.header(data)
        if tuple(k.shape) != tuple(h.shape) or tuple(v.shape) != tuple(h.shape) or str(k.dtype) != "torch." + h.dtype:
            raise FuzzFailure(f"decoded {tuple(k.shape)} {k.dtype}, header says {h.shape} {h.dtype}")
        outcome = "ok"
    except CodecError as exc:
        outcome = type(exc).__name__
    except FuzzFailure:
        raise
    except Exception as exc:  # noqa: BLE001 - the oracle: anything untyped is the bug being looked for
        raise FuzzFailure(f"decode raised untyped {type(exc).__name__}: {exc}") from exc
    dec = codec.decoder()
    inc = None
    try:
        pos = 0
        while pos < len(data):
            n = rng.choice((1, 7, 64, 1000, len(data)))
            dec.feed(data[pos:pos + n])
            pos += n
        dec.result()
        inc = "ok"
    except CodecError as exc:
        inc = type(exc).__name__
    except Exception as exc:  # noqa: BLE001
        raise FuzzFailure(f"incremental decoder raised untyped {type(exc).__name__}: {exc}") from exc
    if (outcome == "ok") != (inc == "ok"):
        raise FuzzFailure(f"one-shot decode {outcome}, incremental {inc}")
    return outcome


def check_manifest(text) -> str:
    try:
        m = Manifest.from_json(text)
    except ManifestError as exc:
        return "ManifestError"
    except Exception as exc:  # noqa: BLE001
        raise FuzzFailure(f"Manifest.from_json raised untyped {type(exc).__name__}: {exc}") from exc
    again = Manifest.from_json(m.to_json())  # what parsed must serialise and parse back the same
    if again != m:
        raise FuzzFailure("manifest does not round-trip")
    return "ok"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run(codec, blobs, manifests, count: int, seed: int, *, manifest_share: float = 0.1, watchdog: bool = False,
        progress_every: int = 0, fail_dir: Path | None = None) -> dict:
    """Run ``count`` inputs; raise FuzzFailure (after saving the input to ``fail_dir``) on the first bug."""
    rng = random.Random(seed)
    parts = [_split(b) for b in blobs]
    outcomes: dict[str, int] = {}
    mutators: dict[str, int] = {}
    slowest = 0.0
    t0 = time.perf_counter()
    for n in range(count):
        if watchdog:
            faulthandler.dump_traceback_later(PER_INPUT_S * 5, exit=True)  # a hang kills the run, loudly
        manifest = rng.random() < manifest_share
        name, data = mutate_manifest(rng, manifests) if manifest else mutate_chunk(rng, blobs, parts)
        t = time.perf_counter()
        try:
            out = check_manifest(data) if manifest else check_chunk(codec, data, rng)
        except FuzzFailure:
            if fail_dir is not None:
                fail_dir.mkdir(parents=True, exist_ok=True)
                raw = data if isinstance(data, bytes) else data.encode()
                (fail_dir / f"fail-{seed}-{n}.{'json' if manifest else 'ctxk'}").write_bytes(raw)
            raise
        dt = time.perf_counter() - t
        slowest = max(slowest, dt)
        if dt > PER_INPUT_S:
            raise FuzzFailure(f"input {n} ({name}) took {dt:.2f} s > {PER_INPUT_S} s")
        key = ("manifest:" if manifest else "chunk:") + out
        outcomes[key] = outcomes.get(key, 0) + 1
        mutators[name] = mutators.get(name, 0) + 1
        if (n & 1023) == 0 and rss_mb() > RSS_BOUND_MB:
            raise FuzzFailure(f"peak RSS {rss_mb():.0f} MB > {RSS_BOUND_MB} MB after {n} inputs")
        if progress_every and n and n % progress_every == 0:
            el = time.perf_counter() - t0
            print(f"{n} inputs, {el:.0f} s, {n / el:.0f}/s, peak RSS {rss_mb():.0f} MB", flush=True)
    if watchdog:
        faulthandler.cancel_dump_traceback_later()
    return {"inputs": count, "seconds": round(time.perf_counter() - t0, 2), "slowest_input_s": round(slowest, 4),
            "peak_rss_mb": round(rss_mb(), 1), "outcomes": dict(sorted(outcomes.items())),
            "mutators": dict(sorted(mutators.items()))}


# ------------------------------------------------------------------------------------ pytest
@pytest.fixture(scope="module")
def corpus(tiny_adapter, tiny_codec):
    return build_corpus(adapter=tiny_adapter, codec=tiny_codec)


def test_corpus_is_valid_and_mutators_reach_the_decoders(corpus):
    codec, blobs, manifests = corpus
    for blob in blobs:  # the unmutated corpus decodes
        k, _ = codec.decode(blob)
        assert k.shape[2] in (70, 37)
    assert check_manifest(manifests[0]) == "ok"
    stats = run(codec, blobs, manifests, 1200, seed=1)
    out = stats["outcomes"]
    # the mutations get past the checksums: some decode, some fail deep inside (Malformed), not all at the framing
    assert out.get("chunk:ok", 0) > 20 and out.get("chunk:MalformedError", 0) > 50, out
    assert out.get("chunk:ChecksumError", 0) > 0 and out.get("chunk:TruncatedError", 0) > 0, out
    assert out.get("manifest:ManifestError", 0) > 10, out
    assert stats["slowest_input_s"] < PER_INPUT_S


def test_fuzz_seeds(corpus):
    """Several seeds of the long-mode engine (the same oracle, a few thousand inputs in all)."""
    codec, blobs, manifests = corpus
    for seed in (11, 12):
        run(codec, blobs, manifests, 600, seed=seed)


def test_header_ints_out_of_range_are_typed_errors(corpus):
    """Regression: inf/huge numbers in header fields or the fine-token list raised OverflowError or
    IndexError (found by this fuzzer)."""
    codec, blobs, _ = corpus
    head, bodies = _split(blobs[2])  # q0 at start 0: a transform-coded level with a fine-token list
    for field, value in (("start", float("inf")), ("shape", [2, 2, float("inf"), 16]),
                         ("level_version", float("-inf")), ("start", 1 << 63)):
        with pytest.raises(CodecError):
            codec.decode(_join({**head, field: value}, bodies))
    # [9, 22, 24, -2**63]: found by the long run; 24 - (-2**63) wrapped in int64 and passed the order check
    for fine in ([(1 << 64) - 1], [-(1 << 63)], [0, (1 << 64) - 1], [9, 22, 24, -(1 << 63)], [1, 1 << 62]):
        with pytest.raises(CodecError):
            codec.decode(_join({**head, "params": {**head["params"], "fine": fine}}, bodies))


def test_manifest_numbers_out_of_range_are_typed_errors(corpus):
    """Regression: JSON ``Infinity`` / ``1e999`` where an int belongs raised OverflowError."""
    _, _, manifests = corpus
    d = json.loads(manifests[0])
    for path, value in ((("chunk_tokens",), float("inf")), (("chunks", 0, "token_ids"), [float("inf")]),
                        (("chunks", 0, "start"), float("-inf")), (("chunks", 0, "sizes"), {"q0": float("inf")}),
                        (("chunks", 0, "index"), float("nan"))):
        bad = json.loads(manifests[0])
        target = bad
        for p in path[:-1]:
            target = target[p]
        target[path[-1]] = value
        with pytest.raises(ManifestError):
            Manifest.from_json(json.dumps(bad))
    assert Manifest.from_dict(d) == Manifest.from_json(manifests[0])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 1 << 30), pieces=st.lists(st.integers(1, 5000), min_size=1, max_size=6))
def test_incremental_decoder_matches_one_shot_on_valid_chunks(corpus, seed, pieces):
    codec, blobs, _ = corpus
    blob = blobs[seed % len(blobs)]
    k_ref, v_ref = codec.decode(blob)
    dec = codec.decoder()
    pos, layers = 0, []
    for n in pieces * (len(blob) // max(1, sum(pieces)) + 1):
        layers += dec.feed(blob[pos:pos + n])
        pos += n
        if pos >= len(blob):
            break
    res = dec.result()
    assert [lk.layer for lk in layers] == list(range(k_ref.shape[0]))
    assert torch.equal(res.keys, k_ref) and torch.equal(res.values, v_ref)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                          lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                          max_leaves=12),
       field=st.sampled_from(["version", "id", "levels", "chunks", "chunk_tokens", "fingerprint", "index",
                              "token_ids", "sizes", "checksums", "start"]))
def test_manifest_any_json_value_anywhere(corpus, value, field):
    _, _, manifests = corpus
    d = json.loads(manifests[0])
    target = d["chunks"][0] if field in ("index", "token_ids", "sizes", "checksums", "start") else d
    target[field] = value
    assert check_manifest(json.dumps(d)) in ("ok", "ManifestError")


# ------------------------------------------------------------------------------------ long mode
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="long fuzzing run of the chunk decoder and the manifest parser")
    ap.add_argument("--count", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "fuzz.json")
    ap.add_argument("--fail-dir", type=Path, default=ROOT / "bench" / "results" / "fuzz-failures")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        codec, blobs, manifests = build_corpus(Path(tmp))
    print(f"corpus: {len(blobs)} chunks ({', '.join(codec.all_levels)}), {len(manifests)} manifest(s); "
          f"{args.count} inputs, seed {args.seed}", flush=True)
    stats = run(codec, blobs, manifests, args.count, args.seed, watchdog=True, progress_every=50_000,
                fail_dir=args.fail_dir)
    stats.update({"seed": args.seed, "per_input_bound_s": PER_INPUT_S, "rss_bound_mb": RSS_BOUND_MB,
                  "rans_c_extension": rans.HAVE_C,
                  "machine": host_info(),
                  "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
