"""The ``engine-server`` command line: one ``main``, one module per verb group.

- ``info``, ``bench``                      -> :mod:`engine_server.cli.info`
- ``generate``, ``multiview``, ``refine``  -> :mod:`engine_server.cli.make`
- ``doctor``                               -> :mod:`engine_server.cli.doctor`
- ``serve``, ``jobs``                      -> :mod:`engine_server.cli.serve`
- ``train-bundled``, ``eval-bundled``, ``export-bundled`` -> :mod:`engine_server.cli.bundled`

Each verb imports what it needs when it runs, so ``engine-server --help`` stays fast
and a missing optional dependency only affects the verb using it. Only this package
configures logging handlers; nothing in the library imports it.
"""
from __future__ import annotations

import argparse
import gc
import logging
import sys

from engine_server import __version__
from engine_server.cli import bundled, doctor, info, make, serve
from engine_server.cli.common import UsageError, use_model_config

VERB_GROUPS = (info, make, doctor, serve, bundled)
"""Modules whose ``add_parsers(sub)`` register the verbs, in the order ``--help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engine-server", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"engine-server {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in VERB_GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        use_model_config(args)
        return args.func(args)
    except UsageError as exc:
        print(f"engine-server {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if argv is None:
            # The process's own command line, so the process ends next: interpreter shutdown would walk every
            # object torch made (0.8 s on 2 cores, after the GLB is written); frozen ones are left to the OS.
            gc.freeze()
