"""How many layers run as DSLA: a policy that reads the load (queue length, KV memory in use, prompt length) and
answers a number of DSLA layers. No model inside, so it is tested on synthetic load.

The poster of the paper caps the conversion ratio by prompt length (below 2k tokens 12.5 %, 2k-4k 25 %, 4k-8k 37.5 %,
8k and more 50 %), and never converts more than 75 % of the layers. Within the cap, the load decides: the ratio goes
up one step when any trigger is above its high mark, and down one step when every trigger is below its low mark
(hysteresis); no two switches closer than `cooldown_s` (cool-down). The engine applies a decision between two model
steps only, and may defer a decrease it cannot make exactly (see `engine.Engine`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..models.dsla.configuration_dsla import ratio_to_layers

# (prompt tokens below which the cap applies, maximum conversion ratio); the last bound is open.
POSTER_CAPS: tuple[tuple[float, float], ...] = ((2048, 0.125), (4096, 0.25), (8192, 0.375), (math.inf, 0.5))


@dataclass
class LoadSnapshot:
    """What the engine sees between two steps."""

    num_waiting: int = 0
    num_running: int = 0
    kv_usage: float = 0.0  # fraction of the KV budget in use (0..1)
    prompt_tokens: list[int] = field(default_factory=list)  # prompt lengths of the running and waiting requests

    @property
    def longest_prompt(self) -> int:
        return max(self.prompt_tokens, default=0)


@dataclass
class AdaptivePolicy:
    """The adaptive conversion policy of DSLA-Serve; every threshold is configurable.

    Args:
        num_layers: layers of the model (ratios are turned into layer counts with it).
        max_layers: layers that can be converted at all (those in `conversion_order`); None: all.
        step: ratio added or removed by one switch.
        min_ratio, max_ratio: the range of the ratio (the poster: never above 75 %).
        prompt_caps: (prompt-length bound, maximum ratio) pairs, ascending; a prompt shorter than the first bound
            gets the first cap, and so on. The longest prompt among running and waiting requests sets the cap.
        length_scale: multiplies the bounds of `prompt_caps` (for traces whose lengths were scaled down).
        queue_high, queue_low: waiting requests above which the load is high, at or below which it is low.
        kv_high, kv_low: the same for the fraction of the KV budget in use.
        prompt_high, prompt_low: the same for the longest prompt (tokens, before `length_scale`); None: not a trigger.
        cooldown_s: minimum time between two switches.
        per_request: cap each request by its own context length (True), or run every request with the layers
            that the longest prompt allows (False: one ratio for the whole batch).
    """

    num_layers: int
    max_layers: int | None = None
    step: float = 0.125
    min_ratio: float = 0.0
    max_ratio: float = 0.75
    prompt_caps: tuple[tuple[float, float], ...] = POSTER_CAPS
    length_scale: float = 1.0
    queue_high: int = 4
    queue_low: int = 0
    kv_high: float = 0.75
    kv_low: float = 0.4
    prompt_high: int | None = 4096
    prompt_low: int | None = 2048
    cooldown_s: float = 2.0
    per_request: bool = True
    ratio: float = field(default=0.0, init=False)
    last_switch: float = field(default=-math.inf, init=False)
    pending: float | None = field(default=None, init=False)  # the last decision, until `commit`

    def __post_init__(self):
        if self.num_layers <= 0:
            raise ValueError("num_layers must be positive")
        if not 0.0 <= self.min_ratio <= self.max_ratio <= 1.0:
            raise ValueError(f"Need 0 <= min_ratio <= max_ratio <= 1, got {self.min_ratio}, {self.max_ratio}")
        if self.step <= 0:
            raise ValueError("step must be positive")
        if self.queue_low > self.queue_high or self.kv_low > self.kv_high:
            raise ValueError("Low marks must not exceed high marks (hysteresis)")
        if (self.prompt_low is None) != (self.prompt_high is None) or (
            self.prompt_low is not None and self.prompt_low > self.prompt_high
        ):
            raise ValueError("prompt_low and prompt_high must both be set (low <= high) or both None")
        bounds = [b for b, _ in self.prompt_caps]
        if bounds != sorted(bounds) or not self.prompt_caps:
            raise ValueError("prompt_caps must be a non-empty list of (bound, cap) in ascending order of bound")
        self.ratio = self.min_ratio

    # --- pieces --------------------------------------------------------------------------------------------------

    def cap(self, prompt_tokens: int) -> float:
        """The largest ratio allowed for a prompt of this length (the poster's table, then `max_ratio`)."""
        for bound, cap in self.prompt_caps:
            if prompt_tokens < bound * self.length_scale:
                return min(cap, self.max_ratio)
        return min(self.prompt_caps[-1][1], self.max_ratio)

    def pressure(self, load: LoadSnapshot) -> int:
        """+1 when any trigger is above its high mark, -1 when every trigger is at or below its low mark, else 0."""
        scale = self.length_scale
        high = load.num_waiting >= self.queue_high or load.kv_usage >= self.kv_high
        low = load.num_waiting <= self.queue_low and load.kv_usage <= self.kv_low
        if self.prompt_high is not None:
            high = high or load.longest_prompt >= self.prompt_high * scale
            low = low and load.longest_prompt <= self.prompt_low * scale
        return 1 if high else -1 if low else 0

    def layers(self, ratio: float | None = None) -> int:
        count = ratio_to_layers(self.ratio if ratio is None else ratio, self.num_layers)
        return min(count, self.max_layers if self.max_layers is not None else self.num_layers)

    # --- decision ------------------------------------------------------------------------------------------------

    def target_ratio(self, load: LoadSnapshot, now: float) -> float:
        """The ratio the policy wants now (does not change the policy's state; see `commit`)."""
        if now - self.last_switch < self.cooldown_s:
            return self.ratio
        ceiling = max(self.min_ratio, self.cap(load.longest_prompt))
        pressure = self.pressure(load)
        target = self.ratio
        if pressure > 0:
            target = self.ratio + self.step
        elif pressure < 0:
            target = self.ratio - self.step
        target = min(max(target, self.min_ratio), ceiling)
        return round(target, 6)

    def decide(self, load: LoadSnapshot, now: float) -> int:
        """The number of DSLA layers wanted now. Call `commit(now)` once the engine has switched."""
        self.pending = self.target_ratio(load, now)
        return self.layers(self.pending)

    def request_layers(self, count: int, context_tokens: int) -> int:
        """A request's share of the `count` DSLA layers the load asks for: at most its own prompt length's cap
        (the poster's caps, per request), unless `per_request` is off."""
        if not self.per_request:
            return count
        return min(count, self.layers(max(self.min_ratio, self.cap(context_tokens))))

    def commit(self, now: float) -> None:
        """Record that the engine applied the last decision (starts the cool-down)."""
        pending = self.ratio if self.pending is None else self.pending
        if self.layers(pending) != self.layers():
            self.last_switch = now
        self.ratio = pending


@dataclass
class StaticPolicy:
    """A fixed number of DSLA layers (the baselines: 0 is the teacher)."""

    count: int = 0

    def decide(self, load: LoadSnapshot, now: float) -> int:
        return self.count

    def request_layers(self, count: int, context_tokens: int) -> int:
        return count

    def commit(self, now: float) -> None:
        pass


__all__ = ["POSTER_CAPS", "AdaptivePolicy", "LoadSnapshot", "StaticPolicy", "ratio_to_layers"]
