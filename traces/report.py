"""``ctxstream report DIR``: a Markdown table and PNG plots from a replay's ``runs.jsonl``.

* ``report.md``: per policy (and per SLO) SLO attainment, mean and p95 TTFT, mean quality
  (perplexity increase vs exact KV, absolute and relative; top-1 agreement), bytes;
* ``ttft_cdf.png``: TTFT CDF per policy;
* ``slo_attainment.png``: SLO attainment vs SLO (per SLO label, x = mean SLO seconds);
* ``quality_vs_ttft.png``: mean quality vs mean TTFT, one point per policy;
* ``timeline.png``: one run per chunk: link bandwidth, chosen level, cumulative time vs the SLO.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from .replay import read_rows

LEVEL_ORDER = ["text", "fp16", "quant8", "q0", "q1", "q2", "q3", "q4"]


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else None


def _p95(xs):
    xs = [x for x in xs if x is not None]
    return float(np.percentile(xs, 95)) if xs else None


def _fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def policy_order(rows) -> list[str]:
    seen = []
    for r in rows:
        if r["policy"] not in seen:
            seen.append(r["policy"])
    return seen


def summarize(rows: list[dict], by_slo: bool = False) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["policy"], r["slo"] if by_slo else "")].append(r)
    out = []
    slo_order = []
    for r in rows:
        if r["slo"] not in slo_order:
            slo_order.append(r["slo"])
    for pol in policy_order(rows):
        for slo in (slo_order if by_slo else [""]):
            g = groups.get((pol, slo))
            if not g:
                continue
            # TTFT of an aborted run counts as the cap (never below the truth)
            tt = [r["ttft_s"] if r.get("ttft_s") is not None else float("nan") for r in g]
            ok = [t for t in tt if not math.isnan(t)]
            out.append({
                "policy": pol, "slo": slo, "runs": len(g), "aborted": sum(1 for r in g if r.get("ttft_s") is None),
                "attainment": sum(1 for r in g if r.get("slo_met")) / len(g),
                "ttft_mean": _mean(ok), "ttft_p95": _p95(ok),
                "dppl": _mean([r.get("dppl") for r in g]), "dppl_rel": _mean([r.get("dppl_rel") for r in g]),
                "est_dppl_rel": _mean([r.get("est_dppl_rel") for r in g]),
                "top1": _mean([r.get("top1") for r in g]), "mb": _mean([(r.get("bytes") or 0) / 1e6 for r in g]),
                "recompute": _recompute_share(g),
            })
    return out


def _recompute_share(rows) -> float | None:
    """Share of the chunks that ended up recomputed from text (chosen, or after an abandoned fetch)."""
    ch = [c["final"] for r in rows for c in r.get("chunks") or []]
    return sum(1 for c in ch if c == "text") / len(ch) if ch else None


def table_md(summary: list[dict], by_slo: bool = False) -> str:
    head = "| policy |" + (" SLO |" if by_slo else "") + \
        " runs | SLO met | mean TTFT s | p95 TTFT s | dppl | dppl % | est. dppl % | top-1 | MB | recomputed |"
    sep = "|" + "---|" * (head.count("|") - 1)
    lines = [head, sep]
    for s in summary:
        lines.append(
            f"| {s['policy']} |" + (f" {s['slo']} |" if by_slo else "") +
            f" {s['runs']}{' (' + str(s['aborted']) + ' aborted)' if s['aborted'] else ''} | {s['attainment'] * 100:.0f}% |"
            f" {_fmt(s['ttft_mean'])} | {_fmt(s['ttft_p95'])} | {_fmt(s['dppl'], '+.3f')} |"
            f" {_fmt(None if s['dppl_rel'] is None else s['dppl_rel'] * 100, '+.2f')} |"
            f" {_fmt(None if s.get('est_dppl_rel') is None else s['est_dppl_rel'] * 100, '+.2f')} | {_fmt(s['top1'], '.3f')} |"
            f" {_fmt(s['mb'], '.1f')} | {_fmt(None if s['recompute'] is None else s['recompute'] * 100, '.0f')}% |")
    return "\n".join(lines)


def per_context_md(rows: list[dict]) -> str:
    """Per context and policy: the measured relative perplexity increase (mean over its runs) next to
    the loader's estimate (the manifest's per-chunk estimates of what it loaded)."""
    pols = [p for p in policy_order(rows) if any(r.get("est_dppl_rel") is not None for r in rows if r["policy"] == p)]
    ctxs = sorted({r["ctx"] for r in rows if "ctx" in r})
    if not pols or not ctxs:
        return ""
    lines = ["| context | " + " | ".join(f"{p} measured / est. %" for p in pols) + " |", "|" + "---|" * (len(pols) + 1)]
    for c in ctxs:
        cells = []
        for p in pols:
            g = [r for r in rows if r.get("ctx") == c and r["policy"] == p]
            m, e = _mean([r.get("dppl_rel") for r in g]), _mean([r.get("est_dppl_rel") for r in g])
            cells.append(f"{_fmt(None if m is None else m * 100, '+.2f')} / {_fmt(None if e is None else e * 100, '+.2f')}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows: list[dict], summary: list[dict]) -> list[str]:
    """The issue's targets, checked on these rows (per SLO: the SLO-aware policies differ per SLO)."""
    out = []
    slos = []
    for r in rows:
        if r["slo"] not in slos:
            slos.append(r["slo"])
    per = summarize(rows, by_slo=True)
    for slo in slos:
        by = {s["policy"]: s for s in per if s["slo"] == slo}
        if "text" not in by or "quant8" not in by:
            continue
        cands = [s for s in by.values() if s["policy"] not in ("text", "quant8", "fp16") and s["ttft_mean"]
                 and s["dppl_rel"] is not None and s["dppl_rel"] <= 0.01]
        if not cands:
            out.append(f"- SLO {slo}: no policy other than text/quant8/fp16 stayed within 1% perplexity of exact")
            continue
        best = min(cands, key=lambda s: s["ttft_mean"])
        rt = by["text"]["ttft_mean"] / best["ttft_mean"]
        rq = by["quant8"]["ttft_mean"] / best["ttft_mean"]
        out.append(f"- SLO {slo}: fastest policy within 1% perplexity: `{best['policy']}` (mean TTFT "
                   f"{best['ttft_mean']:.2f} s, dppl {best['dppl_rel'] * 100:+.2f}%): {rt:.2f}x lower than text "
                   f"(target >= 3x: {'met' if rt >= 3 else 'NOT met'}), {rq:.2f}x lower than quant8 (target >= 2x: "
                   f"{'met' if rq >= 2 else 'NOT met'})")
    adaptive = _slo_aware(rows)
    for pol in adaptive:
        g = [r for r in rows if r["policy"] == pol and r["slo"] == "2x"]
        if g:
            att = sum(1 for r in g if r.get("slo_met")) / len(g)
            q = _mean([r.get("dppl_rel") for r in g])
            out.append(f"- `{pol}` at SLO 2x (twice the lossless transfer time at the trace median): attainment "
                       f"{att * 100:.0f}% (target >= 95%: {'met' if att >= 0.95 else 'NOT met'}), mean dppl "
                       f"{_fmt(None if q is None else q * 100, '+.2f')}% (target within 1%: "
                       f"{'met' if q is not None and abs(q) <= 0.01 else 'NOT met'})")
    for pol in adaptive:
        g = [r for r in rows if r["policy"] == pol and "reused_from" not in r]
        share = _recompute_share(g)
        if share is not None:
            per = ", ".join(f"{s}: {_recompute_share([r for r in g if r['slo'] == s]) * 100:.0f}%" for s in slos
                            if any(r["slo"] == s for r in g))
            hedged = sum(1 for r in g for c in r.get("chunks") or [] if (c.get("error") or "").startswith("hedge"))
            out.append(f"- `{pol}` recomputed {share * 100:.0f}% of its chunks from text ({per}); "
                       f"{hedged} fetches abandoned by its hedge and recomputed")
    # is recompute cheap here? the text policy's recompute time vs the lossless transfer at the median
    tx = [r for r in rows if r["policy"] == "text" and r.get("chunks") and "reused_from" not in r]
    if tx:
        rec = _mean([sum(c.get("recompute_s") or 0 for c in r["chunks"]) for r in tx])
        lossless = _mean([r["lossless_s"] for r in tx])
        q0 = [r for r in rows if r["policy"] == "fixed:q0" and "reused_from" not in r]
        q0_s = _mean([r["bytes"] * 8 / r["median_bps"] for r in q0]) if q0 else None
        out.append(f"- Recompute on this machine: {rec:.2f} s for the whole context (mean of the `text` runs), "
                   f"{rec / lossless:.2f}x the {lossless:.2f} s transfer of its lossless KV at the trace median"
                   + (f" ({rec / q0_s:.1f}x the {q0_s:.2f} s of q0, the smallest level within 1%)" if q0_s else "")
                   + ": recompute is " + ("cheap here (comparable to or cheaper than the transfer), so the "
                                          "SLO-aware policies should recompute part of the context while the rest "
                                          "streams (their shares above)" if rec < 1.5 * lossless else
                                          "dear here: the policies should rarely recompute"))
    return out


