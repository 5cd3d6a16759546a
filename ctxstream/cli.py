"""``ctxstream`` command line: one sub-command registry; each package contributes its commands.

A package adds commands with a ``register(subparsers)`` function listed in ``_COMMAND_MODULES``;
``register`` adds parsers and sets ``func`` (called with the parsed args, returns an exit code).
Duplicate command names are rejected by argparse.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

_COMMAND_MODULES = (
    "ctxstream.codec.cli",  # codec-demo, profile
    "ctxstream.streamer.cli",  # serve, upload
    "ctxstream.loader.cli",  # ask
    "ctxstream.loader.chat_cli",  # chat
    "ctxstream.traces.cli",  # replay, report
    "ctxstream.demo",  # demo (the README's main job)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctxstream", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency inside the module
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
