"""The shared KV codec: ``Codec.for_model(model)``, ``encode``, ``decode``, an incremental decoder."""

from .codec import REFERENCE_FORMATS, Codec, DecodedChunk, IncrementalDecoder, LayerKV, LevelSpec
from .errors import (
    ChecksumError,
    CodecError,
    LimitExceededError,
    MalformedError,
    ModelMismatchError,
    TruncatedError,
    UnknownLevelError,
    VersionError,
)
from .format import ChunkHeader, DecodeLimits
from .profile import Profile

__all__ = [
    "Codec", "DecodedChunk", "IncrementalDecoder", "LayerKV", "LevelSpec", "REFERENCE_FORMATS", "Profile",
    "ChunkHeader", "DecodeLimits", "CodecError", "MalformedError", "TruncatedError", "ChecksumError",
    "VersionError", "ModelMismatchError", "LimitExceededError", "UnknownLevelError",
]