# ------------------------------------------------------------------------------------------ plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cdf(rows, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for pol in policy_order(rows):
        tt = sorted(r["ttft_s"] for r in rows if r["policy"] == pol and r.get("ttft_s") is not None)
        if tt:
            ax.step(tt, np.arange(1, len(tt) + 1) / len(tt), where="post", label=pol)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("fraction of runs")
    ax.set_title("TTFT CDF per policy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_attainment(rows, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    slos = []
    for r in rows:
        if r["slo"] not in slos:
            slos.append(r["slo"])
    xs = {s: _mean([r["slo_s"] for r in rows if r["slo"] == s]) for s in slos}
    slos.sort(key=lambda s: xs[s])
    for pol in policy_order(rows):
        ys = []
        for s in slos:
            g = [r for r in rows if r["policy"] == pol and r["slo"] == s]
            ys.append(sum(1 for r in g if r.get("slo_met")) / len(g) if g else np.nan)
        ax.plot([xs[s] for s in slos], ys, marker="o", label=pol)
    ax.set_xticks([xs[s] for s in slos])
    ax.set_xticklabels([f"{s}\n({xs[s]:.2g}s)" for s in slos], fontsize=8)
    ax.set_xlabel("SLO (label, mean seconds)")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("SLO attainment vs SLO")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_quality(summary, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in summary:
        if s["ttft_mean"] is None or s["dppl_rel"] is None:
            continue
        ax.scatter(s["ttft_mean"], s["dppl_rel"] * 100, s=40)
        ax.annotate(s["policy"], (s["ttft_mean"], s["dppl_rel"] * 100), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.axhline(1.0, color="grey", ls="--", lw=0.8)
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_xlabel("mean TTFT (s)")
    ax.set_ylabel("perplexity increase vs exact KV (%)")
    ax.set_title("quality vs TTFT (one point per policy)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _slo_aware(rows) -> list[str]:
    """The SLO-aware policies among the rows' policies, in first-seen order (``Policy.slo_aware``)."""
    from ctxstream.policies import PolicyError, make_policy

    out = []
    for r in rows:
        pol = r["policy"]
        if pol in out:
            continue
        try:
            if make_policy(pol).slo_aware:
                out.append(pol)
        except PolicyError:  # a policy of a later version: not judged
            continue
    return out


def pick_timeline_run(rows) -> dict | None:
    """An adaptive run with mixed choices if any, else the first adaptive run, else the first run."""
    ok = [r for r in rows if r.get("chunks") and "reused_from" not in r]
    adaptive = set(_slo_aware(rows))
    for r in ok:
        if r["policy"] in adaptive and len({c["final"] for c in r["chunks"]}) > 1:
            return r
    for r in ok:
        if r["policy"] in adaptive:
            return r
    return ok[0] if ok else None


def plot_timeline(run: dict, path: Path) -> None:
    plt = _plt()
    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(7, 6.5), sharex=True)
    bw = np.asarray(run.get("bw_series") or [[0, 0]])
    a1.step(bw[:, 0], bw[:, 1], where="post", color="tab:blue")
    a1.set_ylabel("link Mbit/s")
    chunks = run["chunks"]
    for c in chunks:
        if c.get("throughput_bps"):
            t1 = c.get("queued_s") or 0
            a1.plot([max(0, t1 - c["fetch_s"]), t1], [c["throughput_bps"] / 1e6] * 2, color="tab:orange", lw=2)
    a1.set_title(f"{run['policy']} on {run['trace']} from {run['start_s']:.1f} s, SLO {run['slo']} "
                 f"({run['slo_s']:.2f} s): TTFT {_fmt(run.get('ttft_s'))} s", fontsize=9)
    levels = [lv for lv in LEVEL_ORDER if any(c["final"] == lv for c in chunks)] or LEVEL_ORDER
    lvl_y = {lv: i for i, lv in enumerate(levels)}
    for c in chunks:
        y = lvl_y.get(c["final"], 0)
        t_end = c.get("done_s") or 0
        work = (c.get("recompute_s") or 0) if c["final"] == "text" else (c.get("decode_s") or 0)
        if c["final"] != "text" and c.get("fetch_s"):  # transfer (lower bar), then decode (upper bar)
            q = c.get("queued_s") or t_end
            a2.barh(y - 0.18, max(1e-3, c["fetch_s"]), left=q - c["fetch_s"], height=0.3, color="tab:blue", alpha=0.6)
        a2.barh(y + 0.18, max(1e-3, work), left=t_end - work, height=0.3,
                color="tab:red" if c["final"] == "text" else "tab:green", alpha=0.8)
        a2.text(t_end, y + 0.18, f" {c['i']}", fontsize=7, va="center")
    a2.set_yticks(range(len(levels)))
    a2.set_yticklabels(levels, fontsize=8)
    a2.set_ylabel("chosen level\n(blue: transfer,\ngreen: decode, red: recompute)", fontsize=7)
    done = [c.get("done_s") or 0 for c in chunks]
    a3.step([0] + done, np.arange(len(done) + 1), where="post", label="chunks in the cache")
    a3.axvline(run["slo_s"], color="red", ls="--", label=f"SLO {run['slo_s']:.2f} s")
    if run.get("ttft_s") is not None:
        a3.axvline(run["ttft_s"], color="black", lw=0.8, label="TTFT")
    a3.set_ylabel("chunks done")
    a3.set_xlabel("time since load start (s)")
    a3.legend(fontsize=7)
    for a in (a1, a2, a3):
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_report(out_dir, *, plots: bool = True) -> str:
    out = Path(out_dir)
    rows = read_rows(out)
    if not rows:
        raise SystemExit(f"no runs in {out / 'runs.jsonl'}")
    meta = {}
    if (out / "experiment.json").is_file():
        meta = json.loads((out / "experiment.json").read_text())
    summary = summarize(rows)
    per_slo = summarize(rows, by_slo=True)
    md = [f"# Replay report: {meta.get('experiment', {}).get('name', out.name)}", ""]
    if meta:
        exp = meta.get("experiment", {})
        md += [f"Model `{meta.get('model')}`, {len(rows)} runs, link `{exp.get('link')}`, time scale "
               f"{exp.get('time_scale')}, bandwidth: " + (f"median rescaled to {exp['median_mbps']} Mbit/s"
                                                          if exp.get("median_mbps") else f"x{exp.get('bandwidth_scale') or 1}") +
               f", contexts {exp.get('ctx_count')} x {exp.get('ctx_tokens')} tokens ({exp.get('ctx_source')} "
               f"{exp.get('ctx_split')}), SLOs {exp.get('slos')} (`kx` = k x the lossless ({exp.get('lossless')}) "
               f"transfer time at the trace's median bandwidth), prior `{exp.get('prior')}`.", ""]
        md += ["Traces: " + ", ".join(f"`{t['name']}` (x{t['scale']:.3g}, median {t['median_mbps']:.1f} Mbit/s)"
                                      for t in meta.get("traces", [])), ""]
        h0, h1 = meta.get("host") or {}, meta.get("host_end") or {}
        if h0:
            loads = [r["load1"] for r in rows if r.get("load1") is not None]
            md += [f"Machine: {h0.get('cpu') or '?'} ({h0.get('cpus')} CPUs), {h0.get('platform')}, torch threads "
                   f"{meta.get('torch_threads')}; shared with other jobs: load average (1 min) "
                   f"{h0['loadavg'][0]:.1f} at the start ({h0.get('time')})"
                   + (f", {h1['loadavg'][0]:.1f} at the end ({h1.get('time')})" if h1 else "")
                   + (f", {np.mean(loads):.1f} mean over the runs (min {min(loads):.1f}, max {max(loads):.1f})"
                      if loads else "")
                   + (f"; the run took {meta['seconds'] / 60:.1f} min" if meta.get("seconds") else "") + ".", ""]
    md += ["## All SLOs", "", table_md(summary), "", "## Per SLO", "", table_md(per_slo, by_slo=True), "",
           "dppl: perplexity of the next 32 tokens with the loaded cache minus with the exact KV (mean over runs); "
           "dppl %: relative to the exact perplexity; top-1: agreement of the argmax with exact; recomputed: share "
           "of the chunks recomputed from text (chosen, or after a fetch abandoned by the hedge). Fixed policies "
           "(not SLO-aware) are run once per (context, trace, start) and their rows reused for each SLO.", "",
           "## Per context: measured vs estimated quality", "", per_context_md(rows), "",
           "est. dppl %: the loader's estimate, the sum of the manifest's per-chunk estimates (measured by the "
           "streamer at ingest) for the levels loaded; measured: dppl % above.", "",
           "## Targets", ""] + targets(rows, summary)
    if plots:
        plot_cdf(rows, out / "ttft_cdf.png")
        plot_attainment(rows, out / "slo_attainment.png")
        plot_quality(summary, out / "quality_vs_ttft.png")
        run = pick_timeline_run(rows)
        if run is not None:
            plot_timeline(run, out / "timeline.png")
        md += ["", "## Plots", "", "![TTFT CDF](ttft_cdf.png)", "![SLO attainment](slo_attainment.png)",
               "![quality vs TTFT](quality_vs_ttft.png)"] + (
            [f"![timeline](timeline.png) (run `{run['run_id']}`)"] if run is not None else [])
    text = "\n".join(md) + "\n"
    (out / "report.md").write_text(text)
    return text
