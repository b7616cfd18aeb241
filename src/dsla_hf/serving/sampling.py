"""Sampling parameters of one request, next-token sampling, log-probabilities, and incremental detokenisation with
stop strings."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

MAX_LOGPROBS = 20  # alternatives per token at most (OpenAI's bound)


@dataclass
class SamplingParams:
    """What a request asks for (OpenAI / vLLM semantics). `max_tokens=0` only scores the prompt (`prompt_logprobs`).

    `logprobs` / `prompt_logprobs`: with each output / prompt token, its log-probability and those of the `k` most
    likely tokens (None: none). They are of the model's own distribution (log-softmax of the raw logits, before
    `min_tokens`, temperature and top-p: vLLM's default), whatever the token was sampled with."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self):
        if self.max_tokens < 0:
            raise ValueError("max_tokens must be at least 0")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError("min_tokens must be between 0 and max_tokens")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        for k in (self.logprobs, self.prompt_logprobs):
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def generator(self) -> torch.Generator | None:
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        return torch.Generator().manual_seed(seed)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from fp32 logits [V]: argmax at temperature 0, else temperature and nucleus (top-p) sampling."""
    if params.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class TokenLogprob(NamedTuple):
    """A token, its log-probability and the `k` most likely tokens with theirs, most likely first (both None for the
    first token of a prompt, which nothing predicts)."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] | None


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """The logprobs of `tokens[i]` under `logits[i]` ([N, V], any device and dtype), with the top `k` of each row;
    only the chosen and top values leave the device."""
    logprobs = logits.float().log_softmax(-1)
    index = torch.tensor(tokens, dtype=torch.long, device=logits.device)[:, None]
    chosen = logprobs.gather(-1, index)[:, 0].tolist()
    if k:
        values, ids = logprobs.topk(k, dim=-1)
        top = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        top = [[] for _ in tokens]
    return [TokenLogprob(t, lp, alternatives) for t, lp, alternatives in zip(tokens, chosen, top)]


# --- detokenisation ------------------------------------------------------------------------------------------------


class IncrementalDecoder:
    """The text of a growing token sequence, decoding a bounded tail per token (the prefix / read offset scheme of
    TGI and vLLM). `window` holds the last tokens: `window[:read]` is decoded already and only gives context (a
    SentencePiece decoder drops the leading space of a sequence's first token, a byte-level one needs a character's
    earlier bytes); what the whole window adds to it is released once it does not end in U+FFFD, an incomplete
    multi-byte character. The deltas add up to `tokenizer.decode(ids, skip_special_tokens=True)`."""

    MAX_PENDING = 8  # tokens held back at most (while the text ends in U+FFFD) before `_cut` bounds the tail

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.window: list[int] = []
        self.read = 0
        self.prefix_text = ""  # decode(window[:read])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """The new text that `token` completes (often "" while a character's bytes arrive)."""
        self.window.append(token)
        text = self.decode(self.window)
        if len(text) > len(self.prefix_text) and not text.endswith("\ufffd"):
            delta = text[len(self.prefix_text) :]
            self.window = self.window[self.read :]
            self.read = len(self.window)
            self.prefix_text = self.decode(self.window)
            return delta
        if text == self.prefix_text and self.read == len(self.window) - 1:
            self.window.pop()  # no text, nothing pending (a skipped special token): it would only grow the tail
        elif len(self.window) - self.read > self.MAX_PENDING:
            return self._cut(text)
        return ""

    def _cut(self, text: str) -> str:
        """A tail that keeps ending in U+FFFD (bytes that are no character): release up to the last token boundary
        after which the tail adds characters and decodes alone as it does in context (nothing before it can change
        any more), and restart there without context."""
        for cut in range(len(self.window) - 1, max(self.read, len(self.window) - self.MAX_PENDING), -1):
            head, tail = self.decode(self.window[:cut]), self.decode(self.window[cut:])
            # (a tail that adds no character may still be continuing a character that `head` ends with)
            if len(self.prefix_text) <= len(head) < len(text) and text.startswith(head) and text[len(head) :] == tail:
                delta = head[len(self.prefix_text) :]
                self.window, self.read, self.prefix_text = self.window[cut:], 0, ""
                return delta
        return ""

    def flush(self) -> str:
        """The rest of the text (an incomplete character at the end as U+FFFD, as a whole decode gives it)."""
        text = self.decode(self.window)[len(self.prefix_text) :]
        self.window, self.read, self.prefix_text = [], 0, ""
        return text


class Detokenizer:
    """Text of the generated tokens, released in deltas: holds back what may be the start of a stop string (and the
    incomplete characters `IncrementalDecoder` holds back), and truncates the text before the first stop string."""

    def __init__(self, tokenizer, stop: list[str]):
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.pending = ""  # decoded, not released: it was searched for stop strings, and may start one
        self.stopped = False

    def update(self, token_ids: list[int], check_stop: bool) -> tuple[str, bool]:
        """Text to release after these new tokens, and whether a stop string was found."""
        for token in token_ids:
            self.pending += self.decoder.push(token)
        if check_stop and self.stop:
            hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                text, self.pending = self.pending[: min(hits)], ""
                return text, True
        end = len(self.pending) - self.hold
        if end <= 0:
            return "", False
        text, self.pending = self.pending[:end], self.pending[end:]
        return text, False

    def flush(self) -> str:
        """The text held back, at the end (nothing after a stop string)."""
        if self.stopped:
            return ""
        text, self.pending = self.pending + self.decoder.flush(), ""
        return text
