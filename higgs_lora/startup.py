"""What every entry point does first and last: offline switches, logging, and user errors as exit code 2.

    def main(argv=None) -> int:
        parser = argparse.ArgumentParser(...)
        add_common_arguments(parser)                 # --quiet / --verbose
        args = parser.parse_args(argv)
        return run_command(args, lambda: work(args))

`run_command` turns any `UserError` (errors.py) into `error: <message>` on stderr and its exit code (2); other
exceptions keep their traceback (exit 1), since they are bugs or failures of the run, not of the input.
Imports nothing heavy.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from higgs_lora.errors import UserError
from higgs_lora.logs import NORMAL, ROOT, current_level, quiet_libraries, setup_logging

OFFLINE_SWITCHES = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
"""Weights, codecs and corpora are local paths: no entry point ever reaches a model hub (a user may still set
these to 0 in the environment; their value wins)."""


def go_offline() -> None:
    for name, value in OFFLINE_SWITCHES.items():
        os.environ.setdefault(name, value)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """`--quiet` (warnings and errors only, no progress bars) and `--verbose` (debug lines too)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="print warnings and errors only, no progress bars")
    group.add_argument("-v", "--verbose", action="store_true", help="print debug lines too")


def verbosity_of(args: argparse.Namespace) -> int:
    return NORMAL + int(bool(getattr(args, "verbose", False))) - int(bool(getattr(args, "quiet", False)))


def start(args: argparse.Namespace | None = None) -> None:
    """Offline switches and logging, before any heavy import."""
    go_offline()
    setup_logging(verbosity_of(args) if args is not None else NORMAL)
    quiet_libraries()


def report_user_error(err: UserError) -> int:
    print(f"error: {err}", file=sys.stderr)
    return err.exit_code


def run_command(args: argparse.Namespace | None, work: Callable[[], int | None]) -> int:
    """`start(args)`, then `work()`; its return value (None = 0) is the exit code, a `UserError` exits 2.

    A command run from inside another one (the demo runs `infer` and `evaluate` in its own process) leaves the
    caller's verbosity as it found it: an inner `--quiet` does not silence the outer command's later lines."""
    outer_level = current_level()
    start(args)
    try:
        code = work()
    except UserError as err:
        return report_user_error(err)
    finally:
        if outer_level is not None:
            logging.getLogger(ROOT).setLevel(outer_level)
    return 0 if code is None else int(code)
