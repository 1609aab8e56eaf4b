"""The Dagster code location: ``dagster dev -m mailpipe.definitions`` (or workspace.yaml)."""

from mailpipe.defs import build_definitions

defs = build_definitions()
