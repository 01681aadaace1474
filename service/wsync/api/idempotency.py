"""``Idempotency-Key`` on every POST (an ASGI middleware inside the request-id middleware). Only a
request that would pass the token guard (wsync.api.auth) takes part: any other goes straight to the
app and gets its 401/403, so a replay needs the token as much as the first request did.

- The first request with a key claims it (wsync.jobs.idempotency, in the database) with a hash of
  method, path, query and body; its answer is stored once it ends.
- A retry with the same key and the same request gets that answer again, byte for byte (the same job
  for a 202), with ``Idempotent-Replayed: true``; nothing is done twice.
- The same key with a different request: 422 naming the header (rule ``idempotency_key_reuse``).
- The same key while the first request still runs: 409 with Retry-After.
- Answers that say "try again" (5xx, 429, a 409 with Retry-After) are not stored: the key is released
  so the retry does the work."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from fastapi import FastAPI

from wsync.jobs.idempotency import IdempotencyKeys

HEADER = "Idempotency-Key"
MAX_KEY = 255


def _envelope(scope: dict, status: int, type_: str, message: str, rule: str,
              extra: list[tuple[bytes, bytes]] = ()) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    rid = (scope.get("state") or {}).get("request_id") or "-"
    body = {"error": {"type": type_, "message": message, "field": HEADER, "rule": rule, "request_id": rid}}
    return status, [(b"content-type", b"application/json"), *extra], json.dumps(body).encode()


class IdempotencyMiddleware:
    def __init__(self, app: Any, fastapi_app: FastAPI):
        self.app, self.fastapi_app = app, fastapi_app

    def _keys(self) -> IdempotencyKeys | None:
        state = self.fastapi_app.state
        keys = getattr(state, "idempotency", None)
        if keys is None and getattr(state, "wsync", None) is not None:
            keys = state.idempotency = IdempotencyKeys(state.wsync.store.engine)
        return keys

    def _authorized(self, scope: dict) -> bool:
        settings = getattr(self.fastapi_app.state, "auth_settings", None)
        token = getattr(settings, "api_token", None)
        if not token:
            return True
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        key = dict(scope["headers"]).get(HEADER.lower().encode())
        keys = self._keys() if key is not None else None
        if key is None or keys is None or not self._authorized(scope):
            return await self.app(scope, receive, send)
        key_s = key.decode("latin-1").strip()
        if not key_s or len(key_s) > MAX_KEY:
            return await _answer(send, *_envelope(scope, 422, "validation_error",
                                                  f"{HEADER} must be 1..{MAX_KEY} characters", "idempotency_key"))
        body, more = b"", True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        digest = hashlib.sha256(b"\n".join([scope["method"].encode(), scope["path"].encode(),
                                            scope.get("query_string", b""), body])).hexdigest()
        stored = keys.claim(key_s, digest)
        if stored is not None:
            return await _replay(scope, send, stored, digest)
        await self._first(scope, receive, send, keys, key_s, body)

    async def _first(self, scope, receive, send, keys: IdempotencyKeys, key: str, body: bytes) -> None:
        sent = False

        async def replay_receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        start: dict = {}
        chunks: list[bytes] = []

        async def capture(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, replay_receive, capture)
        except BaseException:
            keys.release(key)
            raise
        status = int(start.get("status", 500))
        headers = {k.lower(): v for k, v in start.get("headers", [])}
        if status >= 500 or status == 429 or (status == 409 and b"retry-after" in headers):
            keys.release(key)
        else:
            ctype = headers.get(b"content-type", b"application/json").decode("latin-1")
            keys.finish(key, status, b"".join(chunks).decode("utf-8", "replace"), ctype)


async def _replay(scope: dict, send: Any, stored: Any, digest: str) -> None:
    if stored.request_hash != digest:
        return await _answer(send, *_envelope(
            scope, 422, "validation_error", f"this {HEADER} was used with a different request; use a new key "
            "for a new request", "idempotency_key_reuse"))
    if stored.state != "done":
        return await _answer(send, *_envelope(
            scope, 409, "conflict", f"a request with this {HEADER} is still running; retry later",
            "idempotency_key_in_flight", [(b"retry-after", b"1")]))
    headers = [(b"content-type", (stored.content_type or "application/json").encode()),
               (b"idempotent-replayed", b"true")]
    await _answer(send, stored.status or 200, headers, (stored.body or "").encode())


async def _answer(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def install(app: FastAPI) -> None:
    """Add the middleware; call it before the request-id middleware is installed (Starlette runs the
    last added first), so it runs inside it and its answers carry the request id."""
    app.add_middleware(IdempotencyMiddleware, fastapi_app=app)
