"""FAKE cloudflared, for testing OUR argv building, output parsing and process handling.

It opens no tunnel and talks to nothing but 127.0.0.1; it only mimics what cloudflared
prints, its argv handling and its metrics server (``/quicktunnel``, ``/ready``). Passing
tests that use it are never evidence that a real tunnel works.

Knobs (environment):

FAKE_CLOUDFLARED_MODE      ok (default) | rate-limited | outage | exit-early | never-ready |
                           no-metrics (old cloudflared: URL only in the log) |
                           quiet-url (URL only from /quicktunnel) |
                           unauthorized | tunnel-not-found (named tunnels)
FAKE_CLOUDFLARED_HOSTNAME  quick-tunnel hostname (default fake-test.trycloudflare.com)
FAKE_CLOUDFLARED_RECORD    append a JSON line {pid, argv, tunnel_token, ...} to this file
FAKE_CLOUDFLARED_IGNORE_SIGTERM=1   log and ignore SIGTERM (only SIGKILL stops it)
FAKE_CLOUDFLARED_EXIT_AFTER=<s>     exit with code 12 that long after connecting
FAKE_CLOUDFLARED_ECHO_TOKEN=1       print the token it got (to test masking)
FAKE_CLOUDFLARED_CONNECTIONS=<n>    edge connections it registers (connIndex 0..n-1; default 1)
FAKE_CLOUDFLARED_DROP_AFTER=<s>     that long after connecting, lose connections while staying
                                    alive; /ready follows (503, readyConnections=0 when none)
FAKE_CLOUDFLARED_DROP_COUNT=<k>     how many to lose, highest connIndex last (default all)
FAKE_CLOUDFLARED_DROP_STYLE=<s>     the lines it prints for each loss, in cloudflared's formats:
                                    quic (default: Serve tunnel error, Retrying connection in up
                                    to 1s, Connection terminated) | http2 (Lost connection with
                                    the edge first) | unregister (Unregistered tunnel connection)
                                    | silent (no line at all: only /ready shows it)
FAKE_CLOUDFLARED_RECONNECT_AFTER=<s>  that long after the loss, register them again (silent
                                    style: again without a line); unset: never
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import signal
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ENV = os.environ
MODE = ENV.get("FAKE_CLOUDFLARED_MODE", "ok")
stop = threading.Event()
live: set[int] = set()  # connIndex values registered now (what /ready counts)
state: dict[str, Any] = {"hostname": ""}


def seconds(name: str) -> float | None:
    raw = ENV.get(f"FAKE_CLOUDFLARED_{name}", "")
    return float(raw) if raw and float(raw) > 0 else None


def log(level: str, message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        sys.stderr.write(f"{stamp} {level} {message}\n")
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):
        pass  # reader gone: keep running, like a daemon would


def usage_error(message: str) -> None:
    log("ERR", f"Incorrect Usage: {message}")
    sys.exit(1)


def parse(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """cloudflared-style flags (``--x v`` / ``--x=v``) and positionals after ``tunnel``."""
    if not argv or argv[0] != "tunnel":
        usage_error("this fake only implements the `tunnel` command")
    known = {"--no-autoupdate": False, "--config": True, "--url": True, "--metrics": True}
    known["--token"] = True
    flags: dict[str, str] = {}
    rest: list[str] = []
    it = iter(argv[1:])
    for arg in it:
        if not arg.startswith("-"):
            rest.append(arg)
            continue
        name, eq, value = arg.partition("=")
        if name not in known:
            usage_error(f"flag provided but not defined: {name}")
        if known[name] and not eq:
            value = next(it, "")
        flags[name] = value if known[name] else "true"
    return flags, rest


class Metrics(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        if MODE == "no-metrics" or self.path not in ("/quicktunnel", "/ready"):
            self.send_response(404)
            self.end_headers()
            return
        if self.path == "/quicktunnel":
            status, body = 200, {"hostname": state["hostname"]}
        else:
            count = len(live)
            status = 200 if count else 503
            body = {"status": status, "readyConnections": count, "connectorId": "fake"}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


def start_metrics(address: str) -> None:
    host, _, port = address.rpartition(":")
    server = ThreadingHTTPServer((host, int(port)), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    log("INF", f"Starting metrics server on {address}/metrics")


def on_sigterm(signum: int, frame: object) -> None:
    if ENV.get("FAKE_CLOUDFLARED_IGNORE_SIGTERM") == "1":
        log("WRN", "fake: ignoring SIGTERM")
        return
    log("INF", "Initiating graceful shutdown due to signal terminated ...")
    stop.set()


def token_ok(token: str) -> bool:
    try:
        data = json.loads(base64.b64decode(token, validate=True))
    except (binascii.Error, ValueError):
        return False
    return isinstance(data, dict) and {"a", "t", "s"} <= data.keys()


def connect(named: bool) -> None:
    time.sleep(0.2)
    if MODE == "never-ready":
        log("ERR", "fake: edge connection attempt timed out, retrying")
        return
    if named and MODE == "unauthorized":
        log("ERR", 'Register tunnel error from server side error="Unauthorized: bad secret"')
        return
    if named and MODE == "tunnel-not-found":
        log("ERR", 'Register tunnel error from server side error="Unauthorized: Tunnel not found"')
        return
    register(range(int(ENV.get("FAKE_CLOUDFLARED_CONNECTIONS", "1") or 1)))


def register(indexes: range | list[int], quiet: bool = False) -> None:
    """connection/observer.go's line, one per connection."""
    for i in indexes:
        live.add(i)
        if not quiet:
            log(
                "INF",
                f"Registered tunnel connection connIndex={i} connection={uuid.uuid4()} "
                "event=0 ip=127.0.0.1 location=fake01 protocol=quic",
            )


