"""From logits to what a request's consumer receives: the next token sampled with the request's own parameters,
the end of sequence and stop strings, incremental text, logprobs, the final message, and the latency metrics."""

from __future__ import annotations

import logging
import time

import torch

from .metrics import Metrics
from .request import Output, Request
from .sampling import TokenLogprob, sample, token_logprobs

logger = logging.getLogger(__name__)


class OutputProcessor:
    """Args:
    eos_ids: the tokens that end a sequence (the tokenizer's and the generation config's).
    max_model_len: a request ends ("length") when its context would pass this.
    metrics: where token and request metrics go.
    timeout_s: the request timeout, for the message of a request that timed out.
    """

    def __init__(self, eos_ids: list[int], max_model_len: int, metrics: Metrics, timeout_s: float | None = None):
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.tokens_by_layers: dict[int, int] = {}  # output tokens produced with this many DSLA layers

    def accept(self, request: Request, logits: torch.Tensor, layers: tuple[int, ...]) -> None:
        """Sample the next token of a request from its logits (a forward with these DSLA layers), send its text,
        and decide whether it is finished."""
        params = request.params
        logits = logits.float()
        masked = logits
        if len(request.output_ids) < params.min_tokens and self.eos_ids:
            masked = logits.clone()
            masked[self.eos_ids] = float("-inf")
        token = sample(masked, params, request.generator)
        # Of the model's own distribution (before min_tokens, temperature, top-p); nothing to pay when not asked.
        scored = None if params.logprobs is None else token_logprobs(logits[None], [token], params.logprobs)
        self.record_token(request, token, layers)
        count = len(request.output_ids)
        past_min = count >= params.min_tokens
        reason = None
        if token in self.eos_ids and not params.ignore_eos and past_min:
            reason = "stop"  # the end of sequence has no text
        text, hit = request.detok.update([] if reason else [token], check_stop=past_min)
        if hit:
            reason = "stop"
        elif reason is None and (count >= params.max_tokens or request.cached + 1 >= self.max_model_len):
            reason = "length"
        if reason is None:
            prompt = request.take_prompt_logprobs()
            request.sink(Output(text=text, token_ids=[token], logprobs=scored, prompt_logprobs=prompt))
            return
        self.finish(request, reason, text_before=text, last_token=token, logprobs=scored)

    def record_token(self, request: Request, token: int, layers: tuple[int, ...]) -> None:
        """Append a sampled token to its request, with the layer kinds that produced it and its latency metrics."""
        now = time.monotonic()
        index = len(request.output_ids)
        if not request.modes or request.modes[-1][1] != layers:
            request.modes.append((index, layers))
        self.tokens_by_layers[len(layers)] = self.tokens_by_layers.get(len(layers), 0) + 1
        request.output_ids.append(token)
        if request.first_token_time is None:
            request.first_token_time = now
            self.metrics.observe("vllm:time_to_first_token_seconds", now - request.arrival)
        else:
            self.metrics.observe("vllm:inter_token_latency_seconds", now - request.last_token_time)
        request.last_token_time = now
        self.metrics.inc("vllm:generation_tokens_total")

    def finish(
        self,
        request: Request,
        reason: str,
        error: str | None = None,
        text_before: str = "",
        last_token: int | None = None,
        logprobs: list[TokenLogprob] | None = None,
    ) -> None:
        """End a request (once): its last text and usage to its consumer, and the request metrics."""
        if request.finish_reason is not None:
            return
        request.finish_reason = reason
        text = text_before + (request.detok.flush() if reason in ("stop", "length") else "")
        now = time.monotonic()
        if reason in ("stop", "length"):
            self.metrics.inc("vllm:request_success_total", finished_reason=reason)
            self.metrics.observe("vllm:e2e_request_latency_seconds", now - request.arrival)
            if len(request.output_ids) > 1:
                tpot = (now - request.first_token_time) / (len(request.output_ids) - 1)
                self.metrics.observe("vllm:time_per_output_token_seconds", tpot)
        if reason == "timeout" and error is None:
            error = f"The request timed out after {self.timeout_s} s"
        try:
            request.sink(
                Output(
                    text=text,
                    token_ids=[last_token] if last_token is not None else [],
                    finish_reason=reason,
                    error=error,
                    prompt_tokens=len(request.prompt_ids),
                    completion_tokens=len(request.output_ids),
                    logprobs=logprobs,
                    prompt_logprobs=request.take_prompt_logprobs(),
                    cached_tokens=request.cached_tokens,
                    modes=list(request.modes),
                )
            )
        except Exception:  # a consumer that went away must not stop the engine
            logger.debug("A request's consumer failed", exc_info=True)


__all__ = ["OutputProcessor"]
