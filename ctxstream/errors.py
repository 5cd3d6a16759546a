"""The root of every error ctxstream raises on purpose.

``except CtxstreamError`` catches all of them. Each family still subclasses the built-in it is a kind
of (``ValueError`` for bad input, ``RuntimeError`` for a failed operation, ``FileNotFoundError`` for
missing data), so code written against the built-ins keeps working:

* codec (``ctxstream.codec.errors.CodecError``: malformed, truncated, checksum, version, model, limit,
  unknown level) and the entropy coder's ``RansError``;
* model, manifest, positions, corpora (``ModelError``, ``ManifestError``, ``PositionError``, ``CorpusError``);
* store (``ctxstream.streamer.storage.StoreError``, ``InvalidKeyError``, ``CorruptObjectError``, the
  hierarchy's and the sessions' errors, ``KVFormatError``, ``ConcurrentChangeError``);
* policy (``PolicyError``, ``PlacementError``) and loader (``LoaderError``).
"""

from __future__ import annotations


class CtxstreamError(Exception):
    """Base class of every ctxstream error."""
