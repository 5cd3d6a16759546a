"""Local-disk tier: one file per object, atomic writes, checksummed, index rebuilt on start.

Layout under ``root``::

    objects/<2 hex of xxh3(key)>/<key>   framed objects (see ``base.py``)
    quarantine/<key>.<unix time>         objects that failed verification (kept for inspection)

Writes go to a temp file in the target folder, are fsynced, renamed over the target and the folder
is fsynced. On start the index (key -> size) is rebuilt from the files; headers are checked then
(magic, version, key, length against the file size: a truncated file is caught here) and the full
checksum on every read. A file failing either check is moved to ``quarantine/`` and treated as missing.
Any other ``OSError`` (a directory where a file belongs, EIO, EACCES, ENOSPC) is raised as
:class:`StoreError` (the API answers 503), never as the bare ``OSError``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import xxhash

from .base import (
    HEADER_SIZE,
    MAX_KEY_LEN,
    CorruptObjectError,
    Store,
    StoreError,
    checksum64,
    frame,
    parse_frame_header,
    validate_key,
)

log = logging.getLogger(__name__)

_TMP_PREFIX = ".tmp-"


class DiskStore(Store):
    name = "disk"
    durable = True

    def __init__(self, root: str | os.PathLike, *, fsync: bool = True, inline_read_bytes: int = 1 << 20):
        """``inline_read_bytes``: objects up to this size are read on the calling (event loop) thread,
        larger ones in a worker thread. A small read from the page cache costs less than the thread
        hand-off and queueing (which dominated the p99 latency with 32 clients)."""
        self.root = Path(root)
        self.inline_read_bytes = inline_read_bytes
        self.objects = self.root / "objects"
        self.quarantine_dir = self.root / "quarantine"
        self.fsync = fsync
        self._index: dict[str, int] = {}  # key -> payload bytes
        self.quarantined = 0
        self.objects.mkdir(parents=True, exist_ok=True)
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        self._rebuild_index()

    # ------------------------------------------------------------------------------ paths
    def _path(self, key: str) -> Path:
        return self.objects / xxhash.xxh3_64_hexdigest(key.encode())[:2] / key

    def _rebuild_index(self) -> None:
        t0 = time.perf_counter()
        for sub in self.objects.iterdir():
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub):
                if entry.name.startswith(_TMP_PREFIX):  # an interrupted write
                    _unlink(Path(entry.path))
                    continue
                path = Path(entry.path)
                try:
                    validate_key(entry.name)
                    if path != self._path(entry.name):
                        raise CorruptObjectError("file is not where its key belongs")
                    with open(path, "rb") as fh:
                        head = fh.read(HEADER_SIZE + MAX_KEY_LEN)
                    h = parse_frame_header(head)
                    if h.key != entry.name:
                        raise CorruptObjectError(f"file holds key {h.key!r}")
                    size = entry.stat().st_size
                    if size != h.total:
                        raise CorruptObjectError(f"file is {size} bytes, header says {h.total} (truncated?)")
                except (CorruptObjectError, ValueError, OSError) as exc:
                    self._quarantine(path, entry.name, exc)
                    continue
                self._index[entry.name] = h.length
        log.info("disk store %s: %d objects indexed in %.3f s", self.root, len(self._index), time.perf_counter() - t0)

    def _quarantine(self, path: Path, key: str, reason: Exception | str) -> None:
        self._index.pop(key, None)
        self.quarantined += 1
        dest = self.quarantine_dir / f"{key[:150]}.{time.time_ns()}"
        log.warning("disk store: %s failed verification (%s); quarantined to %s", path, reason, dest)
        try:
            os.replace(path, dest)
        except OSError:
            _unlink(path)

    # ------------------------------------------------------------------------------ sync I/O
    def _read(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            with open(path, "rb") as fh:
                head = fh.read(HEADER_SIZE + len(key.encode()))
                h = parse_frame_header(head)
                if h.key != key:
                    raise CorruptObjectError(f"file holds key {h.key!r}")
                size = os.fstat(fh.fileno()).st_size
                if size != h.total:
                    raise CorruptObjectError(f"file is {size} bytes, header says {h.total} (truncated?)")
                payload = fh.read(h.length)
            if len(payload) != h.length:
                raise CorruptObjectError("short read")
            if checksum64(payload) != h.checksum:
                raise CorruptObjectError("checksum mismatch")
            return payload
        except FileNotFoundError:
            self._index.pop(key, None)
            return None
        except CorruptObjectError as exc:
            self._quarantine(path, key, exc)
            return None
        except OSError as exc:
            raise StoreError(f"disk store: cannot read {key}: {exc}") from exc

    def _write(self, key: str, value: bytes) -> None:
        path = self._path(key)
        tmp = path.parent / f"{_TMP_PREFIX}{os.getpid()}-{time.time_ns()}-{key[:60]}"
        data = frame(key, value)
        try:
            path.parent.mkdir(exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            if self.fsync:
                dfd = os.open(path.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as exc:
            _unlink(tmp)
            raise StoreError(f"disk store: cannot write {key}: {exc}") from exc

    def _remove(self, key: str) -> bool:
        try:
            os.unlink(self._path(key))
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(f"disk store: cannot remove {key}: {exc}") from exc

    # ------------------------------------------------------------------------------ async API
    async def get(self, key: str) -> bytes | None:
        validate_key(key)
        size = self._index.get(key)
        if size is None:
            return None
        if size <= self.inline_read_bytes:
            return self._read(key)
        return await asyncio.to_thread(self._read, key)

    async def put(self, key: str, value: bytes) -> None:
        validate_key(key)
        await asyncio.to_thread(self._write, key, bytes(value))
        self._index[key] = len(value)

    async def contains(self, key: str) -> bool:
        validate_key(key)
        return key in self._index

    async def delete(self, key: str) -> bool:
        validate_key(key)
        removed = await asyncio.to_thread(self._remove, key)
        self._index.pop(key, None)
        return removed

    async def keys(self, prefix: str) -> list[str]:
        return [k for k in self._index if k.startswith(prefix)]

    async def sizes(self) -> dict[str, int]:
        """The index, built from verified headers at open and kept by every write."""
        return dict(self._index)

    async def stats(self) -> dict[str, dict[str, int]]:
        return {self.name: {"objects": len(self._index), "bytes": sum(self._index.values()),
                            "quarantined": self.quarantined}}

    async def ping(self) -> None:
        if not self.objects.is_dir():
            raise StoreError(f"disk store folder {self.objects} is gone")


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
