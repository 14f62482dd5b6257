"""Helpers shared by the benchmarks: the echo task app, the table markers in docs/performance.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response

ROOT = Path(__file__).resolve().parent.parent


def write_table(name: str, text: str) -> None:
    """Replace the text between ``<!-- bench:NAME:start -->`` and ``...:end -->`` in
    docs/performance.md (the README keeps one headline line and a link there)."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    doc = ROOT / "docs" / "performance.md"
    content = doc.read_text()
    if start not in content or end not in content:
        raise SystemExit(f"docs/performance.md has no {start} ... {end} markers")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{start}\n{text}\n{end}{tail}")


#: The old name: the benchmarks' ``--write-readme`` flags now write docs/performance.md.
write_readme_table = write_table


def echo_app() -> Any:
    """A task app with ``GET /health``, ``POST /echo`` (the body, back as it came),
    ``GET /bytes?n=`` (n bytes) and ``POST /sink`` (reads the body, answers its size)."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"healthy": True}

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        return Response(await request.body(), media_type="application/octet-stream")

    @app.get("/bytes")
    async def nbytes(n: int = 0) -> Response:
        return Response(b"z" * n, media_type="application/octet-stream")

    @app.post("/sink")
    async def sink(request: Request) -> dict[str, int]:
        return {"received": len(await request.body())}

    return app
