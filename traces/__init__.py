"""Bandwidth traces and link shaping.

* :mod:`ctxstream.traces.trace` -- :class:`Trace`, a piecewise-constant looping bandwidth trace with exact
  integrals (``bytes_between``, ``time_to_send``).
* :mod:`ctxstream.traces.readers` -- Mahimahi, cooked (Pensieve/Puffer), NYU-METS and 5Gophers readers;
  :func:`load_trace` sniffs the format.
* :mod:`ctxstream.traces.synthetic` -- traces ctxstream generates itself (constant, step, sine, on/off, Markov walk).
* :mod:`ctxstream.traces.splits` -- data location (:data:`DEFAULT_DATA_DIR`, or a ``data_dir`` argument) and the
  dev/eval split of ``shared/data/README.md``.
* :mod:`ctxstream.traces.shaping` -- in-process shaping (``RateShaper``, ``TraceShaper``, ``shaped``).

Kernel mode (a real link shaped with ``tc`` inside a network namespace) is a later issue and is
not implemented here; the in-process shapers are the portable mode.
"""
from .readers import FORMATS, load_trace, read_5gophers, read_cooked, read_mahimahi, read_nyu_mets, sniff_format
from .shaping import FakeClock, RateShaper, Shaper, TraceShaper, make_shaper, parse_rate, shaped
from .splits import (
    DEFAULT_DATA_DIR,
    TraceSpec,
    all_trace_specs,
    dev_trace_specs,
    dev_traces,
    eval_trace_specs,
    eval_traces,
    resolve_traces_dir,
)
from .trace import Trace, TraceStats

__all__ = [
    "Trace", "TraceStats",
    "FORMATS", "load_trace", "sniff_format", "read_mahimahi", "read_cooked", "read_nyu_mets", "read_5gophers",
    "DEFAULT_DATA_DIR", "TraceSpec", "resolve_traces_dir", "all_trace_specs", "dev_trace_specs",
    "eval_trace_specs", "dev_traces", "eval_traces",
    "Shaper", "RateShaper", "TraceShaper", "FakeClock", "shaped", "make_shaper", "parse_rate",
]
