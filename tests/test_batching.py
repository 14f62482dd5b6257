"""Several SynthTunnel frames in one TCP write (``tunnels/synthtunnel/batching.py``), on a
real websockets client/server pair on 127.0.0.1."""

from __future__ import annotations

import asyncio
from typing import Any

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from taskapp_notebook.tunnels.synthtunnel.attach import AgentClientConnection
from taskapp_notebook.tunnels.synthtunnel.batching import COALESCE_LIMIT, send_frames


async def test_a_burst_of_small_frames_is_one_write_and_arrives_intact() -> None:
    received: list[str | bytes] = []
    done = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        async for message in ws:
            received.append(message)
            if len(received) == 5:
                done.set()

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", create_connection=AgentClientConnection) as ws:
            writes: list[int] = []
            real_write = ws.transport.write

            def counting_write(data: Any) -> None:
                writes.append(len(data))
                real_write(data)

            ws.transport.write = counting_write  # type: ignore[method-assign]
            await send_frames(ws, ['{"type":"RESP_HEADERS"}', b"\x02\x01rbody", '{"type":"END"}'])
            assert len(writes) == 1  # three frames, one write (one segment for the relay)
            big = b"x" * COALESCE_LIMIT
            await send_frames(ws, [big, "after"])  # past the limit: written as they are
            assert len(writes) == 3
            await asyncio.wait_for(done.wait(), 5)
    assert received == ['{"type":"RESP_HEADERS"}', b"\x02\x01rbody", '{"type":"END"}', big, "after"]
