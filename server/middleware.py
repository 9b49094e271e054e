"""The two plain ASGI middlewares in front of the routes: a bearer API key, and a bound on
the request body's size (and its encoding).

Plain ASGI on purpose, not @app.middleware("http"): BaseHTTPMiddleware wraps `receive` so
that a handler's request.is_disconnected() never sees the client leave, and nothing would be
aborted."""
from __future__ import annotations

import hmac
import json

from server.errors import error_response

# no API key needed; /kv is the inspector's static page, whose script asks for the key
OPEN_PATHS = {"/health", "/metrics", "/kv"}


class BearerAuth:
    """`Authorization: Bearer <key>` on every path but OPEN_PATHS, else 401."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                response = error_response(401, "invalid or missing API key (Authorization: "
                                          "Bearer <key>)", "authentication_error")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


# Request bodies above this many bytes get 413 before they are read whole (`kvserve serve
# --max-request-bytes`): 4 MiB holds ~1M characters of prompt, far beyond any context here.
MAX_REQUEST_BYTES = 4 * 1024 * 1024


class BodyLimit:
    """413 in OpenAI's error shape for a body over `limit` bytes: at once from Content-Length;
    a body without one (chunked) is read here up to the limit first (the handler would read
    it whole anyway) and replayed to the app. A body in UTF-16 or UTF-32 (which Python's
    json would decode) is a 400: JSON between systems is UTF-8 (RFC 8259, 8.1), and a client
    that sends anything else is better told than guessed for."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._too_large(scope, receive, send)
        parts, seen = [], 0
        while True:  # all of a chunked body; the first message of a sized one
            message = await receive()
            if message["type"] != "http.request":  # the client left before the body ended
                return
            parts.append(message.get("body", b""))
            seen += len(parts[-1])
            if seen > self.limit:
                return await self._too_large(scope, receive, send)
            if length is not None or not message.get("more_body", False):
                break
        head = b"".join(parts)
        encoding = json.detect_encoding(head[:4]) if len(head) >= 2 else "utf-8"
        if encoding not in ("utf-8", "utf-8-sig"):
            return await error_response(
                400, f"the request body is {encoding.upper()}; JSON must be UTF-8")(
                    scope, receive, send)
        replayed = False
        more = message.get("more_body", False)

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": head, "more_body": more}
            return await receive()
        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        response = error_response(413, f"the request body is larger than {self.limit} bytes "
                                       f"(kvserve serve --max-request-bytes)")
        await response(scope, receive, send)
