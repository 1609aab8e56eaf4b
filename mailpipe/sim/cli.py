"""``mailpipe sim serve`` and ``mailpipe sim mutate``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sim", help="the Graph simulator (serve, mutate)",
                       description="A real HTTP server that speaks Microsoft Graph v1.0 mail for a synthetic, "
                       "deterministic tenant, with fault injection and counters. See docs/SIMULATOR.md.")
    ss = p.add_subparsers(dest="sim_command", metavar="SUBCOMMAND")
    s = ss.add_parser("serve", help="serve a simulated tenant on 127.0.0.1",
                      description="Serve a simulated tenant on http(s)://127.0.0.1:PORT/v1.0. Prints one JSON line "
                      "with graph_url, base_url, authority and ca_file when ready, then serves until "
                      "SIGTERM/SIGINT.")
    s.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    s.add_argument("--tenant", default="demo", help="tenant name (default demo)")
    s.add_argument("--users", type=int, help="mailbox users (default 5)")
    s.add_argument("--messages", type=int, help="mean messages per mailbox (default 200)")
    s.add_argument("--seed", type=int, help="seed: same seed, same tenant (default 1)")
    s.add_argument("--state-dir", help="persist mutations here and replay them at start")
    s.add_argument("--tls", action="store_true", help="serve HTTPS with a generated CA, plus the OAuth routes")
    s.add_argument("--client", action="append", default=[], metavar="ID:ENV",
                   help="with --tls: accept client ID with the secret held by environment variable ENV")
    s.add_argument("--client-cert", action="append", default=[], metavar="ID:PEM",
                   help="with --tls: accept client ID signing its assertions with the key of the certificate "
                        "in file PEM (the public certificate, as uploaded to an Entra app registration)")
    s.add_argument("--latency-ms", type=float, help="added latency per mailbox request")
    s.add_argument("--jitter-ms", type=float, help="random +/- jitter on the latency")
    for f in ("429", "503", "504", "reset", "empty-page"):
        s.add_argument(f"--p-{f}", type=float, metavar="P", help=f"probability of an injected {f}")
    s.add_argument("--concurrency", type=int, help="concurrent requests per mailbox (default 4)")
    s.add_argument("--window-requests", type=int, help="requests per mailbox per window (default 10000)")
    s.add_argument("--window-seconds", type=float, help="the window's length (default 600)")
    s.add_argument("--upload-bytes", type=int, help="bytes of request bodies (POST/PUT/PATCH) per mailbox per "
                   "upload window (default 157286400, Exchange's 150 MB)")
    s.add_argument("--upload-window-seconds", type=float, help="the upload window's length (default 300)")
    s.add_argument("--idle-timeout", type=float, default=0, help="exit after this many idle seconds (0: never)")
    s.add_argument("--config-json", help="a whole SimConfig as JSON (other flags override it)")
    s.set_defaults(func=_serve)

    m = ss.add_parser("mutate", help="change a mailbox of a running simulator",
                      description="Apply a deterministic random mix of changes (new mail, read/flag, moves, "
                      "deletes, folder changes) to a mailbox of a running simulator.")
    m.add_argument("--url", required=True, help="the simulator's base URL, e.g. http://127.0.0.1:8765")
    m.add_argument("--user", required=True, help="UPN or user id")
    m.add_argument("--random", type=int, default=10, help="number of random operations (default 10)")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=_mutate)


def _serve(args: argparse.Namespace) -> int:
    from mailpipe.errors import UserError
    from mailpipe.sim import SimConfig, start_simulator

    try:
        d = json.loads(args.config_json) if args.config_json else {}
        for flag, key in (("tenant", "tenant"), ("users", "users"), ("messages", "messages_per_mailbox"),
                          ("seed", "seed"), ("state_dir", "state_dir")):
            v = getattr(args, flag)
            if v is not None and not (flag == "tenant" and args.config_json and v == "demo"):
                d[key] = v
        if args.tls:
            d["tls"] = True
        clients = dict(d.get("clients") or {})
        for c in args.client:
            cid, _, env = c.partition(":")
            if not env or env not in os.environ:
                raise UserError(f"--client {cid}: environment variable {env!r} is not set")
            clients[cid] = os.environ[env]
        d["clients"] = clients
        certs = dict(d.get("client_certificates") or {})
        for c in args.client_cert:
            cid, _, path = c.partition(":")
            try:
                with open(path, encoding="ascii") as f:
                    certs[cid] = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"--client-cert {cid}: cannot read the PEM certificate {path!r}: {e}") from None
        d["client_certificates"] = certs
        faults = dict(d.get("faults") or {})
        for flag, key in (("latency_ms", "latency_ms"), ("jitter_ms", "jitter_ms"), ("p_429", "p_429"),
                          ("p_503", "p_503"), ("p_504", "p_504"), ("p_reset", "p_reset"),
                          ("p_empty_page", "p_empty_page")):
            if getattr(args, flag) is not None:
                faults[key] = getattr(args, flag)
        d["faults"] = faults
        limits = dict(d.get("limits") or {})
        for flag, key in (("concurrency", "concurrent_per_mailbox"), ("window_requests", "window_requests"),
                          ("window_seconds", "window_seconds"), ("upload_bytes", "upload_bytes"),
                          ("upload_window_seconds", "upload_window_seconds")):
            if getattr(args, flag) is not None:
                limits[key] = getattr(args, flag)
        d["limits"] = limits
        if args.idle_timeout:
            d["idle_timeout_s"] = args.idle_timeout
        cfg = SimConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise UserError(f"bad simulator configuration: {e}") from None
    sim = start_simulator(cfg, port=args.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(json.dumps(sim.endpoint()), flush=True)
    on_ready = os.environ.get("MAILPIPE_SIM_READY_FILE")
    if on_ready:  # the embedded launcher waits for this file
        tmp = on_ready + ".tmp"
        with open(tmp, "w") as f:
            json.dump({**sim.endpoint(), "pid": os.getpid()}, f)
        os.replace(tmp, on_ready)
    while not stop.wait(1.0):
        if cfg.idle_timeout_s and sim.idle_seconds() > cfg.idle_timeout_s:
            print("mailpipe sim: idle timeout reached, exiting", file=sys.stderr)
            break
    sim.stop()
    if on_ready:
        try:
            with open(on_ready) as f:
                if json.load(f).get("pid") == os.getpid():
                    os.unlink(on_ready)
        except (OSError, ValueError):
            pass
    return 0


def _mutate(args: argparse.Namespace) -> int:
    from mailpipe.sim import _Endpoint

    ep = _Endpoint()
    ep.base_url, ep.ca_file = args.url.rstrip("/"), None
    out = ep.mutate(args.user, random=args.random, seed=args.seed)
    print(json.dumps({"ops": len(out["ops"])}))
    return 0
