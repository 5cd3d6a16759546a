"""Codec error hierarchy: every failure on untrusted bytes raises one of these (all ``ValueError``)."""

from ctxstream.errors import CtxstreamError


class CodecError(CtxstreamError, ValueError):
    """Base class of every error raised while decoding untrusted bytes or encoding bad input."""


class MalformedError(CodecError):
    """The bytes are not a ctxstream chunk (bad magic, unreadable header, inconsistent fields)."""


class TruncatedError(MalformedError):
    """The bytes end before the chunk does."""


class ChecksumError(CodecError):
    """A section's checksum does not match its bytes: the data was corrupted."""


class VersionError(CodecError):
    """A format or level version this decoder does not know."""


class ModelMismatchError(CodecError):
    """The chunk was encoded for another model (fingerprint) or another profile, or has the wrong shape."""


class LimitExceededError(CodecError):
    """The chunk is larger than the decoder's ``max_*`` limits allow."""


class UnknownLevelError(CodecError, KeyError):
    """No such compression level."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