def drop(indexes: list[int], style: str) -> None:
    """Lose connections the way cloudflared logs it (supervisor/, connection/ packages)."""
    for i in indexes:
        live.discard(i)
        if style == "silent":
            continue
        if style == "unregister":
            log("INF", f"Unregistered tunnel connection connIndex={i} event=0 ip=127.0.0.1")
            continue
        error = "timeout: no recent network activity"
        if style == "http2":
            log("INF", f"Lost connection with the edge connIndex={i}")
            error = "connection with edge closed"
        log("ERR", f'Serve tunnel error error="{error}" connIndex={i} event=0 ip=127.0.0.1')
        log("INF", f"Retrying connection in up to 1s connIndex={i} event=0 ip=127.0.0.1")
        log("WRN", f'Connection terminated error="{error}" connIndex={i}')


def main() -> int:
    signal.signal(signal.SIGTERM, on_sigterm)
    flags, rest = parse(sys.argv[1:])
    named = rest[:1] == ["run"]
    token = flags.get("--token") or (ENV.get("TUNNEL_TOKEN", "") if named else "")
    if path := ENV.get("FAKE_CLOUDFLARED_RECORD"):
        record = {
            "pid": os.getpid(),
            "argv": sys.argv[1:],
            "tunnel_token": token,
            "pgid": os.getpgid(0),
            "sid": os.getsid(0),
            "ppid": os.getppid(),
            "synth_api_key_in_env": "SYNTH_API_KEY" in ENV,
        }
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    log("INF", "Thank you for trying Cloudflare Tunnel. (FAKE cloudflared for tests)")
    if ENV.get("FAKE_CLOUDFLARED_ECHO_TOKEN") == "1":
        log("INF", f"Settings: map[no-autoupdate:true token:{token}]")
    if named and not token:
        log("ERR", '"cloudflared tunnel run" requires the ID or name of the tunnel')
        return 1
    if named and not token_ok(token):
        log("ERR", "Provided Tunnel token is not valid.")
        return 1
    if "--metrics" in flags:
        start_metrics(flags["--metrics"])
    if not named:
        log("INF", "Requesting new quick Tunnel on trycloudflare.com...")
        time.sleep(0.1)
        if MODE == "rate-limited":
            log(
                "ERR",
                "Error unmarshaling QuickTunnel response: error=\"invalid character 'e' "
                'looking for beginning of value" status_code="429 Too Many Requests"',
            )
            log(
                "ERR",
                "failed to unmarshal quick Tunnel: invalid character 'e' looking for "
                "beginning of value",
            )
            return 1
        if MODE == "outage":
            log(
                "ERR",
                'failed to request quick Tunnel: Post "https://api.trycloudflare.com/'
                'tunnel": dial tcp: lookup api.trycloudflare.com: no such host',
            )
            return 1
        hostname = ENV.get("FAKE_CLOUDFLARED_HOSTNAME", "fake-test.trycloudflare.com")
        state["hostname"] = hostname
        if MODE != "quiet-url":
            log(
                "INF",
                "|  Your quick Tunnel has been created! Visit it at (it may take some "
                "time to be reachable):  |",
            )
            log("INF", f"|  https://{hostname}  |")
    if MODE == "exit-early":
        log("ERR", "fake: something broke before connecting")
        return 7
    connect(named)
    start = time.monotonic()
    exit_after, drop_after = seconds("EXIT_AFTER"), seconds("DROP_AFTER")
    reconnect_after = seconds("RECONNECT_AFTER")
    style = ENV.get("FAKE_CLOUDFLARED_DROP_STYLE", "quic")
    dropped: list[int] = []
    dropped_at: float | None = None
    while not stop.wait(0.05):
        now = time.monotonic() - start
        if exit_after is not None and now >= exit_after:
            log("ERR", "fake: connection lost, exiting")
            return 12
        if drop_after is not None and dropped_at is None and live and now >= drop_after:
            count = int(ENV.get("FAKE_CLOUDFLARED_DROP_COUNT", "0") or 0) or len(live)
            dropped = sorted(live)[:count]
            drop(dropped, style)
            dropped_at = now
            log("INF", f"fake: dropped {len(dropped)}, {len(live)} left")
        if dropped and dropped_at is not None and reconnect_after is not None:
            if now >= dropped_at + reconnect_after:
                register(dropped, quiet=style == "silent")
                dropped = []
                log("INF", f"fake: reconnected, {len(live)} live")
    return 0


if __name__ == "__main__":
    sys.exit(main())
