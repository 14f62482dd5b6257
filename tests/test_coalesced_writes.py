"""``server.http_protocol()`` (every server of ours): a response goes out in one ``send``
instead of uvicorn's two to four, and bodies of every shape arrive intact. Real
uvicorn on 127.0.0.1; the write count is read from asyncio's socket transport."""

from __future__ import annotations

import asyncio
import os
import socket
from asyncio import selector_events
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from taskapp_notebook.server import CoalescingH11Protocol, ServerHandle, http_protocol

BIG = os.urandom(1024 * 1024)


async def small(_: Any) -> Response:
    return Response(b"hello", headers={"x-app": "1"})


async def big(_: Any) -> Response:
    return Response(BIG)


async def stream(_: Any) -> StreamingResponse:
    async def parts() -> AsyncIterator[bytes]:
        for i in range(3):
            yield b"part%d;" % i
            await asyncio.sleep(0)

    return StreamingResponse(parts())


APP = Starlette(routes=[Route("/small", small), Route("/big", big), Route("/stream", stream)])


async def writes_per_response(http: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    handle = ServerHandle(APP, sock, lifespan="off", http=http)
    await handle.start()
    writes: list[int] = []
    real_write = selector_events._SelectorSocketTransport.write

    def counting(self: Any, data: Any) -> None:
        if self.get_extra_info("sockname")[1] == handle.port:  # the server's side only
            writes[-1] += 1
        real_write(self, data)

    monkeypatch.setattr(selector_events._SelectorSocketTransport, "write", counting)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.port}") as client:
            for _ in range(3):
                writes.append(0)
                r = await client.get("/small")
                assert (r.status_code, r.content, r.headers["x-app"]) == (200, b"hello", "1")
            writes.append(0)
            assert (await client.get("/big")).content == BIG
            writes.append(0)
            assert (await client.get("/stream")).content == b"part0;part1;part2;"
    finally:
        monkeypatch.undo()
        await handle.stop()
    return writes


@pytest.mark.parametrize("parser", ["h11", "httptools"])
async def test_one_send_per_small_response_and_bodies_intact(
    parser: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """For both of uvicorn's parsers (``http_protocol()`` picks httptools when installed)."""
    if parser == "httptools":
        pytest.importorskip("httptools", reason="httptools is a dependency; missing here")
    coalescing = CoalescingH11Protocol if parser == "h11" else http_protocol()
    assert parser != "httptools" or "HttpTools" in coalescing.__name__
    plain = await writes_per_response(parser, monkeypatch)
    coalesced = await writes_per_response(coalescing, monkeypatch)
    assert min(plain[:3]) >= 2, plain  # uvicorn: head, then body (then end)
    assert coalesced[:3] == [1, 1, 1], coalesced
    assert coalesced[3] <= plain[3]  # 1 MiB: the body is written as it is, not held
