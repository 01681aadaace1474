"""Request limits: body size (ASGI middleware, 413) and per-request checks the routers call.

Every refusal names the setting that bounds it (``rule``), so an operator knows what to raise:
- ``max_body_bytes``: a body larger than this is refused with 413 before the app reads it (by
  Content-Length when sent, else while reading; at most this many bytes are ever buffered).
- ``max_engines``: launching one more engine than this is refused with 409 (failed records count).
- ``max_patch_elements``: an inline patch with more changed elements is refused with 422.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence

from wsync.errors import Conflict, InvalidInput

BODY_METHODS = {"POST", "PUT", "PATCH"}


class BodySizeLimit:
    """Pure ASGI middleware: buffer at most ``max_bytes`` of a request body, else answer 413."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, headers)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(send, headers)
                return
            chunks.append(message)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(chunks, receive), send)

    async def _refuse(self, send, headers: dict) -> None:
        rid = headers.get(b"x-request-id", b"").decode("latin-1") or f"req-{uuid.uuid4().hex[:16]}"
        body = json.dumps({"error": {
            "type": "payload_too_large", "field": "body", "rule": "max_body_bytes", "request_id": rid,
            "message": f"request body larger than max_body_bytes={self.max_bytes} (WSYNC_MAX_BODY_BYTES)"}}).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"x-request-id", rid.encode("latin-1")), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _replay(chunks: list[dict], receive):
    pending = list(chunks)

    async def replay():
        if pending:
            return pending.pop(0)
        return await receive()  # after the body: only http.disconnect can come

    return replay


def check_engine_count(current: int, max_engines: int) -> None:
    """409 when the service already holds ``max_engines`` engines (delete some first)."""
    if current >= max_engines:
        raise Conflict(f"the service already holds {current} engine(s), the limit is max_engines={max_engines} "
                       "(WSYNC_MAX_ENGINES); delete an engine first", field="max_engines", rule="max_engines")


def check_patch_elements(patches: Sequence | None, max_elements: int, field: str = "patches") -> None:
    """422 when inline patches carry more changed elements than ``max_patch_elements``."""
    total = sum(len(p.indices) for p in patches or ())
    if total > max_elements:
        raise InvalidInput(f"{field}: {total} changed elements, the limit is max_patch_elements={max_elements} "
                           "(WSYNC_MAX_PATCH_ELEMENTS)", field=field, rule="max_patch_elements")


def check_random_patch(density: float | None, params: list[str] | None, specs: dict[str, dict],
                       max_elements: int) -> None:
    """422 when a random patch would change more elements than ``max_patch_elements``."""
    if density is None:
        return
    names = params if params is not None else list(specs)
    numel = 0
    for name in names:
        shape = (specs.get(name) or {}).get("shape") or []
        n = 1
        for dim in shape:
            n *= int(dim)
        numel += n
    expected = int(density * numel)
    if expected > max_elements:
        raise InvalidInput(f"density: {density} of {numel} elements is about {expected} changed elements, the "
                           f"limit is max_patch_elements={max_elements} (WSYNC_MAX_PATCH_ELEMENTS)",
                           field="density", rule="max_patch_elements")
