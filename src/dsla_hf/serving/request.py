"""A request as the engine tracks it (from its arrival to its last token), and the messages it sends its consumer."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from ..models.dsla.cache_dsla import CacheCheckpoint, DSLACache
from .sampling import SamplingParams, TokenLogprob


@dataclass
class Output:
    """One message from the engine to a request's consumer."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "abort", "timeout", "error"
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None  # of `token_ids`, when the request asks for them
    prompt_logprobs: list[TokenLogprob] | None = None  # of every prompt token, with the request's first output
    cached_tokens: int = 0  # prompt tokens served by the prefix cache (with the last output)
    modes: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)  # `Request.modes` (with the last output)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Request:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Output], None], detok):
        self.id = uuid.uuid4().hex
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sink = sink
        self.detok = detok
        self.generator = params.generator()
        self.output_ids: list[int] = []
        self.arrival = time.monotonic()
        self.deadline: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finish_reason: str | None = None
        self.cancelled = threading.Event()
        self.cache: DSLACache | None = None  # own cache while prefilling
        self.prefilled = 0  # prompt tokens in `cache`
        self.cached_tokens = 0  # of them, those from the prefix cache
        self.checkpoints: list[tuple[tuple[int, ...], CacheCheckpoint]] = []  # (DSLA layers, checkpoint) by chunk
        self.cached = 0  # real tokens in the cache (prompt plus fed outputs): the next position
        self.dsla_layers: tuple[int, ...] | None = None  # the layers it runs as DSLA now (set when admitted)
        # (index of the first output token produced with these layers, DSLA layers): the per-token layer modes.
        self.modes: list[tuple[int, tuple[int, ...]]] = []
        self.prompt_logprobs: list[TokenLogprob] | None = None  # filled while prefilling, when asked for

    def cancel(self) -> None:
        self.cancelled.set()

    def take_prompt_logprobs(self) -> list[TokenLogprob] | None:
        """The prompt's logprobs, once (they go with the first output)."""
        scored, self.prompt_logprobs = self.prompt_logprobs, None
        return scored

    def dsla_layers_at(self, index: int) -> tuple[int, ...]:
        """The DSLA layers of the forward that produced output token `index` (every other layer was softmax)."""
        current: tuple[int, ...] = ()
        for start, layers in self.modes:
            if start <= index:
                current = layers
        return current


__all__ = ["Output", "Request"]
