"""A bytes response sent in pieces (with back-pressure), with single-range support (RFC 9110)."""

from __future__ import annotations

import logging
import re
from typing import Callable

import xxhash
from fastapi import HTTPException
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ctxstream.manifest import checksum_hex

_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*([0-9]{0,18})\s*-\s*([0-9]{0,18})\s*\Z", re.IGNORECASE)  # ASCII digits, < 2**63


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end_exclusive)`` of a ``Range`` header, None for no header; 416 when unsatisfiable.

    Accepts one range: ``bytes=a-b``, ``bytes=a-``, ``bytes=-n``. Several ranges, other units or a
    malformed header are answered with 416 and a reason.
    """
    if header is None:
        return None
    m = _RANGE_RE.match(header)
    if not m or (m.group(1) == "" and m.group(2) == ""):
        raise range_error(size, f"unsupported Range {header!r}: one 'bytes=start-end' range only")
    a, b = m.group(1), m.group(2)
    if a == "":  # suffix: the last n bytes
        n = int(b)
        if n == 0 or size == 0:
            raise range_error(size, f"empty suffix range {header!r}")
        return max(0, size - n), size
    start = int(a)
    end = size - 1 if b == "" else min(int(b), size - 1)
    if start >= size or (b != "" and int(b) < start):
        raise range_error(size, f"range {header!r} not satisfiable for {size} bytes")
    return start, end + 1


def range_error(size: int, reason: str) -> HTTPException:
    return HTTPException(416, reason, headers={"Content-Range": f"bytes */{size}"})


log = logging.getLogger(__name__)


class ServedChecksumError(RuntimeError):
    """The bytes being sent are not the object's checksum: the response is cut off before its last
    piece, so the client never receives a complete body of them."""


def verify_before_sending(size: int, ranged: bool, upfront_bytes: int) -> bool:
    """Whether a route checks an object's checksum before the response starts (a 404 with a reason
    when it fails) or lets :class:`PiecewiseResponse` check it as the pieces go out. Ranges are
    checked first (the range need not cover the object); so are objects of at most ``upfront_bytes``
    (hashing them costs less than a millisecond). A large object is hashed as it is sent: its
    first byte leaves without waiting for a hash of all of it (~30 ms for 256 MiB)."""
    return ranged or size <= upfront_bytes


class PiecewiseResponse(Response):
    """Sends ``data[start:end]`` in ``piece``-byte messages; calls ``on_sent(nbytes)`` when done.

    With ``checksum`` (the xxh3-64 hex of the whole ``data``, which must then be the whole body), each
    piece is hashed before it is sent and the last piece only goes out if the digest matches;
    otherwise :class:`ServedChecksumError` is raised and the server drops the connection, so the
    client holds a short body (its own checksum check, or a Range resume that is checked first,
    then fails it)."""

    def __init__(self, data: bytes, *, start: int, end: int, status_code: int, headers: dict[str, str],
                 piece: int = 1 << 20, media_type: str = "application/octet-stream",
                 on_sent: Callable[[int], None] | None = None, checksum: str | None = None):
        if checksum is not None and (start != 0 or end != len(data)):
            raise ValueError("a checksum checked while sending covers the whole object, not a range")
        self.data, self.start, self.end, self.piece, self.on_sent = data, start, end, piece, on_sent
        self.checksum = checksum
        super().__init__(content=None, status_code=status_code, headers=headers, media_type=media_type)
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.raw_headers.append((b"content-length", str(end - start).encode()))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        sent = 0
        if scope.get("method") != "HEAD":
            view = memoryview(self.data)[self.start : self.end]
            h = xxhash.xxh3_64() if self.checksum is not None else None
            for off in range(0, len(view), self.piece):
                part = view[off : off + self.piece]
                if h is not None:
                    h.update(part)
                    if off + self.piece >= len(view) and h.hexdigest() != self.checksum:
                        log.error("object of %d bytes does not match its checksum %s: response cut off after "
                                  "%d bytes", len(view), self.checksum, sent)
                        raise ServedChecksumError(f"object does not match its checksum {self.checksum}")
                await send({"type": "http.response.body", "body": part, "more_body": True})
                sent += len(part)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        if self.on_sent is not None:
            self.on_sent(sent)


def object_response(request, data, size: int, checksum: str, *, headers: dict[str, str], piece: int,
                    upfront_bytes: int, on_sent: Callable[[int], None] | None,
                    missing: Callable[[], HTTPException]) -> "PiecewiseResponse":
    """The response of a stored object whose manifest gives ``size`` and ``checksum`` (xxh3 hex): whole
    (200), or the request's ``Range`` (206; sent whole when ``If-Range`` names another ETag). The
    checksum is compared before the first byte (ranges and objects up to ``upfront_bytes``, see
    :func:`verify_before_sending`) or as the pieces are sent. Raises ``missing()`` (the route's 404
    with its reason) when ``data`` is None, not ``size`` bytes, or fails the check made first.
    ``headers``: the route's own, beside the ETag, checksum, size and range headers set here."""
    etag = f'"{checksum}"'
    whole = data is not None and len(data) == size
    rng = parse_range(request.headers.get("range"), size) if whole else None
    if_range = request.headers.get("if-range")
    if rng is not None and if_range is not None and if_range.strip() != etag:
        rng = None  # the client's partial copy is of another object: send it whole
    upfront = verify_before_sending(size, rng is not None, upfront_bytes)
    if not whole or (upfront and checksum_hex(data) != checksum):
        raise missing()
    start, end = rng if rng is not None else (0, size)
    out = {"Accept-Ranges": "bytes", "ETag": etag, "X-Checksum-Xxh3": checksum, "X-Chunk-Bytes": str(size),
           **headers}
    if rng is not None:
        out["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    return PiecewiseResponse(data, start=start, end=end, status_code=206 if rng is not None else 200,
                             headers=out, piece=piece, on_sent=on_sent, checksum=None if upfront else checksum)
