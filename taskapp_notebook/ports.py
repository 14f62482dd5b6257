"""Port and host validation, binding our own listening socket, and who holds a port.

We bind the listening socket ourselves and hand it to uvicorn, so there is no
probe-then-bind race: the port is ours from the moment ``bind_listener`` returns.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from dataclasses import dataclass

from .errors import InvalidParameterError, PortInUseError

logger = logging.getLogger(__name__)

MIN_PORT = 1024
MAX_PORT = 65535
#: InProcessTaskApp's default port (the seed's): moving off it is not worth a warning.
DEFAULT_PORT = 8114
ALLOWED_HOSTS = ("127.0.0.1", "localhost", "0.0.0.0")
_BACKLOG = 2048


def validate_port(port: object) -> int:
    """Return ``port`` if it is an int in [1024, 65535]; else raise InvalidParameterError."""
    if isinstance(port, bool) or not isinstance(port, int):
        raise InvalidParameterError(
            f"Port must be an int in [{MIN_PORT}, {MAX_PORT}], got {port!r}."
        )
    if not MIN_PORT <= port <= MAX_PORT:
        raise InvalidParameterError(
            f"Port must be in range [{MIN_PORT}, {MAX_PORT}], got {port!r}. "
            "Ports below 1024 need root; pick e.g. 8114."
        )
    return port


def validate_host(host: object) -> str:
    """Return ``host`` if it is one of ALLOWED_HOSTS; else raise InvalidParameterError."""
    if host not in ALLOWED_HOSTS:
        raise InvalidParameterError(
            f"Host must be one of {', '.join(map(repr, ALLOWED_HOSTS))} for security, "
            f"got {host!r}. Expose the app through a tunnel instead of a public interface."
        )
    return str(host)


def bind_address(host: str) -> str:
    """The address to bind for ``host`` (``localhost`` binds IPv4 loopback)."""
    return "127.0.0.1" if host == "localhost" else host


def bind_listener(host: str, port: int) -> socket.socket:
    """Bind and listen on ``host:port``. Raises OSError (EADDRINUSE) when taken."""
    # IPPROTO_TCP explicitly: asyncio enables TCP_NODELAY on accepted connections only when
    # the listener says it is TCP (proto 0 would leave Nagle on: ~40 ms per response).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        # Reuse TIME_WAIT addresses (a just-stopped app), never a live listener.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bind_address(host), port))
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    logger.debug("Bound %s:%d", host, port)
    return sock


def is_port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when a listener could bind ``host:port`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((bind_address(host), port))
        except OSError:
            return False
        return True


def pick_free_port(host: str = "127.0.0.1") -> int:
    """A port the OS considers free on ``host`` right now (for helpers such as metrics)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((bind_address(host), 0))
        port: int = probe.getsockname()[1]
        return port


def is_addr_in_use(exc: OSError) -> bool:
    return exc.errno in (errno.EADDRINUSE, errno.EACCES)


def bind_first_free(host: str, port: int, *, pinned: bool = True) -> socket.socket:
    """Bind ``port`` or the next free port upward.

    Moving is logged at WARNING when the caller chose ``port`` (``pinned``: its URL is not
    the one they asked for) and at INFO when it was only the default: nothing the user chose
    changed, and a notebook shows WARNING lines in red.
    """
    for candidate in range(port, MAX_PORT + 1):
        try:
            sock = bind_listener(host, candidate)
        except OSError as exc:
            if not is_addr_in_use(exc):
                raise
            logger.debug("Port %d on %s is busy", candidate, host)
            continue
        if candidate != port:
            logger.log(
                logging.WARNING if pinned else logging.INFO,
                "Port %d on %s is in use; using port %d instead (auto_find_port=True)",
                port,
                host,
                candidate,
            )
        return sock
    raise PortInUseError(
        f"No free port between {port} and {MAX_PORT} on {host!r}. "
        "Stop some servers or pass a lower port."
    )


@dataclass(frozen=True)
class PortHolder:
    """A process listening on a port."""

    pid: int
    name: str
    cmdline: str
    uid: int | None

    def describe(self) -> str:
        return f"pid {self.pid} ({self.cmdline or self.name})"


