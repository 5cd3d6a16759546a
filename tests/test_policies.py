"""Adaptation policies on synthetic states (pure logic, no I/O)."""

from __future__ import annotations

import dataclasses

import pytest

from ctxstream.policies import (
    TEXT,
    UNKNOWN_DPPL,
    ChunkFeedback,
    ChunkInfo,
    ChunkState,
    FixedPolicy,
    MpcPolicy,
    Policy,
    PolicyError,
    SloPolicy,
    finish_time_s,
    make_policy,
    policy_names,
    register_policy,
)

LEVELS = {"fp16": 1.0, "quant8": 0.5, "q0": 0.18, "q1": 0.1, "q2": 0.06, "q3": 0.035, "q4": 0.02}  # bytes ratio
# test data, not a policy constant: the relative perplexity increase of a whole context at each level
# (what the planner passes as the prior); a chunk of a context of n equal chunks carries 1/n of it
CONTEXT_DPPL = {"fp16": 0.0, "quant8": 0.001, "q0": 0.002, "q1": 0.0152, "q2": 0.0447, "q3": 0.138, "q4": 0.376}


def chunks(n=8, tokens=256, fp16_bytes=6_000_000, decode_s=0.02, recompute_s=0.5, recompute_growth=0.0, dppl=None):
    """``n`` equal chunks; ``dppl``: per chunk, level -> estimate (default: ``CONTEXT_DPPL / n`` each)."""
    out = []
    for i in range(n):
        sizes = {lv: int(fp16_bytes * r) for lv, r in LEVELS.items()}
        d = dppl[i] if dppl is not None else {lv: x / n for lv, x in CONTEXT_DPPL.items()}
        out.append(ChunkInfo(i, tokens, sizes, {lv: decode_s for lv in sizes}, recompute_s * (1 + recompute_growth * i), d))
    return out


def state_at(infos, i, *, remaining_s, bps, err=0.0, backlog_s=0.0, latency_s=0.0, elapsed_s=0.0, spent_dppl=0.0,
             previous_fetch=(0, 0.0), abandoned=False):
    c = infos[i]
    return ChunkState(index=i, num_chunks=len(infos), tokens=c.tokens, sizes_bytes=c.sizes_bytes,
                      decode_s=c.decode_s, recompute_s=c.recompute_s, remaining_s=remaining_s,
                      throughput_bps=bps, throughput_err=err, latency_s=latency_s, compute_backlog_s=backlog_s,
                      elapsed_s=elapsed_s, upcoming=tuple(infos[i + 1:]), dppl=c.dppl,
                      context_tokens=sum(x.tokens for x in infos), spent_dppl=spent_dppl,
                      previous_fetch_bytes=previous_fetch[0], previous_fetch_s=previous_fetch[1],
                      previous_fetch_abandoned=abandoned)


def plan_quality(infos, plan) -> float:
    """1 - the summed estimates of a whole-context plan (the token-weighted mean of the chunk scores)."""
    T = sum(c.tokens for c in infos)
    return sum(c.score(x, T) * c.tokens for c, x in zip(infos, plan)) / T


def simulate(policy: Policy, infos, *, bps, slo_s, forecast_bps=None, err=0.0):
    """Run a whole load on the policies' own timing model with a constant true rate.

    The policy sees ``forecast_bps`` (default: the true rate). Returns (finish_s, quality, choices).
    """
    t_net = 0.0  # when the network is free (the fetcher decides chunk i then)
    cpu_free = 0.0
    choices = []
    for i, info in enumerate(infos):
        now = t_net
        spent = sum(c.dppl_of(x) for c, x in zip(infos, choices))
        st = state_at(infos, i, remaining_s=slo_s - now, bps=forecast_bps or bps, err=err,
                      backlog_s=max(0.0, cpu_free - now), spent_dppl=spent)
        choice = policy.select(st)
        assert choice == TEXT or choice in info.sizes_bytes
        choices.append(choice)
        if choice == TEXT:
            cpu_free = max(cpu_free, now) + info.recompute_s
        else:
            t_net = now + info.sizes_bytes[choice] * 8 / bps
            cpu_free = max(cpu_free, t_net) + info.decode_s[choice]
        policy.observe(ChunkFeedback(index=i, choice=choice, final=choice))
    return max(cpu_free, t_net), plan_quality(infos, choices), choices


def transfer_end(t0, nbytes, rate, dt=0.002, cap_s=1000.0):
    """When ``nbytes`` started at ``t0`` have crossed a link of rate ``rate(t)`` bits/s."""
    t, left = t0, nbytes * 8.0
    while left > 0 and t < t0 + cap_s:
        left -= rate(t) * dt
        t += dt
    return t


