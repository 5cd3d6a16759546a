"""The GPU decoder's host-side parse (``GpuDecoder._plan`` and its per-group split): plain numpy, so it
runs without CUDA (CI); the kernels that read these plans are tested on the device
(tests/test_gpu_decoder.py, tests/test_gpu_pipeline.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from bench.gpu import synthetic_codec, synthetic_kv
from ctxstream.codec import gpu
from ctxstream.codec.format import parse_header


def _host_decoder(codec):
    """What ``GpuDecoder._plan`` reads of its decoder with ``verify=False`` (no device: host work only)."""
    return SimpleNamespace(codec=codec, verify_checksums=False)


@pytest.mark.parametrize("level,start", [("q2", 0), ("q0", 300), ("q4", 0)])
def test_group_split_equals_parsing_the_groups_layers_alone(level, start):
    codec = synthetic_codec(layers=6, kv_heads=2, head_dim=64)
    keys, values = synthetic_kv(codec.info, codec.profile, 96, start=start)
    blob = codec.encode(keys, values, level, start=start)
    hi = parse_header(blob, codec.limits)
    dec = _host_decoder(codec)
    whole = gpu.GpuDecoder._plan(dec, blob, list(range(6)), verify=False, hi=hi)
    if level != "q4":
        assert whole.esc_q.size > 0  # the split must carry escapes across groups
    if start == 0:
        assert whole.n_sink > 0
    offs = hi.section_offsets()
    i = 0
    for g in ([0], [1, 2], [3, 4, 5]):
        o0 = offs[g[0]]
        alone = gpu.GpuDecoder._plan(dec, blob, g, verify=False, hi=hi)
        part = whole.group(i, i + len(g), o0)
        i += len(g)
        assert part.layers == g
        for name in ("states", "sizes", "woff", "seg_dst", "seg_n", "esc_q", "esc_counts"):
            got, want = getattr(part, name), getattr(alone, name)
            np.testing.assert_array_equal(got, want, err_msg=name)
            assert got.dtype == want.dtype and got.flags.c_contiguous, name  # (the kernels' tables view them)
        np.testing.assert_array_equal(part.seg_src, alone.seg_src - o0)
        if alone.sink is None:
            assert part.sink is None
        else:
            np.testing.assert_array_equal(part.sink, alone.sink)
        assert (part.blocks, part.block, part.n_sink, part.T) == (alone.blocks, alone.block, alone.n_sink, alone.T)
