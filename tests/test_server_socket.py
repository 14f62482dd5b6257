"""The listening socket we bind: TCP_NODELAY on accepted connections (no Nagle stalls)."""

from __future__ import annotations

import socket

import httpx
from support import free_port, health_app

from taskapp_notebook import InProcessTaskApp
from taskapp_notebook.ports import bind_listener


def test_listener_declares_tcp_so_asyncio_sets_nodelay() -> None:
    sock = bind_listener("127.0.0.1", free_port())
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


async def test_accepted_connections_have_tcp_nodelay() -> None:
    # Without TCP_NODELAY every keep-alive response waited ~40 ms for a delayed ACK.
    async with InProcessTaskApp(
        app=health_app(), tunnel_mode="local", serve_on="loop", port=free_port(), api_key="k"
    ) as task_app:
        async with httpx.AsyncClient(trust_env=False) as client:
            response = await client.get(f"{task_app.local_url}/health", headers={"X-API-Key": "k"})
            assert response.status_code == 200
            server = task_app._server
            assert server is not None
            connections = list(server.server.server_state.connections)
            assert connections, "the client's keep-alive connection should be open"
            for connection in connections:
                sock = connection.transport.get_extra_info("socket")
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
