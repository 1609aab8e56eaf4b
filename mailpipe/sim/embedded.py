"""The embedded simulator of the demo tenant: one shared child process per state directory.

Whoever needs the demo tenant's Graph (the CLI, ``dagster job execute``, ``dagster dev``, tests) calls
:func:`ensure_running`. The first caller starts ``mailpipe sim serve`` detached (it outlives the caller
and exits by itself after ``idle_timeout_s`` without requests); later callers, in any process, find it
through ``server.json`` in the state directory. An fcntl lock makes concurrent callers start exactly one.
The tenant's changes persist in the state directory (``mutations.jsonl``), so a restarted simulator
serves the same tenant.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

DEMO_DEFAULTS = {"users": 6, "messages_per_mailbox": 80, "seed": 1}
IDLE_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class SimEndpoint:
    graph_url: str
    base_url: str
    authority: str | None
    ca_file: str | None


def _alive(info: dict[str, Any]) -> bool:
    try:
        with urllib.request.urlopen(f"{info['base_url']}/_sim/config", timeout=3) as r:
            return r.status == 200
    except Exception:
        return False


def ensure_running(state_dir: str, options: dict[str, Any] | None = None, *, tenant: str = "demo",
                   start_timeout_s: float = 60.0) -> SimEndpoint:
    """The endpoint of the simulator serving ``state_dir``, started if none is alive."""
    os.makedirs(state_dir, exist_ok=True)
    server_json = os.path.join(state_dir, "server.json")
    with open(os.path.join(state_dir, "server.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        info = _read(server_json)
        if info is None or not _alive(info):
            info = _start(state_dir, server_json, {**DEMO_DEFAULTS, **(options or {})}, tenant, start_timeout_s)
    return SimEndpoint(info["graph_url"], info["base_url"], info.get("authority"), info.get("ca_file"))


def resolve(tenant: Any) -> Any:
    """``tenant`` (a :class:`mailpipe.config.TenantConfig`) with the embedded simulator's real address in
    place of ``sim://embedded`` — started if none is alive — or ``tenant`` itself. Called by the CLI and the
    Dagster layer, the only ones that know a simulator exists: the engine and the Graph layer see a URL."""
    if not getattr(tenant, "uses_embedded_simulator", False):
        return tenant
    from dataclasses import replace

    opts = dict(tenant.simulator)
    ep = ensure_running(opts.pop("state_dir"), opts, tenant=tenant.name)
    return replace(tenant, graph_url=ep.graph_url, authority=ep.authority or "", ca_bundle=ep.ca_file)


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _start(state_dir: str, server_json: str, options: dict[str, Any], tenant: str, timeout: float) -> dict:
    opts = {k: v for k, v in options.items() if k != "state_dir"}
    if "messages" in opts:
        opts["messages_per_mailbox"] = opts.pop("messages")
    cfg = {"tenant": tenant, **opts, "state_dir": state_dir, "idle_timeout_s": options.get("idle_timeout_s",
                                                                                            IDLE_TIMEOUT_S)}
    try:
        os.unlink(server_json)
    except FileNotFoundError:
        pass
    log = open(os.path.join(state_dir, "server.log"), "ab")
    subprocess.Popen(
        [sys.executable, "-m", "mailpipe", "sim", "serve", "--config-json", json.dumps(cfg)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
        env={**os.environ, "MAILPIPE_SIM_READY_FILE": server_json}, close_fds=True,
    )
    log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = _read(server_json)
        if info is not None:
            return info
        time.sleep(0.05)
    raise RuntimeError(f"the embedded simulator did not start within {timeout:.0f}s; see "
                       f"{os.path.join(state_dir, 'server.log')}")
