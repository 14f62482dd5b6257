"""A process that is not ours, holding a TCP port on 127.0.0.1 (test helper).

Usage::

    python foreign_listener.py listen PORT [--ignore-sigterm] [--setuid UID]
    python foreign_listener.py connect PORT

``listen`` binds and listens on PORT (with SO_REUSEADDR, like uvicorn and http.server)
and accepts connections forever; ``connect`` is a mere client connected to PORT.
``--setuid`` drops to another user once the socket is bound (needs root). Both print
``ready <pid>`` on stdout once the socket is set up, then block until killed.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["listen", "connect"])
    parser.add_argument("port", type=int)
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--setuid", type=int)
    args = parser.parse_args()
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.role == "listen":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", args.port))
        sock.listen(16)
        if args.setuid is not None:
            os.setgid(args.setuid)
            os.setuid(args.setuid)
        print("ready", os.getpid(), flush=True)
        accepted = []
        while True:
            conn, _ = sock.accept()
            accepted.append(conn)  # keep client connections open
    else:
        sock = socket.create_connection(("127.0.0.1", args.port))
        print("ready", os.getpid(), flush=True)
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    main()
