"""Policies: adaptation (which level or text per chunk) -- see :mod:`policies.adaptation`."""

from .adaptation import (
    DEFAULT_QUALITY,
    TEXT,
    ChunkFeedback,
    ChunkInfo,
    ChunkState,
    Choice,
    FixedPolicy,
    MpcPolicy,
    Policy,
    PolicyError,
    SloPolicy,
    finish_time_s,
    make_policy,
    policy_names,
    quality_of,
    register_policy,
    serial_time_s,
)

__all__ = [
    "TEXT", "Choice", "DEFAULT_QUALITY", "quality_of", "PolicyError", "ChunkInfo", "ChunkState",
    "ChunkFeedback", "finish_time_s", "serial_time_s", "Policy", "FixedPolicy", "SloPolicy",
    "MpcPolicy", "register_policy", "policy_names", "make_policy",
]
