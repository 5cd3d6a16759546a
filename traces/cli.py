"""``ctxstream replay EXPERIMENT.toml --out DIR`` and ``ctxstream report DIR`` (see traces.replay / traces.report)."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    p = sub.add_parser("replay", help="replay bandwidth traces: contexts x traces x policies x SLOs",
                       description="Run a trace-replay experiment (TOML) into DIR/runs.jsonl, one JSON line per "
                                   "run; resumable (runs already in the JSONL are skipped).")
    p.add_argument("experiment", help="experiment TOML file (see experiments/)")
    p.add_argument("--out", required=True, help="output folder (runs.jsonl, experiment.json, store/)")
    p.add_argument("--limit", type=int, default=None, help="only the first N runs of the plan")
    p.add_argument("--time-scale", type=float, default=None, help="override time_scale (wall s per trace s)")
    p.add_argument("--bandwidth-scale", type=float, default=None, help="override: multiply every trace's rates")
    p.add_argument("--median-mbps", type=float, default=None, help="override: rescale every trace to this median")
    p.add_argument("--link", choices=("shaper", "netns"), default=None, help="override the link emulation mode")
    p.add_argument("--policies", default=None, help="override: comma-separated policies (e.g. mpc,quant8,text)")
    p.add_argument("--slos", default=None, help="override: comma-separated SLOs (e.g. 2x)")
    p.add_argument("--report", action="store_true", help="write the report when done")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_replay)
    r = sub.add_parser("report", help="Markdown table and PNG plots of a replay folder")
    r.add_argument("dir", help="a folder written by 'ctxstream replay'")
    r.add_argument("--no-plots", action="store_true")
    r.set_defaults(func=cmd_report)


def apply_overrides(exp, args: argparse.Namespace):
    """``exp`` with the command line's overrides (time scale, bandwidth, link, policies, SLOs) applied."""
    if args.time_scale is not None:
        exp.time_scale = args.time_scale
    if args.bandwidth_scale is not None:
        exp.bandwidth_scale, exp.median_mbps = args.bandwidth_scale, None
    if args.median_mbps is not None:
        exp.median_mbps, exp.bandwidth_scale = args.median_mbps, None
    if args.link is not None:
        exp.link = args.link
    if args.policies:
        exp.policies = [x for x in args.policies.split(",") if x]
    if args.slos:
        exp.slos = [x for x in args.slos.split(",") if x]
    return exp


def cmd_replay(args: argparse.Namespace) -> int:
    from .replay import Experiment, run_experiment

    exp = apply_overrides(Experiment.from_toml(args.experiment), args)
    if exp.link == "netns":
        from .netns import available

        ok, why = available()
        if not ok:
            print(f"error: link = netns is not available here: {why}", file=sys.stderr)
            return 2
    s = run_experiment(exp, args.out, progress=not args.quiet, limit=args.limit)
    print(f"{s['ran']} runs, {s['skipped']} already done, {s['total']} planned, {s['seconds']:.0f} s", file=sys.stderr)
    if args.report:
        from .report import make_report

        print(make_report(args.out))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import make_report

    print(make_report(args.dir, plots=not args.no_plots))
    return 0
