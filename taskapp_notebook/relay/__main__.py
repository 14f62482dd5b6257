"""``taskapp-relay`` / ``python -m taskapp_notebook.relay``: run a SynthTunnel relay.

Usage::

    taskapp-relay --host 127.0.0.1 --port 8080 --api-key KEY [--api-key KEY2 ...]
                  [--public-url https://relay.example] [--log-level INFO]

API keys come from ``--api-key`` (repeatable) and/or ``TASKAPP_RELAY_API_KEYS``
(comma-separated). Ctrl-C or SIGTERM closes agent sockets, fails requests in flight and
exits 0.
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

logger = logging.getLogger("taskapp_notebook.relay")

ENV_KEYS = "TASKAPP_RELAY_API_KEYS"


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
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help=f"a key that may create leases (repeatable; also ${ENV_KEYS}, comma-separated)",
    )
    p.add_argument("--public-url", help="base URL advertised in leases (default: http://HOST:PORT)")
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
    keys = [k.strip() for k in args.api_key if k.strip()]
    keys += [k.strip() for k in os.environ.get(ENV_KEYS, "").split(",") if k.strip()]
    if not keys:
        parser.error(f"no API key: pass --api-key KEY or set {ENV_KEYS}")
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
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
        )
        relay = RelayServer(
            keys, host=args.host, port=args.port, public_url=args.public_url, config=config
        )
    except ValueError as exc:
        parser.error(str(exc))
    try:
        return _run(_serve(relay), args.loop, parser)
    except OSError as exc:
        logger.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