def bytes_by(t0, t1, rate, dt=0.002):
    """Bytes a link of rate ``rate(t)`` bits/s carries between ``t0`` and ``t1``."""
    n, t = 0.0, t0
    while t < t1:
        n += rate(t) * min(dt, t1 - t) / 8.0
        t += dt
    return n


def simulate_link(policy: Policy, infos, rate, *, slo_s, prior_bps, window=5):
    """A whole load over a time-varying link ``rate(t)``, as the loader runs it: the forecast is the
    harmonic mean of the last ``window`` whole fetches' rates (``prior_bps`` before any), ``elapsed_s``
    is real, the previous fetch (finished or abandoned: its bytes so far) is reported, and a fetch past
    the policy's ``fetch_timeout_s`` is abandoned and the chunk recomputed.
    Returns (finish_s, chosen, final) per chunk."""
    t, cpu_free, rates, chosen, final, previous, abandoned = 0.0, 0.0, [], [], [], (0, 0.0), False
    for i, info in enumerate(infos):
        recent = rates[-window:]
        fc = len(recent) / sum(1.0 / r for r in recent) if recent else prior_bps
        spent = sum(c.dppl_of(x) for c, x in zip(infos, final))
        st = state_at(infos, i, remaining_s=slo_s - t, bps=fc, backlog_s=max(0.0, cpu_free - t), elapsed_s=t,
                      spent_dppl=spent, previous_fetch=previous, abandoned=abandoned)
        c = policy.select(st)
        assert c == TEXT or c in info.sizes_bytes
        chosen.append(c)
        if c == TEXT:
            cpu_free = max(cpu_free, t) + info.recompute_s
            final.append(TEXT)
            continue
        limit = policy.fetch_timeout_s(st, c)
        end = transfer_end(t, info.sizes_bytes[c], rate, cap_s=(limit or 1000.0) + 0.01)
        if limit is not None and end - t > limit:  # hedge: give up, recompute
            previous, abandoned = (int(bytes_by(t, t + limit, rate)), limit), True
            t += limit
            cpu_free = max(cpu_free, t) + info.recompute_s
            final.append(TEXT)
            continue
        rates.append(info.sizes_bytes[c] * 8.0 / max(end - t, 1e-6))
        previous, abandoned = (info.sizes_bytes[c], end - t), False
        t = end
        cpu_free = max(cpu_free, t) + info.decode_s[c]
        final.append(c)
    return max(cpu_free, t), chosen, final


# ----------------------------------------------------------------------------------- registry
def test_registry_names_and_factories():
    names = policy_names()
    for n in ("slo", "mpc", "text", "fp16", "quant8", "fixed:<level>"):
        assert n in names
    assert isinstance(make_policy("slo"), SloPolicy)
    assert isinstance(make_policy("mpc"), MpcPolicy)
    p = make_policy("fixed:q2")
    assert isinstance(p, FixedPolicy) and p.choice == "q2" and p.name == "fixed:q2"
    assert make_policy("text").choice == TEXT
    assert make_policy("fp16").choice == "fp16" and make_policy("quant8").choice == "quant8"
    assert make_policy("slo") is not make_policy("slo")  # fresh object per load
    obj = SloPolicy()
    assert make_policy(obj) is obj


def test_registry_rejects_duplicates_and_bad_names():
    with pytest.raises(PolicyError, match="already registered"):
        register_policy("slo", SloPolicy)
    with pytest.raises(PolicyError, match="unknown policy"):
        make_policy("nope")
    with pytest.raises(PolicyError, match="needs a parameter"):
        make_policy("fixed")
    with pytest.raises(PolicyError, match="takes no parameter"):
        make_policy("slo:q2")
    with pytest.raises(PolicyError):
        register_policy("a:b", SloPolicy)


def test_fixed_policy_rejects_missing_level():
    infos = chunks(2)
    st = state_at(infos, 0, remaining_s=1.0, bps=1e9)
    assert make_policy("fixed:q3").select(st) == "q3"
    with pytest.raises(PolicyError, match="not offered"):
        make_policy("fixed:q9").select(st)