def listening_holders(port: int) -> list[PortHolder]:
    """Processes with a socket *listening* on ``port`` (clients of it are not listed)."""
    import psutil

    holders: dict[int, PortHolder] = {}
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):  # pragma: no cover - macOS without root
        logger.debug("Cannot list sockets to find who holds port %d", port)
        return []
    for conn in connections:
        if conn.status != psutil.CONN_LISTEN or not conn.laddr or conn.laddr.port != port:
            continue
        if conn.pid is None or conn.pid in holders:
            continue
        try:
            proc = psutil.Process(conn.pid)
            name = proc.name()
            cmdline = " ".join(proc.cmdline())[:200]
            uid: int | None = proc.uids().real
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            name, cmdline, uid = "?", "", None
        holders[conn.pid] = PortHolder(conn.pid, name, cmdline, uid)
    return list(holders.values())


def terminate_holder(holder: PortHolder, *, grace: float = 2.0) -> bool:
    """SIGTERM ``holder``, wait up to ``grace`` seconds, then SIGKILL. True if it is gone.

    Refuses (returns False) for this process and for other users' processes.
    """
    import psutil

    if holder.pid == os.getpid() or holder.uid != os.getuid():
        return False
    try:
        proc = psutil.Process(holder.pid)
        logger.warning("Terminating %s, which holds the port (auto_find_port=False)",
                       holder.describe())
        proc.terminate()
        _, alive = psutil.wait_procs([proc], timeout=grace)
        for p in alive:
            logger.warning("%s ignored SIGTERM; sending SIGKILL", holder.describe())
            p.kill()
        psutil.wait_procs(alive, timeout=grace)
    except psutil.NoSuchProcess:
        pass
    except psutil.AccessDenied:
        return False
    return not psutil.pid_exists(holder.pid) or _is_zombie(holder.pid)


def _is_zombie(pid: int) -> bool:
    import psutil

    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


async def acquire_port(
    host: str, port: int, *, auto_find_port: bool, pinned: bool = True
) -> socket.socket:
    """Bind ``port`` on ``host`` as the seed describes.

    ``auto_find_port=True``: the next free port upward. ``False``: a *listening* process of
    this user that holds the port is terminated (never this process, never a client, never
    another user's); then PortInUseError if it is still busy, naming the holder.
    """
    if auto_find_port:
        return bind_first_free(host, port, pinned=pinned)
    try:
        return bind_listener(host, port)
    except OSError as exc:
        if not is_addr_in_use(exc):
            raise
    holders = await asyncio.to_thread(listening_holders, port)
    for holder in holders:
        if holder.pid == os.getpid():
            raise PortInUseError(
                f"Port {port} on {host!r} is in use by this process (pid {holder.pid}), by a "
                "server that taskapp_notebook did not start. Close it, pick another port, or "
                "pass auto_find_port=True."
            )
        if holder.uid != os.getuid():
            raise PortInUseError(
                f"Port {port} on {host!r} is in use by {holder.describe()}, owned by another "
                "user; not touching it. Pick another port or pass auto_find_port=True."
            )
        await asyncio.to_thread(terminate_holder, holder)
    for _ in range(40):
        try:
            return bind_listener(host, port)
        except OSError as exc:
            if not is_addr_in_use(exc):
                raise
        await asyncio.sleep(0.025)
    alive = [h for h in holders if _alive(h.pid)]
    if alive:
        why = f"is still in use by {'; '.join(h.describe() for h in alive)}"
    elif holders:
        why = ("is still busy although its holder has exited (the OS keeps the address while "
               "old connections close; this can take up to a minute)")
    else:
        why = "is in use, and no listening process could be identified"
    raise PortInUseError(
        f"Port {port} on {host!r} {why}. Pick another port, wait, or pass auto_find_port=True."
    )


def _alive(pid: int) -> bool:
    import psutil

    return bool(psutil.pid_exists(pid)) and not _is_zombie(pid)
