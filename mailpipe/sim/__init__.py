"""The Graph simulator: a real HTTP server speaking Microsoft Graph v1.0 mail for synthetic tenants.

See docs/SIMULATOR.md for the contract. In short::

    with start_simulator(SimConfig(users=3)) as sim:   # in this process, on a background thread
        sim.graph_url, sim.stats(), sim.model.truth(), sim.set_faults(FaultConfig(p_503=0.1))

    with SimProcess(SimConfig(users=3)) as sim:        # in a child process (benchmarks, kill tests)
        sim.graph_url, sim.stats(), sim.mutate(upn, random=20)
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

from mailpipe.sim.model import SimConfigModel, TenantModel
from mailpipe.sim.server import FaultConfig, LimitConfig, SimServer

__all__ = ["FaultConfig", "LimitConfig", "SimConfig", "SimProcess", "Simulator", "start_simulator", "write_tenants_file"]


@dataclass
class SimConfig(SimConfigModel):
    tls: bool = False
    clients: dict[str, str] = field(default_factory=dict)  # client_id -> client secret (token endpoint)
    client_certificates: dict[str, str] = field(default_factory=dict)  # client_id -> PEM public certificate
    token_lifetime_s: int = 3600
    faults: FaultConfig = field(default_factory=FaultConfig)
    limits: LimitConfig = field(default_factory=LimitConfig)
    idle_timeout_s: float = 0.0  # exit after that long without requests (0: never)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SimConfig:
        d = dict(d)
        faults = FaultConfig.from_dict(d.pop("faults", {}) or {})
        limits = LimitConfig.from_dict(d.pop("limits", {}) or {})
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown simulator option(s): {', '.join(sorted(unknown))}")
        return cls(**d, faults=faults, limits=limits)


class _Endpoint:
    graph_url: str
    base_url: str
    authority: str | None
    ca_file: str | None
    upload_base_url: str | None = None  # the origin of attachment upload URLs (a second port)

    def _admin(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.base_url}/_sim/{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        ctx = None
        if self.base_url.startswith("https") and self.ca_file:
            import ssl

            ctx = ssl.create_default_context(cafile=self.ca_file)
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
            return json.loads(r.read())

    def stats(self) -> dict[str, Any]:
        return self._admin("GET", "stats")

    def reset_stats(self) -> None:
        self._admin("POST", "stats/reset", {})

    def truth(self, user: str | None = None, hashes: bool = True, semantic: bool = False,
              fidelity: bool = False) -> dict[str, Any]:
        """Every mailbox as it is now; ``hashes=False`` skips generating every item's MIME (big mailboxes);
        ``semantic=True`` adds each item's ``semantic`` view (what a person sees, docs/SIMULATOR.md);
        ``fidelity=True`` adds each mailbox's export-API view (every folder and item of every type)."""
        q = "&".join(x for x in (f"user={user}" if user else "", "" if hashes else "hashes=0",
                                 "semantic=1" if semantic else "", "fidelity=1" if fidelity else "") if x)
        return self._admin("GET", "truth" + (f"?{q}" if q else ""))

    def mutate(self, user: str, ops: list[dict] | None = None, *, random: int = 0, seed: int = 0,
               random_items: int = 0) -> dict:
        """Apply ``ops``, or a deterministic random mix of ``random`` mail ops and ``random_items`` ops on
        calendar, contact and task items and folders (docs/SIMULATOR.md)."""
        return self._admin("POST", "mutate", {"user": user, "ops": ops or [], "random": random, "seed": seed,
                                              "random_items": random_items})

    def set_faults(self, faults: FaultConfig | dict) -> None:
        self._admin("POST", "faults", asdict(faults) if isinstance(faults, FaultConfig) else faults)

    def set_limits(self, limits: LimitConfig | dict) -> None:
        self._admin("POST", "limits", asdict(limits) if isinstance(limits, LimitConfig) else limits)

    def expire_delta_tokens(self, user: str) -> None:
        self._admin("POST", "expire_delta_tokens", {"user": user})

    def expire_import_sessions(self, user: str) -> int:
        return self._admin("POST", "expire_import_sessions", {"user": user})["expired"]

    def revoke_tokens(self) -> None:
        self._admin("POST", "revoke_tokens", {})

    def endpoint(self) -> dict[str, Any]:
        return {"graph_url": self.graph_url, "base_url": self.base_url, "authority": self.authority,
                "ca_file": self.ca_file, "upload_base_url": self.upload_base_url}


