"""``taskapp-relay`` / ``python -m taskapp_notebook.relay``: run a SynthTunnel relay.

Usage::

    TASKAPP_RELAY_API_KEYS=KEY taskapp-relay --host 127.0.0.1 --port 8080
                  [--api-key-file FILE] [--state relay.sqlite3]
                  [--public-url https://relay.example] [--log-level INFO] [limits...]

API keys come from ``TASKAPP_RELAY_API_KEYS`` (comma-separated) and/or ``--api-key-file``
(one key per line, ``#`` comments). ``--api-key KEY`` still works but shows the key to
anyone who can list processes (``ps``), so it prints a warning. ``--state FILE`` keeps
leases across restarts. Ctrl-C or SIGTERM closes agent sockets, fails requests in flight
and exits 0. Every option and its default: ``docs/relay.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from .config import RelayConfig
from .relay_server import RelayServer
from .store import StateFileError

logger = logging.getLogger("taskapp_notebook.relay")

ENV_KEYS = "TASKAPP_RELAY_API_KEYS"


def read_key_file(path: str) -> list[str]:
    """API keys in ``path``: one per line; blank lines and ``#`` comments skipped."""
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and not line.startswith("#")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="taskapp-relay",
        description="A SynthTunnel-compatible relay: lease API, agent WebSocket and public "
        "route on one port.",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="interface to listen on (default %(default)s)"
    )
    p.add_argument("--port", type=int, default=8080, help="port (default %(default)s; 0 = any)")
    p.add_argument(
        "--api-key-file",
        action="append",
        default=[],
        metavar="FILE",
        help=f"file with keys that may create leases, one per line (repeatable; also "
        f"${ENV_KEYS}, comma-separated)",
    )
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help=f"a key on the command line (visible in ps; prefer ${ENV_KEYS} or --api-key-file)",
    )
    p.add_argument("--public-url", help="base URL advertised in leases (default: http://HOST:PORT)")
    p.add_argument(
        "--state",
        metavar="FILE",
        help="SQLite file that keeps leases across restarts (default: memory only)",
    )
    d = RelayConfig()
    p.add_argument(
        "--max-inflight",
        type=int,
        default=d.max_inflight,
        help="concurrent requests per lease (default %(default)s)",
    )
    p.add_argument(
        "--max-response-bytes",
        type=int,
        default=d.max_response_bytes,
        help="largest response body (default %(default)s)",
    )
    p.add_argument(
        "--default-ttl",
        type=float,
        default=d.default_ttl,
        help="lease TTL when none is requested, seconds (default %(default)s)",
    )
    p.add_argument(
        "--max-ttl",
        type=float,
        default=d.max_ttl,
        help="cap on requested lease TTLs, seconds (default %(default)s)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=d.request_timeout,
        help="deadline of one proxied request, seconds (default %(default)s)",
    )
    p.add_argument(
        "--ping-interval",
        type=float,
        default=d.ping_interval,
        help="seconds between pings to attached agents, 0 = never (default %(default)s)",
    )
    p.add_argument(
        "--ping-timeout",
        type=float,
        default=d.ping_timeout,
        help="seconds to wait for a pong before dropping an agent (default %(default)s)",
    )
    p.add_argument(
        "--loop",
        default="auto",
        choices=["auto", "asyncio", "uvloop"],
        help="event loop: uvloop when installed (pip install 'taskapp-notebook[relay]'), "
        "else asyncio (default %(default)s)",
    )
    p.add_argument(
        "--agent-grace",
        type=float,
        default=d.agent_grace,
        help="seconds a lease outlives its agent before it ends, 0 = until its TTL "
        "(default %(default)s)",
    )
    p.add_argument(
        "--max-leases-per-key",
        type=int,
        default=d.max_leases_per_key,
        help="live leases one API key may hold (default %(default)s)",
    )
    p.add_argument(
        "--max-metadata-bytes",
        type=int,
        default=d.max_metadata_bytes,
        help="largest lease metadata, JSON bytes (default %(default)s)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=d.header_timeout,
        help="seconds a connection has to send complete request headers (default %(default)s)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=0,
        help="open connections at most, 0 = from the fd limit (default %(default)s)",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="(default %(default)s)",
    )
    return p


async def _serve(relay: RelayServer) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    try:
        await relay.start()
        logger.info("event loop: %s", type(loop).__module__.split(".")[0])
        print(
            f"taskapp-relay serving on {relay.local_url} - SYNTH_BACKEND_URL={relay.url}",
            flush=True,
        )
        await stop.wait()
        logger.info("Signal received, shutting down")
    finally:
        await relay.stop()
        for sig in handled:
            loop.remove_signal_handler(sig)
    return 0


def _run(main: Coroutine[Any, Any, int], loop: str, parser: argparse.ArgumentParser) -> int:
    """``asyncio.run(main)`` on the event loop asked for (uvloop's when ``auto`` finds it)."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                main.close()
                parser.error("--loop uvloop: uvloop is not installed (pip install uvloop)")
        else:
            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keys = [k.strip() for k in os.environ.get(ENV_KEYS, "").split(",") if k.strip()]
    for path in args.api_key_file:
        try:
            keys += read_key_file(path)
        except OSError as exc:
            parser.error(f"cannot read --api-key-file {path!r}: {exc.strerror or exc}")
    keys += [k.strip() for k in args.api_key if k.strip()]
    if not keys:
        parser.error(f"no API key: set {ENV_KEYS} or pass --api-key-file FILE")
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for path in args.api_key_file:
        with contextlib.suppress(OSError):
            if os.stat(path).st_mode & 0o077:
                logger.warning("API key file %s can be read by other users; chmod 600 it", path)
    if args.api_key:
        logger.warning(
            "--api-key puts the key on the command line, where any local user can read it "
            "(ps, /proc); set %s or use --api-key-file instead",
            ENV_KEYS,
        )
    try:
        config = RelayConfig(
            max_inflight=args.max_inflight,
            max_response_bytes=args.max_response_bytes,
            default_ttl=min(args.default_ttl, args.max_ttl),
            max_ttl=args.max_ttl,
            request_timeout=args.request_timeout,
            ping_interval=args.ping_interval or None,
            ping_timeout=args.ping_timeout or None,
            agent_grace=args.agent_grace or None,
            max_leases_per_key=args.max_leases_per_key,
            max_metadata_bytes=args.max_metadata_bytes,
            header_timeout=args.header_timeout,
            max_connections=args.max_connections or None,
            state_path=args.state,
        )
        relay = RelayServer(
            keys, host=args.host, port=args.port, public_url=args.public_url, config=config
        )
    except ValueError as exc:
        parser.error(str(exc))
    try:
        return _run(_serve(relay), args.loop, parser)
    except (OSError, StateFileError) as exc:
        logger.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
