"""The `marginface` command line: one entry point whose sub-commands live in one small module each.

Each command module exposes `register(subparsers)`, which adds its parser and sets `func` to a callable
taking the parsed namespace and returning an exit code. The modules only parse, validate and call the
library; the work lives in the library.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from marginface import __version__
from marginface.errors import MarginfaceError

# Order is the order shown by `marginface --help`. Every listed command must have its module: a missing one
# is a broken installation and fails loudly (tests/test_cli_help.py runs --help of each). A module's command is
# its name with dashes (import_weights: `marginface import-weights`).
COMMAND_MODULES = ("train", "compare", "eval", "search", "data", "export", "import_weights", "plot", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="marginface",
        description="Train and evaluate face-recognition models with margin-based softmax losses.",
        epilog="Run `marginface COMMAND --help` for the options and an example of each command.",
    )
    parser.add_argument("--version", action="version", version=f"marginface {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"marginface.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    code = run_command(argv)
    from marginface.train.distributed import exit_process, started_process_group

    if started_process_group():
        exit_process(code)  # a torchrun rank: skip the finalization that gloo's threads can abort
    return code


def run_command(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run its command and return the exit code (user errors become one line and code 2)."""
    parser = build_parser()
    # key=value overrides may come before or after options (argparse alone cannot intermix positionals).
    args, extras = parser.parse_known_args(argv)
    if extras:
        takes_overrides = isinstance(getattr(args, "overrides", None), list)
        if takes_overrides and all("=" in e and not e.startswith("-") for e in extras):
            args.overrides += extras
        else:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if getattr(args, "func", None) is None:
        # A command group without its sub-command (e.g. `marginface data`) shows that group's help.
        (getattr(args, "group_parser", None) or parser).print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (MarginfaceError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as exc:
        # Expected user errors: one clear line, no traceback from deep inside (MARGINFACE_DEBUG=1 shows it).
        if os.environ.get("MARGINFACE_DEBUG"):
            raise
        print(f"marginface {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"marginface {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `marginface eval --json | head` closed our stdout: exit quietly, and point stdout at devnull so the
        # interpreter's final flush does not raise a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def example_epilog(*examples: str) -> str:
    """Format the `Example:` block every command's --help ends with."""
    return "example:\n" + "\n".join(f"  {line}" for line in examples)


def help_formatter() -> type[argparse.HelpFormatter]:
    return argparse.RawDescriptionHelpFormatter
