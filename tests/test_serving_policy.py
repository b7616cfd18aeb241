"""The adaptive policy on synthetic load (no model)."""

import pytest

from dsla_hf.serving.policy import AdaptivePolicy, LoadSnapshot, StaticPolicy, ratio_to_layers


def run(policy, loads, dt=1.0, start=0.0):
    """Feed one snapshot per tick, commit every decision (as the engine does), return the layer counts."""
    counts = []
    for i, load in enumerate(loads):
        counts.append(policy.decide(load, now=start + i * dt))
        policy.commit(now=start + i * dt)
    return counts


def test_poster_caps_by_prompt_length():
    policy = AdaptivePolicy(num_layers=32)
    assert [policy.cap(n) for n in (100, 2047, 2048, 4095, 4096, 8191, 8192, 100_000)] == [
        0.125,
        0.125,
        0.25,
        0.25,
        0.375,
        0.375,
        0.5,
        0.5,
    ]
    assert AdaptivePolicy(num_layers=32, length_scale=0.125).cap(300) == 0.25  # 300 >= 2048 / 8
    assert AdaptivePolicy(num_layers=32, max_ratio=0.25).cap(9000) == 0.25
    with_high_caps = AdaptivePolicy(num_layers=32, prompt_caps=((1e9, 1.0),))
    assert with_high_caps.cap(10) == 0.75  # never above max_ratio (75 %)


def test_rises_under_load_within_the_cap_and_falls_when_idle():
    policy = AdaptivePolicy(num_layers=32, cooldown_s=0.0)
    busy_long = LoadSnapshot(num_waiting=10, num_running=8, kv_usage=0.5, prompt_tokens=[9000, 300])
    counts = run(policy, [busy_long] * 8)
    assert counts[:4] == [4, 8, 12, 16] and counts[-1] == 16  # 12.5 % steps, stops at the 50 % cap of >= 8k
    busy_short = LoadSnapshot(num_waiting=10, prompt_tokens=[500])
    idle = LoadSnapshot()
    counts = run(policy, [busy_short] + [idle] * 3, start=100.0)
    assert counts == [4, 0, 0, 0]  # the cap of short prompts (12.5 %) applies at once, then idle goes to 0


def test_each_trigger_alone_raises_the_ratio():
    for load in (
        LoadSnapshot(num_waiting=4, prompt_tokens=[5000]),
        LoadSnapshot(kv_usage=0.9, prompt_tokens=[5000]),
        LoadSnapshot(prompt_tokens=[5000]),  # long prompt (>= prompt_high)
    ):
        policy = AdaptivePolicy(num_layers=8, cooldown_s=0.0)
        assert run(policy, [load] * 5)[-1] == 3  # 37.5 % of 8 layers: the cap for 4k-8k


def test_hysteresis_holds_between_the_marks():
    policy = AdaptivePolicy(
        num_layers=16, cooldown_s=0.0, queue_high=4, queue_low=1, prompt_high=None, prompt_low=None
    )
    up = LoadSnapshot(num_waiting=5, prompt_tokens=[3000])
    middle = LoadSnapshot(num_waiting=2, prompt_tokens=[3000])  # between the marks: hold
    down = LoadSnapshot(num_waiting=1, prompt_tokens=[3000])
    assert run(policy, [up, up, middle, middle, middle, down, middle, down]) == [2, 4, 4, 4, 4, 2, 2, 0]


def test_cooldown_prevents_flapping():
    policy = AdaptivePolicy(num_layers=16, cooldown_s=5.0)
    up, idle = LoadSnapshot(num_waiting=9, prompt_tokens=[9000]), LoadSnapshot(prompt_tokens=[100])
    # An oscillating load every second: at most one switch per 5 s.
    loads = [up if i % 2 == 0 else idle for i in range(20)]
    counts = run(policy, loads)
    switches = [i for i in range(1, len(counts)) if counts[i] != counts[i - 1]] + ([0] if counts[0] else [])
    assert all(b - a >= 5 for a, b in zip(sorted(switches), sorted(switches)[1:]))
    assert len(switches) <= 4


def test_uncommitted_decision_changes_nothing():
    policy = AdaptivePolicy(num_layers=8, cooldown_s=10.0)
    load = LoadSnapshot(num_waiting=10, prompt_tokens=[5000])
    assert policy.decide(load, now=0.0) == 1
    assert policy.layers() == 0  # the engine did not apply it (e.g. a deferred revert)
    assert policy.decide(load, now=0.5) == 1  # no cool-down started
    policy.commit(now=1.0)
    assert policy.layers() == 1 and policy.decide(load, now=2.0) == 1  # cool-down now


def test_max_layers_and_ratio_rounding():
    assert ratio_to_layers(0.125, 30) == 3 and ratio_to_layers(0.5, 30) == 15 and ratio_to_layers(0.75, 30) == 22
    policy = AdaptivePolicy(num_layers=30, max_layers=2, cooldown_s=0.0)
    assert run(policy, [LoadSnapshot(num_waiting=9, prompt_tokens=[9000])] * 6)[-1] == 2


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(min_ratio=0.5, max_ratio=0.25),
        dict(max_ratio=1.5),
        dict(step=0),
        dict(queue_low=5, queue_high=2),
        dict(kv_low=0.9, kv_high=0.5),
        dict(prompt_high=None),
        dict(prompt_caps=((4096, 0.25), (2048, 0.125))),
    ],
)
def test_invalid_configuration(kwargs):
    with pytest.raises(ValueError):
        AdaptivePolicy(num_layers=8, **kwargs)


def test_static_policy():
    assert StaticPolicy(5).decide(LoadSnapshot(num_waiting=100), now=0.0) == 5


def test_each_request_is_capped_by_its_own_prompt_length():
    """The poster's caps per request: of the 16 layers (50 %) the load asks for, a 1k-token context gets 12.5 %,
    3k 25 %, 5k 37.5 %, 9k all 16; with `per_request=False` every request gets what the longest prompt allows."""
    policy = AdaptivePolicy(num_layers=32)
    assert [policy.request_layers(16, n) for n in (1000, 3000, 5000, 9000)] == [4, 8, 12, 16]
    assert policy.request_layers(6, 9000) == 6  # never more than the load asks for
    assert AdaptivePolicy(num_layers=32, per_request=False).request_layers(16, 1000) == 16
    assert StaticPolicy(5).request_layers(5, 10) == 5