def test_state_is_frozen_and_levels_ordered_by_quality():
    infos = chunks(2)
    st = state_at(infos, 0, remaining_s=1.0, bps=1e9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.remaining_s = 5.0  # type: ignore[misc]
    assert st.levels == ("fp16", "quant8", "q0", "q1", "q2", "q3", "q4")
    c = infos[0]
    assert c.dppl_of(TEXT) == 0.0 and c.dppl_of("q2") == pytest.approx(0.0447 / 2)
    assert c.dppl_of("q9") == UNKNOWN_DPPL  # no estimate: outside any bound
    # the recipe's per-chunk score: 1 - dppl * context tokens / chunk tokens; token-weighted = 1 - summed dppl
    assert c.score("q2", 512) == pytest.approx(1 - 0.0447) and c.score(TEXT, 512) == 1.0
    assert plan_quality(infos, ["q2", "q0"]) == pytest.approx(1 - (0.0447 + 0.002) / 2)
    assert st.plan_dppl(["q2", "q0"]) == pytest.approx((0.0447 + 0.002) / 2)
    assert dataclasses.replace(st, spent_dppl=0.01).plan_dppl(["q0"]) == pytest.approx(0.011)
    # the order follows this context's estimates, not a fixed table
    swapped = chunks(2, dppl=[{**CONTEXT_DPPL, "q0": 0.05, "q1": 0.0005}] * 2)
    assert state_at(swapped, 0, remaining_s=1.0, bps=1e9).levels[:4] == ("fp16", "q1", "quant8", "q2")


# ----------------------------------------------------------------------------------- timing
def test_finish_time_overlaps_recompute_with_fetch():
    infos = [ChunkInfo(0, 10, {"a": 1000}, {"a": 0.1}, 2.0), ChunkInfo(1, 10, {"a": 1000}, {"a": 0.1}, 2.0)]
    st = state_at(infos, 0, remaining_s=10, bps=8000)  # 1000 bytes = 1 s
    assert finish_time_s(st, ["a", "a"]) == pytest.approx(2.1)  # 1 s + 1 s network, last decode
    assert finish_time_s(st, [TEXT, "a"]) == pytest.approx(2.1)  # recompute 2 s || fetch 1 s; decode
    assert finish_time_s(st, [TEXT, TEXT]) == pytest.approx(4.0)
    assert finish_time_s(st, ["a", TEXT]) == pytest.approx(3.1)  # recompute waits for chunk 0
    st2 = dataclasses.replace(st, compute_backlog_s=3.0, latency_s=0.5)
    assert finish_time_s(st2, ["a"]) == pytest.approx(3.1)
    assert finish_time_s(st2, ["a", "a"]) == pytest.approx(3.2)  # net 3.0 then decode after 3.1


# ----------------------------------------------------------------------------------- slo
def test_slo_choice_moves_with_throughput():
    infos = chunks(8, recompute_s=5.0)  # recompute slow: text is a last resort
    order = ["fp16", "quant8", "q0", "q1", "q2", "q3", "q4"]
    picks = []
    for bps in (1e6, 1e7, 1e8, 1e9, 1e10, 1e11):
        picks.append(SloPolicy().select(state_at(infos, 0, remaining_s=2.0, bps=bps)))
    ranks = [order.index(p) if p != TEXT else 99 for p in picks]
    assert ranks == sorted(ranks, reverse=True), picks  # better quality as the rate grows
    assert picks[-1] == "fp16" and picks[0] != "fp16"
    assert len(set(picks)) >= 4


def test_slo_picks_best_level_that_fits():
    infos = chunks(4, fp16_bytes=1_000_000, decode_s=0.0, recompute_s=100.0)
    # budget 1 s at 100 Mbit/s: 4 chunks * bytes * 8 / 1e8 <= 1 -> bytes <= 3.125 MB: fp16 (1 MB) fits
    assert SloPolicy().select(state_at(infos, 0, remaining_s=1.0, bps=1e8)) == "fp16"
    # at 10 Mbit/s: bytes <= 312 kB -> q0 (180 kB) is the best that fits (quant8 = 500 kB does not)
    assert SloPolicy().select(state_at(infos, 0, remaining_s=1.0, bps=1e7)) == "q0"
    # at 1 Mbit/s: <= 31 kB -> q4 (20 kB)
    assert SloPolicy().select(state_at(infos, 0, remaining_s=1.0, bps=1e6)) == "q4"


def test_slo_falls_back_to_text_or_fastest():
    infos = chunks(4, fp16_bytes=1_000_000, decode_s=0.0, recompute_s=0.1)
    # nothing fits at 10 kbit/s; text (0.4 s) fits the 1 s budget
    assert SloPolicy().select(state_at(infos, 0, remaining_s=1.0, bps=1e4)) == TEXT
    # behind the SLO (nothing fits), text (400 s) slower than the levels: the fastest plan within the
    # 1% quality bound (q0: 4 * 180 kB at 1 Mbit/s = 5.8 s), not the lossiest level (q4, 0.64 s)
    slow_text = chunks(4, fp16_bytes=1_000_000, decode_s=0.0, recompute_s=100.0)
    assert SloPolicy().select(state_at(slow_text, 0, remaining_s=0.1, bps=1e6)) == "q0"
    assert SloPolicy().select(state_at(slow_text, 0, remaining_s=-1.0, bps=1e6)) == "q0"  # started behind
    # without a quality bound the fastest plan overall
    assert SloPolicy(max_loss=1.0).select(state_at(slow_text, 0, remaining_s=0.1, bps=1e6)) == "q4"
    # text when it is the faster within the bound
    assert SloPolicy().select(state_at(infos, 0, remaining_s=0.1, bps=1e6)) == TEXT


def test_mpc_infeasible_minimises_finish_time_and_plans_whole_context():
    infos = chunks(6, recompute_s=1.0)
    st = state_at(infos, 0, remaining_s=0.01, bps=1e5)
    # behind the SLO: the fastest plan within the quality bound (q0 and text only), not q4
    p = MpcPolicy()
    choice = p.select(st)
    best = min(finish_time_s(st, [TEXT] * k + ["q0"] * (6 - k)) for k in range(7))
    assert finish_time_s(st, p.last_plan) == pytest.approx(best)
    assert set(p.last_plan) <= {TEXT, "q0", "quant8", "fp16"}
    assert len(p.last_plan) == 6 and p.last_plan[0] == choice
    # with no bound: the fastest plan overall
    p = MpcPolicy(max_loss=1.0)
    p.select(st)
    best = min(finish_time_s(st, [TEXT] * k + ["q4"] * (6 - k)) for k in range(7))
    assert finish_time_s(st, p.last_plan) == pytest.approx(best)


def test_all_policies_return_offered_choices():
    infos = chunks(5)
    for name in ("slo", "mpc", "text", "fp16", "quant8", "fixed:q1"):
        for bps in (1e5, 1e8, 1e11):
            for rem in (-1.0, 0.5, 100.0):
                for i in range(5):
                    c = make_policy(name).select(state_at(infos, i, remaining_s=rem, bps=bps))
                    assert c == TEXT or c in infos[i].sizes_bytes


# ----------------------------------------------------------------------------------- new rules
def test_slo_recomputes_while_fetching_when_recompute_is_cheap():
    """Network alone and CPU alone both miss the SLO; slo's text-now-then-levels plans meet it."""
    infos = chunks(4, fp16_bytes=2_000_000, decode_s=0.01, recompute_s=0.5)
    # fp16 = 2 MB per chunk = 1.6 s at 10 Mbit/s; text 4 x 0.5 = 2 s; SLO 1.9 s
    finish, q, choices = simulate(SloPolicy(), infos, bps=1e7, slo_s=1.9)
    assert finish <= 1.9, choices
    assert TEXT in choices and any(c != TEXT for c in choices)
    assert choices[0] == TEXT


def test_slo_is_quality_first_and_lossless_when_it_fits():
    infos = chunks(4, fp16_bytes=1_000_000, decode_s=0.0, recompute_s=100.0)
    p = SloPolicy()
    assert p.select(state_at(infos, 0, remaining_s=10.0, bps=1e8)) == "fp16"
    assert set(p.last_plan) == {"fp16"}


def test_mpc_mixes_text_and_levels_when_recompute_is_cheap():
    """A cheap-recompute state (the CPU/135M regime of the dev replay): the fastest plan within the
    quality bound recomputes the first chunks while the network fetches the rest at q0."""
    infos = chunks(4, fp16_bytes=6_000_000, decode_s=0.03, recompute_s=0.55)
    p = MpcPolicy()
    st = state_at(infos, 0, remaining_s=6.0, bps=4e7)  # a q0 chunk (1.08 MB) takes 0.22 s
    c = p.select(st)
    assert c == TEXT and TEXT in p.last_plan and any(x != TEXT for x in p.last_plan), p.last_plan
    assert st.plan_dppl(p.last_plan) <= 0.01  # within 1% over the whole context
    mixed = finish_time_s(st, p.last_plan, p.expected_bps)
    for uniform in ([TEXT] * 4, ["q0"] * 4, ["fp16"] * 4):
        assert mixed < finish_time_s(st, uniform, p.expected_bps)
    # slo spends the same budget on quality instead: lossless plan, later finish
    s = SloPolicy()
    s.select(st)
    assert all(x in (TEXT, "fp16") for x in s.last_plan)
    assert finish_time_s(st, s.last_plan, s.expected_bps) > mixed


def test_mpc_is_fastest_within_bound_and_falls_back_to_best_quality_that_fits():
    infos = chunks(6, fp16_bytes=3_000_000, decode_s=0.02, recompute_s=5.0)  # recompute too slow to help
    # generous budget: the fastest plan whose estimate over the context is within 1% -- q0 and q1
    # mixed (uniform q1 is +1.52%), faster than q0 everywhere; never fp16
    p = MpcPolicy()
    st = state_at(infos, 0, remaining_s=30.0, bps=1e8)
    p.select(st)
    assert set(p.last_plan) == {"q0", "q1"} and st.plan_dppl(p.last_plan) <= 0.01
    assert finish_time_s(st, p.last_plan, p.expected_bps) < finish_time_s(st, ["q0"] * 6, p.expected_bps)
    # a margin on the estimates (they read low on hard text) leaves less room for q1
    m = MpcPolicy(dppl_margin=2.0)
    m.select(st)
    assert m.last_plan.count("q1") < p.last_plan.count("q1") and 2.0 * st.plan_dppl(m.last_plan) <= 0.01
    # a budget only q1..q4 can meet: the best quality that fits (not the fastest)
    st = state_at(infos, 0, remaining_s=1.2, bps=1e7)  # uniform q2 (180 kB/chunk) takes 1.04 s
    p = MpcPolicy()
    p.select(st)
    assert finish_time_s(st, p.last_plan, p.bps) <= 1.2 * 0.9
    assert "q4" not in p.last_plan and "q3" not in p.last_plan and set(p.last_plan) & {"q1", "q2"}
    assert st.plan_dppl(p.last_plan) <= st.plan_dppl(["q2"] * 6) + 1e-12


def test_mpc_takes_the_better_quality_when_the_lossy_plan_saves_less_than_its_tolerance():
    # a fast link with a per-request latency: the network sets the pace, quant8's decode is short,
    # q3's long one hides behind the later fetches and saves ~1% of the finish on paper
    infos = chunks(16, fp16_bytes=6_000_000, recompute_s=5.0)
    infos = [dataclasses.replace(c, decode_s={**c.decode_s, "quant8": 0.003, "q3": 0.023, "q4": 0.023,
                                              "q2": 0.023, "q1": 0.023, "q0": 0.023}) for c in infos]
    st = state_at(infos, 1, remaining_s=4.0, bps=2e10, latency_s=0.005, spent_dppl=infos[0].dppl_of("quant8"))
    exact = MpcPolicy(time_tolerance=0.0)
    lossy = exact.select(st)
    assert lossy not in ("fp16", "quant8")  # the model's fastest plan puts a lossy level early
    t_lossy = finish_time_s(st, exact.last_plan, exact.expected_bps)
    t_q8 = finish_time_s(st, ["quant8"] * 15, exact.expected_bps)
    assert t_lossy < t_q8 <= 1.05 * t_lossy
    p = MpcPolicy()  # default: within 5% of the fastest is as fast, the better quality wins
    assert p.select(st) in ("fp16", "quant8")
    assert st.plan_dppl(p.last_plan) < st.plan_dppl(exact.last_plan)
    # where the lossy levels save much more than the tolerance (a slow link), mpc still takes them
    slow = state_at(infos, 1, remaining_s=4.0, bps=1e9, latency_s=0.005)
    p.select(slow)
    assert finish_time_s(slow, p.last_plan, p.expected_bps) < 0.9 * finish_time_s(slow, ["quant8"] * 15, p.expected_bps)


def test_mpc_finishes_no_later_than_slo_over_a_rate_sweep():
    infos = chunks(10, fp16_bytes=3_000_000, decode_s=0.02, recompute_s=0.4, recompute_growth=0.1)
    faster = 0
    for bps in (3e5, 1e6, 3e6, 1e7, 3e7, 1e8, 3e8, 1e9, 3e9):
        for slo_s in (1.0, 3.0):
            f_s, q_s, _ = simulate(SloPolicy(), infos, bps=bps, slo_s=slo_s)
            f_m, q_m, ch = simulate(MpcPolicy(), infos, bps=bps, slo_s=slo_s)
            if f_s <= slo_s:  # whenever slo meets the SLO, so does mpc
                assert f_m <= slo_s + 1e-9, (bps, slo_s, ch)
            if f_s <= slo_s and q_s >= 1 - 0.01:  # a plan within the bound fits: mpc's is within it too
                assert q_m >= 1 - 0.01 - 1e-9, (bps, slo_s, ch)
            faster += f_m < f_s - 1e-6
    assert faster >= 5  # and it is often faster (it spends the slack on speed, slo on quality)


def test_mpc_discounts_forecast_by_error():
    infos = chunks(8, recompute_s=10.0)
    calm, jumpy = MpcPolicy(), MpcPolicy()
    calm.select(state_at(infos, 0, remaining_s=0.6, bps=2e8, err=0.0))
    jumpy.select(state_at(infos, 0, remaining_s=0.6, bps=2e8, err=1.5))
    assert jumpy.bps == pytest.approx(calm.bps / 2.5)
    st = state_at(infos, 0, remaining_s=0.6, bps=2e8)
    assert st.plan_dppl(calm.last_plan) <= 0.01
    assert st.plan_dppl(jumpy.last_plan) > st.plan_dppl(calm.last_plan)
    # with an over-optimistic forecast (real rate 1/3 of it), the error discount rescues the SLO
    f_naive, _, _ = simulate(MpcPolicy(), infos, bps=1e8 / 3, slo_s=1.5, forecast_bps=1e8)
    f_robust, _, _ = simulate(MpcPolicy(), infos, bps=1e8 / 3, slo_s=1.5, forecast_bps=1e8, err=2.0)
    assert f_robust <= 1.5 < f_naive


def test_adaptive_policies_downgrade_when_bandwidth_drops_mid_load():
    """The rate falls 10x after 0.1 s; the forecast (harmonic mean of past fetches) lags, but the
    policy sees the slow fetch (the loader reports it) at its next decision and downgrades."""
    infos = chunks(8, fp16_bytes=2_000_000, decode_s=0.01, recompute_s=3.0)  # recompute expensive
    rate = lambda t: 1e8 if t < 0.1 else 1e7  # noqa: E731
    for make in (SloPolicy, MpcPolicy):
        p = make(hedge=1e9)  # no hedge here: only the rate estimate is under test
        finish, chosen, _ = simulate_link(p, infos, rate, slo_s=1.0, prior_bps=1e8)
        assert TEXT not in chosen
        assert p.last_fetch_bps < 2e7, (make.name, p.last_fetch_bps)  # the slow fetch was seen
        size = lambda c: infos[0].sizes_bytes[c]  # noqa: E731
        assert min(size(c) for c in chosen[1:]) < size(chosen[0]) / 2, (make.name, chosen)
        assert finish <= 1.0, (make.name, chosen, finish)


def test_previous_fetch_rate_is_the_fetch_not_the_time_between_decisions():
    infos = chunks(8, fp16_bytes=6_000_000, decode_s=0.003, recompute_s=5.0)
    for make in (SloPolicy, MpcPolicy):
        p = make()
        p.select(state_at(infos, 0, remaining_s=4.0, bps=1e10))
        assert p.expected_bps == 1e10  # no fetch yet: the forecast
        # the next decision comes 50 ms later (a busy event loop, the policy's own time); the fetch
        # took 3 ms with 1 ms of it the request's latency: 24 Mbit in 2 ms
        p.select(state_at(infos, 1, remaining_s=3.95, bps=1e10, elapsed_s=0.05, latency_s=0.001,
                          previous_fetch=(3_000_000, 0.003)))
        assert p.expected_bps == 1e10  # min(forecast, 12 Gbit/s)
        p.select(state_at(infos, 2, remaining_s=3.9, bps=1e10, elapsed_s=0.06, latency_s=0.001,
                          previous_fetch=(3_000_000, 0.013)))
        assert p.expected_bps == pytest.approx(2e9)  # a slow fetch lowers it at once (24 Mbit / 12 ms)
        # abandoned by the hedge after 1 s with 100 kB: the rate is what came; it holds over text chunks
        for i in (3, 4):
            p.select(state_at(infos, i, remaining_s=2.0, bps=1e10, elapsed_s=2.0, previous_fetch=(100_000, 1.0)))
            assert p.expected_bps == pytest.approx(8e5), make.name


def test_margin_keeps_mpc_under_the_slo_on_a_trace_with_dips():
    """Dips to 3/8 of the rate half of the time (100 ms period), SLO tight enough that the plans
    end near it: the robust rate (margin, error discount, reserve) meets the SLO from every start
    phase; the same policy without them misses some."""
    infos = chunks(8, fp16_bytes=3_000_000, decode_s=0.02, recompute_s=3.0)
    slo_s = 0.4
    met_robust = met_naive = 0
    phases = [k * 0.1 / 12 for k in range(12)]
    for ph in phases:
        rate = lambda t, ph=ph: 8e7 if ((t + ph) % 0.1) < 0.05 else 3e7  # noqa: E731
        f_r, _, _ = simulate_link(MpcPolicy(hedge=1e9), infos, rate, slo_s=slo_s, prior_bps=8e7)
        f_n, _, _ = simulate_link(MpcPolicy(hedge=1e9, margin=1.0, reserve=0.0, max_err=0.0), infos, rate,
                                  slo_s=slo_s, prior_bps=8e7)
        met_robust += f_r <= slo_s
        met_naive += f_n <= slo_s
    assert met_robust == len(phases) and met_naive < len(phases), (met_robust, met_naive)


def test_hedge_recovers_from_an_outage_mid_fetch():
    """The link dies for 20 s at t = 0.3 s; waiting for the fetch misses the SLO, the hedge
    abandons it, recomputes, and the rest is recomputed too (a later fetch, if tried, is abandoned)."""
    infos = chunks(4, fp16_bytes=6_000_000, decode_s=0.03, recompute_s=0.55)
    rate = lambda t: 0.0 if 0.3 <= t < 20.3 else 6e7  # noqa: E731
    for make in (SloPolicy, MpcPolicy):
        f_hedged, chosen, final = simulate_link(make(), infos, rate, slo_s=6.0, prior_bps=6e7)
        f_wait, _, _ = simulate_link(make(hedge=1e9, min_timeout_s=1e9), infos, rate, slo_s=6.0, prior_bps=6e7)
        assert f_hedged <= 6.0 < f_wait, (make.name, chosen, final, f_hedged)
        assert final.count(TEXT) > chosen.count(TEXT)  # at least one fetch was abandoned
        first = next(i for i, (c, f) in enumerate(zip(chosen, final)) if c != f)
        assert all(f == TEXT for f in final[first:])  # and every chunk after it is recomputed


def test_probe_fetches_again_once_an_outage_ends():
    """The link dies at t = 0.3 s and comes back at 2.5 s. The hedge abandons a fetch; its rate (what
    came) would make the chunks left text, so mpc probes: it fetches the next chunk with the hedge
    cut to the worker's queued recompute (free while the outage lasts), and once the link is back
    the chunks left are fetched, sooner than recomputing them."""
    infos = chunks(6, fp16_bytes=6_000_000, decode_s=0.03, recompute_s=1.0)
    rate = lambda t: 0.0 if 0.3 <= t < 2.5 else 6e7  # noqa: E731
    finish, chosen, final = simulate_link(MpcPolicy(), infos, rate, slo_s=6.0, prior_bps=6e7)
    first = next(i for i, (c, f) in enumerate(zip(chosen, final)) if c != f)  # the hedged fetch
    assert TEXT not in chosen and final[-1] != TEXT, (chosen, final)
    text_after = 0.3 + sum(c.recompute_s for c in infos[first:])  # every chunk from the hedge on recomputed
    assert finish < text_after - 0.5, (chosen, final, finish)


def test_probe_hedge_is_the_queued_work():
    """After an abandoned fetch (100 kB in 1 s) the plan is text; with 0.8 s of recompute queued,
    the policy fetches this chunk at a level that arrives within a third of that at the forecast,
    the hedge cut to 0.8 s; with nothing queued it does not probe (a fetch would only delay the
    recompute), nor after a slow fetch that finished (its rate is a measurement, not a stall)."""
    infos = chunks(4, fp16_bytes=6_000_000, decode_s=0.03, recompute_s=0.55)
    for make in (SloPolicy, MpcPolicy):
        p = make()
        p.select(state_at(infos, 0, remaining_s=3.0, bps=6e7))
        st = state_at(infos, 1, remaining_s=1.5, bps=6e7, elapsed_s=1.0, backlog_s=0.8,
                      previous_fetch=(100_000, 1.0), abandoned=True)
        c = p.select(st)
        assert c != TEXT and p.probe_s == pytest.approx(0.8), (make.name, c)
        assert 3 * infos[1].sizes_bytes[c] * 8 / 6e7 <= 0.8
        assert p.fetch_timeout_s(st, c) == pytest.approx(0.8)
        idle = state_at(infos, 1, remaining_s=1.5, bps=6e7, elapsed_s=1.0, backlog_s=0.0,
                        previous_fetch=(100_000, 1.0), abandoned=True)
        assert p.select(idle) == TEXT and p.probe_s is None, make.name
        finished = state_at(infos, 1, remaining_s=1.5, bps=6e7, elapsed_s=1.0, backlog_s=0.8,
                            previous_fetch=(100_000, 1.0))  # a slow fetch that finished: a real rate
        assert p.select(finished) == TEXT and p.probe_s is None, make.name


def test_fetch_timeout_is_a_hedge_only_for_adaptive_policies():
    infos = chunks(2, fp16_bytes=1_000_000, recompute_s=0.5)
    st = state_at(infos, 0, remaining_s=10.0, bps=8e6, latency_s=0.01)
    p = MpcPolicy()
    p.select(st)
    small, big = p.fetch_timeout_s(st, "q4"), p.fetch_timeout_s(st, "fp16")
    assert small >= 0.5 and big > small  # never below recomputing the chunk; grows with the bytes
    assert big == pytest.approx(3.0 * (0.01 + 1_000_000 * 8 / p.bps))
    assert p.fetch_timeout_s(st, TEXT) is None
    assert make_policy("fixed:q2").fetch_timeout_s(st, "q2") is None
    # little slack: no later than the moment from which recomputing both chunks (1 s) still meets it
    tight = dataclasses.replace(st, remaining_s=1.5)
    assert p.fetch_timeout_s(tight, "fp16") == pytest.approx(1.5 * 0.9 - 1.0)
    # no slack at all (even recompute misses): the plain hedge
    assert p.fetch_timeout_s(dataclasses.replace(st, remaining_s=0.5), "fp16") == pytest.approx(big)



def test_one_execution_model_vectorised_equals_single_plans():
    import numpy as np

    from ctxstream.policies import plan_finish_s

    rng = np.random.default_rng(4)
    infos = chunks(5, recompute_s=0.3, decode_s=0.05)
    st = state_at(infos, 0, remaining_s=1.0, bps=2e7, backlog_s=0.2, latency_s=0.01)
    options = [*st.levels, TEXT]
    plans = rng.integers(0, len(options), size=(40, 5))
    got = plan_finish_s(st, plans, options, [2e7, 5e6])
    assert got.shape == (2, 40)
    for i, row in enumerate(plans):
        plan = [options[j] for j in row]
        assert got[0, i] == pytest.approx(finish_time_s(st, plan))
        assert got[1, i] == pytest.approx(finish_time_s(st, plan, 5e6))
    # a text chunk overlaps the next fetch: text + fetch == max(recompute, fetch) + decode
    two = state_at(chunks(2, recompute_s=0.3, decode_s=0.05), 0, remaining_s=1.0, bps=8e6)
    fetch = two.chunks[1].sizes_bytes["q2"] * 8 / 8e6
    assert finish_time_s(two, [TEXT, "q2"]) == pytest.approx(max(0.3, fetch) + 0.05)


def test_slo_awareness_is_a_property_of_the_policy():
    from ctxstream.policies import make_policy

    assert make_policy("slo").slo_aware and make_policy("mpc").slo_aware
    assert not any(make_policy(p).slo_aware for p in ("text", "fp16", "quant8", "fixed:q2"))

    class Mine(MpcPolicy):  # a new SLO-aware policy needs no list to join
        name = "mine"

    assert Mine().slo_aware


# ----------------------------------------------------------------------------------- measured quality
def test_bound_holds_over_the_context_with_per_chunk_estimates():
    """Per-chunk estimates that differ (the last chunk, nearest the prompt, gets most attention):
    mpc puts the lossy level where it costs little and keeps the costly chunk finer; with the same
    levels costing the same everywhere it could not."""
    cheap = {"fp16": 0.0, "quant8": 0.0002, "q0": 0.0004, "q1": 0.001, "q2": 0.002, "q3": 0.006, "q4": 0.02}
    costly = {lv: 8 * x for lv, x in cheap.items()}
    infos = chunks(4, fp16_bytes=3_000_000, decode_s=0.02, recompute_s=5.0, dppl=[cheap, cheap, cheap, costly])
    st = state_at(infos, 0, remaining_s=30.0, bps=1e8)
    p = MpcPolicy()
    p.select(st)
    plan = p.last_plan
    assert st.plan_dppl(plan) <= 0.01
    size = infos[0].sizes_bytes
    assert size[plan[3]] > max(size[c] for c in plan[:3]), plan  # the chunk that matters gets more bytes
    assert {"q2", "q3", "q4"} & set(plan[:3]), plan


def test_spent_loss_and_unknown_levels_limit_the_rest():
    infos = chunks(4, fp16_bytes=3_000_000, decode_s=0.02, recompute_s=5.0)
    fresh = MpcPolicy()
    fresh.select(state_at(infos, 1, remaining_s=30.0, bps=1e8))
    spent = MpcPolicy()  # the chunk before already cost +0.95%: only near-lossless choices are left
    spent.select(state_at(infos, 1, remaining_s=30.0, bps=1e8, spent_dppl=0.0095))
    st = state_at(infos, 1, remaining_s=30.0, bps=1e8, spent_dppl=0.0095)
    assert st.plan_dppl(spent.last_plan) <= 0.01 < st.plan_dppl(fresh.last_plan)
    # a level without any estimate is never taken within the bound (here: the only lossy one is unknown)
    blind = chunks(4, fp16_bytes=3_000_000, decode_s=0.02, recompute_s=5.0, dppl=[{"fp16": 0.0}] * 4)
    p = MpcPolicy()
    p.select(state_at(blind, 0, remaining_s=30.0, bps=1e8))
    assert set(p.last_plan) == {"fp16"}
