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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ENV = os.environ
MODE = ENV.get("FAKE_CLOUDFLARED_MODE", "ok")
stop = threading.Event()
state = {"hostname": "", "ready": False}


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
            ready = bool(state["ready"])
            status = 200 if ready else 503
            body = {"status": status, "readyConnections": int(ready), "connectorId": "fake"}
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
    state["ready"] = True
    log(
        "INF",
        "Registered tunnel connection connIndex=0 connection=fake-conn ip=127.0.0.1 "
        "location=fake01 protocol=quic",
    )


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
    exit_after = float(ENV.get("FAKE_CLOUDFLARED_EXIT_AFTER", "0") or 0)
    deadline = time.monotonic() + exit_after if exit_after > 0 else None
    while not stop.wait(0.05):
        if deadline is not None and time.monotonic() >= deadline:
            log("ERR", "fake: connection lost, exiting")
            return 12
    return 0


if __name__ == "__main__":
    sys.exit(main())
