"""Help and the command line: each field's help text (the docstring under it), the arguments every entry point
shares (`--config`, `--help-keys`, `key=value ...`), and `higgs-lora config` (also `python -m higgs_lora.config`),
which prints the resolved config as YAML (`--save PATH` also writes it) or every key with its help.

The printed YAML and help are the command's output. Imports schema, load and startup, no torch.
See docs/training.md ("Configuration").
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import sys
import textwrap
from typing import Any

from higgs_lora import startup
from higgs_lora.config.load import (
    field_types,
    is_dataclass_type,
    load_config,
    save_config,
    type_name,
)
from higgs_lora.config.schema import RunConfig
from higgs_lora.logs import is_quiet


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass `cls` (its help text), by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def describe_keys(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Every settable key as (key, type, default, help), in declaration order."""
    rows = []
    hints = field_types(cls)
    defaults = cls() if cls is not RunConfig else None
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if is_dataclass_type(tp):
            rows.extend(describe_keys(tp, f"{prefix}{f.name}."))
            continue
        if defaults is not None:
            default = getattr(defaults, f.name)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((f"{prefix}{f.name}", type_name(tp), default, docs.get(f.name, "")))
    return rows


def format_help() -> str:
    lines = ["Run configuration keys (set in YAML sections or as key=value overrides):", ""]
    for key, kind, default, doc in describe_keys():
        lines.append(f"  {key} ({kind}, default {default!r})")
        for wrapped in textwrap.wrap(doc, 100):
            lines.append(f"      {wrapped}")
    return "\n".join(lines)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The small, stable command line every entry point shares: --config, --help-keys and overrides."""
    parser.add_argument("--config", help="run config YAML (see configs/)")
    parser.add_argument(
        "--help-keys", action="store_true", help="list every config key with its type, default and help"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. train.lr=2e-4")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Resolve the config from parsed `add_config_arguments` args; prints help and exits for --help-keys.

    Raises ConfigError (a UserError): under `startup.run_command` it is printed as `error: ...` with exit code 2.
    """
    if args.help_keys:
        print(format_help())
        raise SystemExit(0)
    return load_config(args.config, args.overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="higgs-lora config",
        description="Resolve and print a run config (YAML + key=value overrides), or list every key.",
    )
    add_config_arguments(parser)
    parser.add_argument("--save", help="also write the resolved config to this YAML file")
    startup.add_common_arguments(parser)
    args = parser.parse_args(argv)
    return startup.run_command(args, lambda: run(args))


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    print(cfg.to_yaml(), end="")
    if args.save:
        save_config(cfg, args.save)
        if not is_quiet():  # stdout holds only the YAML, so the note goes to stderr, as a YAML comment
            print(f"# saved to {args.save}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
