"""The ``mailpipe`` command.

Each layer contributes its own sub-commands through a ``register(subparsers)`` function in its
``cli`` module, so this file only wires them together (and imports nothing heavy at start-up).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute sub-commands, in the order they appear in --help.
COMMAND_MODULES = (
    "mailpipe.sim.cli",      # sim serve
    "mailpipe.repo.cli",     # snapshots, export, check, forget
    "mailpipe.repo.maint_cli",  # prune, key, migrate
    "mailpipe.backup.cli",   # backup
    "mailpipe.restore.cli",  # restore
    "mailpipe.defs.cli",     # discover, demo
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailpipe",
        description="Back up Microsoft 365 Exchange Online mailboxes through Microsoft Graph into "
        "deduplicated, point-in-time snapshots on S3 or a local folder.",
        epilog="Tenants come from the YAML file named by $MAILPIPE_TENANTS; without it, the built-in "
        "demo tenant (simulated Graph, storage under ./.mailpipe) is used.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that layer has no commands (yet)
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        from mailpipe.settings import Settings

        args.settings = Settings.from_env()  # read once, for every command; a bad value is one clear line
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mailpipe snapshots demo | head`
        sys.stderr.close()
        return 141
    except Exception as e:  # one clear line for expected errors; tracebacks only for bugs
        from mailpipe.errors import UserError
        from mailpipe.graph.errors import GraphError

        if isinstance(e, (UserError, GraphError)):  # their messages name what to fix, never a secret
            print(f"mailpipe: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