class Simulator(_Endpoint):
    """A simulator running in this process on a background thread (see :func:`start_simulator`)."""

    def __init__(self, cfg: SimConfig, port: int = 0) -> None:
        self.cfg = cfg
        self.model = TenantModel(cfg)
        self._port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mailpipe-sim", daemon=True)
        self.ca_file: str | None = None
        self.authority: str | None = None
        self.server: SimServer | None = None
        self._runner = None
        self._upload_runner = None

    def start(self) -> Simulator:
        from aiohttp import web

        ssl_ctx = None
        if self.cfg.tls:
            from mailpipe.sim.tls import make_ca_and_server_context

            d = self.cfg.state_dir or tempfile.mkdtemp(prefix="mailpipe-sim-tls-")
            self.ca_file, ssl_ctx = make_ca_and_server_context(d)
        self.server = SimServer(self.model, self.cfg.faults, self.cfg.limits, oauth=self.cfg.tls,
                                clients=self.cfg.clients, token_lifetime_s=self.cfg.token_lifetime_s,
                                client_certificates=self.cfg.client_certificates)
        self._thread.start()

        async def boot() -> tuple[int, int]:
            self._runner = web.AppRunner(self.server.app, access_log=None, handle_signals=False)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", self._port, ssl_context=ssl_ctx, backlog=1024)
            await site.start()
            # the attachment upload URLs: another origin, as Exchange's (outlook.office.com) is
            self._upload_runner = web.AppRunner(self.server.upload_app, access_log=None, handle_signals=False)
            await self._upload_runner.setup()
            up = web.TCPSite(self._upload_runner, "127.0.0.1", 0, ssl_context=ssl_ctx, backlog=1024)
            await up.start()
            return site._server.sockets[0].getsockname()[1], up._server.sockets[0].getsockname()[1]

        port, upload_port = asyncio.run_coroutine_threadsafe(boot(), self._loop).result(30)
        scheme = "https" if self.cfg.tls else "http"
        self.port = port
        self.base_url = f"{scheme}://127.0.0.1:{port}"
        self.graph_url = f"{self.base_url}/v1.0"
        self.authority = self.base_url if self.cfg.tls else None
        self.upload_base_url = f"{scheme}://127.0.0.1:{upload_port}"
        self.server.base_url = self.base_url
        self.server.upload_base_url = self.upload_base_url
        return self

    # in-process shortcuts (no HTTP)
    def stats(self) -> dict[str, Any]:
        return self.server.stats()

    def reset_stats(self) -> None:
        self.server.reset_stats()

    def truth(self, user: str | None = None, hashes: bool = True, semantic: bool = False,
              fidelity: bool = False) -> dict[str, Any]:
        return self.model.truth(user, hashes, semantic, fidelity)

    def set_faults(self, faults: FaultConfig | dict) -> None:
        self.server.faults = faults if isinstance(faults, FaultConfig) else FaultConfig.from_dict(faults)

    def set_limits(self, limits: LimitConfig | dict) -> None:
        self.server.limits = limits if isinstance(limits, LimitConfig) else LimitConfig.from_dict(limits)

    def mutate(self, user: str, ops: list[dict] | None = None, *, random: int = 0, seed: int = 0,
               random_items: int = 0) -> dict:
        mb = self.model.mailbox(user)
        ops = ops or (mb.random_ops(random, seed) + mb.x_random_ops(random_items, seed))
        return {"applied": self.model.mutate(user, ops), "ops": ops}

    def expire_delta_tokens(self, user: str) -> None:
        self.model.mutate(user, [{"op": "expire_delta_tokens"}])

    def expire_import_sessions(self, user: str) -> int:
        async def call() -> int:  # on the server's loop: no request sees half of it
            return self.server.x_expire_sessions(user)

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(30)

    def revoke_tokens(self) -> None:
        self.server.revoke_tokens()

    def idle_seconds(self) -> float:
        return time.monotonic() - self.server.last_request

    def stop(self) -> None:
        for runner in (self._runner, self._upload_runner):
            if runner is not None:
                asyncio.run_coroutine_threadsafe(runner.cleanup(), self._loop).result(30)
        self._runner = self._upload_runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> Simulator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def write_tenants_file(path: str | os.PathLike, name: str, graph_url: str, storage: str | os.PathLike,
                       **extra: Any) -> str:
    """Write a tenants file (docs/CONFIG.md) with one tenant ``name`` on the simulator at ``graph_url``;
    ``extra``: more fields of that tenant (``mailboxes``, ``limits``...). Returns the path."""
    import yaml

    tenant = {"name": name, "tenant_id": "11111111-2222-3333-4444-555555555555",
              "client_id": "66666666-7777-8888-9999-000000000000", "auth": {"simulator": True},
              "graph_url": graph_url, "storage": str(storage), **extra}
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump({"tenants": [tenant]}, f, sort_keys=False)
    return str(path)


def start_simulator(cfg: SimConfig | None = None, port: int = 0) -> Simulator:
    """Start a simulator in this process on 127.0.0.1 (a free port unless given); use as a context manager."""
    return Simulator(cfg or SimConfig(), port).start()


class SimProcess(_Endpoint):
    """A simulator in a child process (``python -m mailpipe sim serve``): its own CPU, its own counters."""

    def __init__(self, cfg: SimConfig | None = None, *, port: int = 0, env: dict[str, str] | None = None) -> None:
        self.cfg = cfg or SimConfig()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailpipe", "sim", "serve", "--port", str(port), "--config-json",
             self.cfg.to_json()],
            stdout=subprocess.PIPE, stderr=None, env={**os.environ, **(env or {})}, text=True,
        )
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            raise RuntimeError(f"the simulator process exited with {self.proc.returncode} before it was ready")
        ep = json.loads(line)
        self.graph_url, self.base_url = ep["graph_url"], ep["base_url"]
        self.authority, self.ca_file = ep["authority"], ep["ca_file"]
        self.upload_base_url = ep.get("upload_base_url")
        self.pid = self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> SimProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
