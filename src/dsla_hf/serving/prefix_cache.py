"""Prefix caching across requests: a prompt that begins with tokens served before starts from a checkpoint of them.

For each prompt it prefills, the engine stores checkpoints (:class:`~dsla_hf.models.dsla.cache_dsla.CacheCheckpoint`)
at every chunk boundary and at the prompt's end, and for each request that finishes, one of its prompt and output
(a conversation's next turn resends both). A softmax layer's part of a checkpoint is its keys and values (all
checkpoints of one prompt share its final ones: a prefix is a slice); a DSLA layer's part is its states and window,
the same size whatever the prefix length. A later prompt that starts with a stored prefix (under the same layer
kinds) is prefilled from there: both kinds of layer skip the prefix.

Checkpoints at chunk boundaries reproduce the uncached prefill exactly: the chunks after them are the ones an
uncached run computes. A checkpoint at a prompt's end, or after its output (computed token by token), splits the
next prompt's prefill where an uncached run does not, so the states differ from it by the rounding of that split.

Entries are found by SHA-256 over the token ids (and the layer kinds), held within a byte budget, and evicted whole
(one prompt's checkpoints together), least recently used first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from ..models.dsla.cache_dsla import CacheCheckpoint


@dataclass
class _Prompt:
    """The checkpoints stored for one prompt, evicted together (they share its keys and values)."""

    checkpoints: dict[bytes, CacheCheckpoint] = field(default_factory=dict)
    bytes: int = 0


class PrefixCache:
    """Args:
    capacity_bytes: memory the stored checkpoints may hold (keys and values, states, windows) at most.
    """

    def __init__(self, capacity_bytes: int):
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._prompts: OrderedDict[int, _Prompt] = OrderedDict()  # least recently used first
        self._index: dict[bytes, int] = {}  # digest -> the prompt holding it
        self._lengths: Counter[int] = Counter()  # stored prefix lengths: the only ones a lookup hashes
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._index)

    @staticmethod
    def digests(token_ids: list[int], lengths: list[int], layers: tuple[int, ...]) -> dict[int, bytes]:
        """SHA-256 of the first `n` token ids (and the DSLA layers) for each `n` of `lengths`, in one pass."""
        digest = hashlib.sha256(array("q", layers).tobytes() + b"|")
        out, done = {}, 0
        for n in sorted(set(lengths)):
            digest.update(array("q", token_ids[done:n]).tobytes())
            out[n], done = digest.copy().digest(), n
        return out

    def lookup(self, token_ids: list[int], layers: tuple[int, ...]) -> CacheCheckpoint | None:
        """The checkpoint of the longest stored prefix of `token_ids` under these DSLA layers, leaving at least one
        token to prefill (its logits give the first output token), or None."""
        lengths = [n for n in self._lengths if n < len(token_ids)]
        for _, digest in sorted(self.digests(token_ids, lengths, layers).items(), reverse=True):
            owner = self._index.get(digest)
            if owner is not None:
                self._prompts.move_to_end(owner)
                return self._prompts[owner].checkpoints[digest]
        return None

    def store(self, token_ids: list[int], layers: tuple[int, ...], checkpoints: list[CacheCheckpoint]) -> None:
        """Keep checkpoints of one prompt, all sharing the keys and values of the last (its longest). Prefixes
        already stored are skipped; the least recently used prompts make room; nothing is kept if even an empty
        cache could not hold them."""
        if not checkpoints:
            return
        final = checkpoints[-1]
        digests = self.digests(token_ids, [c.tokens for c in checkpoints], layers)
        prompt = _Prompt()
        for checkpoint in checkpoints:
            digest = digests[checkpoint.tokens]
            if digest not in self._index and digest not in prompt.checkpoints:
                prompt.checkpoints[digest] = checkpoint.sharing_keys_values(final)
        if not prompt.checkpoints:
            return
        prompt.bytes = final.keys_values_bytes + sum(c.state_bytes for c in prompt.checkpoints.values())
        if prompt.bytes > self.capacity_bytes:
            return
        while self.used_bytes + prompt.bytes > self.capacity_bytes:
            self._evict_oldest()
        key, self._next_id = self._next_id, self._next_id + 1
        self._prompts[key] = prompt
        self.used_bytes += prompt.bytes
        for digest, checkpoint in prompt.checkpoints.items():
            self._index[digest] = key
            self._lengths[checkpoint.tokens] += 1

    def clear(self) -> None:
        while self._prompts:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        _, prompt = self._prompts.popitem(last=False)
        self.used_bytes -= prompt.bytes
        for digest, checkpoint in prompt.checkpoints.items():
            del self._index[digest]
            self._lengths[checkpoint.tokens] -= 1
            if not self._lengths[checkpoint.tokens]:
                del self._lengths[checkpoint.tokens]


__all__ = ["PrefixCache"]
