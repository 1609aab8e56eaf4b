"""What every route of the simulator answers with: Graph's error body, a dropped connection (an injected
fault), and a request body read whole within a limit. Shared by the mail and write routes (:mod:`.server`) and
the export API's (:mod:`.export_api`)."""

from __future__ import annotations

import secrets
import time

from aiohttp import web

from mailpipe.sim.posted import MAX_REQUEST_BYTES


class Reset(Exception):
    """Injected fault: drop the connection without a response."""


def graph_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"code": code, "message": message,
                      "innerError": {"request-id": secrets.token_hex(8), "date": time.strftime("%Y-%m-%dT%H:%M:%S")}}}
    return web.json_response(body, status=status, headers=headers)


async def read_body(request: web.Request, limit: int) -> tuple[bytes | None, int]:
    """The whole request body and its length, or (None, length) when longer than ``limit`` (read to the end
    all the same, so that the client gets the answer rather than a broken connection)."""
    chunks, n = [], 0
    async for chunk in request.content.iter_chunked(1 << 16):
        n += len(chunk)
        if n <= limit:
            chunks.append(chunk)
    return (b"".join(chunks) if n <= limit else None), n


def too_large(n: int) -> web.Response:
    return graph_error(413, "RequestEntityTooLarge", f"The request body ({n} bytes) is over the limit of "
                       f"{MAX_REQUEST_BYTES} bytes: add attachments over 3 MB through an upload session.")
