"""Policies: adaptation (which level or text per chunk) -- see :mod:`ctxstream.policies.adaptation`; placement
(which tier holds a session's KV, what to evict and prefetch) -- see :mod:`ctxstream.policies.placement`."""

from .adaptation import (
    DPPL_MARGIN,
    TEXT,
    UNKNOWN_DPPL,
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
    plan_finish_s,
    AdaptivePolicy,
    make_policy,
    policy_names,
    register_policy,
)
from .placement import (
    EntryView,
    FifoPlacement,
    LruPlacement,
    PlacementError,
    PlacementPolicy,
    SchedulerAwarePlacement,
    TierView,
    make_placement,
    placement_names,
    register_placement,
)

__all__ = [
    "TEXT", "Choice", "UNKNOWN_DPPL", "DPPL_MARGIN", "PolicyError", "ChunkInfo", "ChunkState",
    "ChunkFeedback", "finish_time_s", "plan_finish_s", "Policy", "FixedPolicy", "AdaptivePolicy", "SloPolicy",
    "MpcPolicy", "register_policy", "policy_names", "make_policy",
    "PlacementError", "EntryView", "TierView", "PlacementPolicy", "LruPlacement", "FifoPlacement",
    "SchedulerAwarePlacement", "register_placement", "placement_names", "make_placement",
]
