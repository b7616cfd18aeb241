"""Hybrid cache: a KV cache for softmax layers and two stacked recurrent states for DSLA layers.

Built on Transformers' own cache classes. Every layer is a `DSLACacheLayer`, which may hold both kinds of state,
so a layer can switch kind between two forwards:

- `seen_tokens` counts the tokens the layer has processed, whatever its kind (so positions stay right even when no
  layer keeps keys and values);
- the keys and values are either complete (`kv_tokens == seen_tokens`) or freed;
- the DSLA side has read the first `state_tokens` tokens: into its states, or, for a layer with a softmax window,
  the last `window` of them into a small window of raw keys and values; when it lags behind (the layer ran as softmax
  attention for a while), the layer's next DSLA forward folds the missing keys and values into it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers.cache_utils import Cache, DynamicLayer, LinearAttentionAndFullAttentionLayer


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def room_for(tokens: int) -> int:
    """Positions a key buffer holding `tokens` is allocated with: half again, so appends are amortised."""
    return tokens + max(tokens, 64) // 2


class DSLACacheLayer(LinearAttentionAndFullAttentionLayer):
    def __init__(self, keep_kv: bool = False):
        super().__init__(number_of_states=1)
        self.keep_kv = keep_kv
        self.seen_tokens = 0
        self.state_tokens = 0
        # Softmax window of a DSLA layer: raw (un-rotated) keys [B, W, HK, D], values, validity [B, W].
        self.window: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # Key and value buffers with room to grow, allocated here, and the views of them that `keys` and `values`
        # were last set to (any other assignment, a batch operation's, makes them no longer this layer's to extend).
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._views: tuple[torch.Tensor, torch.Tensor] | None = None

    # --- bookkeeping -------------------------------------------------------------------------------------------

    @property
    def kv_tokens(self) -> int:
        return 0 if self.keys is None or not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]

    @property
    def can_revert(self) -> bool:
        """Whether the layer holds every key and value it has seen, so it can run as softmax attention again."""
        return self.kv_tokens == self.seen_tokens

    @property
    def state(self) -> torch.Tensor | None:
        return self.recurrent_states[0] if self.is_recurrent_states_initialized[0] else None

    def get_seq_length(self) -> int:
        return self.seen_tokens

    @property
    def owns_buffers(self) -> bool:
        """Whether `keys` and `values` are still the views of this layer's buffers that `extend_kv` set."""
        views = self._views
        return views is not None and self.keys is views[0] and self.values is views[1]

    # --- softmax attention ---------------------------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.kv_tokens != self.seen_tokens:
            raise RuntimeError(
                f"This layer ran as DSLA without keeping the keys and values of {self.seen_tokens - self.kv_tokens} "
                "tokens, so it cannot run as softmax attention again for this request. Create the cache with "
                "`DSLACache(config, keep_kv=True)` to make reverts exact."
            )
        self.extend_kv(key_states, value_states)
        self.seen_tokens += key_states.shape[-2]
        return self.keys, self.values

    def extend_kv(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Write keys and values [B, HK, T, D] after the cached ones, into the spare room of buffers this layer
        allocated (grown by half when full). `torch.cat` would copy every cached key and value at each decode step:
        at batch 8 and 4k tokens that costs more than the attention itself. Views handed out before (a prefix-cache
        checkpoint's) stay valid, since only positions past their end are ever written."""
        n, t = self.kv_tokens, key_states.shape[-2]
        if not self.owns_buffers or self._buffers[0].shape[-2] < n + t:
            self.gather_kv(
                [(self.keys, self.values)] if n else [], n, room=room_for(n + t), like=(key_states, value_states)
            )
        keys, values = self._buffers
        keys[..., n : n + t, :] = key_states
        values[..., n : n + t, :] = value_states
        self._views = self.keys, self.values = keys[..., : n + t, :], values[..., : n + t, :]

    def gather_kv(
        self,
        parts: list[tuple[torch.Tensor, torch.Tensor]],
        tokens: int,
        room: int | None = None,
        like: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Make `keys` and `values` the rows of `parts` (keys and values [B_i, HK, T_i, D], stacked by row), each
        right-aligned to `tokens` positions after zeros (left padding), in new buffers of this layer's own with
        room to grow. One copy of each part: `torch.cat` with padding would copy twice, into memory that the next
        append would copy again. `like` gives the shape of a row when `parts` is empty."""
        first = parts[0] if parts else like
        rows = sum(k.shape[0] for k, _ in parts) if parts else first[0].shape[0]
        room = room_for(tokens) if room is None else room
        if not self.is_initialized:
            self.lazy_initialization(*first)
        buffers = []
        for side in (0, 1):
            buffer = first[side].new_empty(rows, first[side].shape[1], room, first[side].shape[-1])
            row = 0
            for part in parts:
                tensor = part[side]
                count, n = tensor.shape[0], tensor.shape[-2]
                buffer[row : row + count, :, : tokens - n] = 0
                buffer[row : row + count, :, tokens - n : tokens] = tensor
                row += count
            buffers.append(buffer)
        self._buffers = tuple(buffers)
        self._views = self.keys, self.values = buffers[0][..., :tokens, :], buffers[1][..., :tokens, :]

    # --- DSLA ----------------------------------------------------------------------------------------------------

    def stale_kv(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """Keys and values that the DSLA states have not read yet, with the position of the first, or None."""
        if self.state_tokens == self.seen_tokens:
            return None
        if self.kv_tokens != self.seen_tokens:
            raise RuntimeError("The DSLA states lag behind but the keys and values they need were freed")
        return self.keys[..., self.state_tokens :, :], self.values[..., self.state_tokens :, :], self.state_tokens

    def set_state(self, state: torch.Tensor, new_tokens: int, window=None) -> None:
        """Store the DSLA states (and softmax window) after `new_tokens` more tokens (0 for a fold of tokens seen)."""
        self.window = window
        if self.state is None or self.state.shape != state.shape:
            # Kept as given, not copied into a zero tensor as `update_recurrent_state` would: the decode kernels
            # update this very tensor in place, step after step.
            self.recurrent_states[0] = state
            self.is_recurrent_states_initialized[0] = True
        elif self.state is not state:
            self.update_recurrent_state(state)
        # Set here: Transformers only marks a recurrent state as present after a conv-state update.
        self.has_previous_state[0] = True
        self.seen_tokens += new_tokens
        self.state_tokens = self.seen_tokens

    def append_kv(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Keep keys and values beside the states (for an exact revert), without counting the tokens again."""
        if self.kv_tokens == self.seen_tokens - key_states.shape[-2]:
            self.extend_kv(key_states, value_states)

    def free_kv(self) -> None:
        self.keys = self.values = None
        self._buffers = self._views = None
        self.is_initialized = False

    # --- batch operations on both kinds of state -----------------------------------------------------------------

    def _map(self, fn) -> None:
        if self.kv_tokens:
            self.keys, self.values = fn(self.keys), fn(self.values)
        if self.state is not None:
            self.recurrent_states[0] = fn(self.recurrent_states[0])
        if self.window is not None:
            self.window = tuple(fn(t) for t in self.window)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def reset(self) -> None:
        self.free_kv()
        self.recurrent_states[0] = None
        self.window = None
        self.is_recurrent_states_initialized[0] = False
        self.has_previous_state[0] = False
        self.seen_tokens = self.state_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        if self.state is not None:
            raise RuntimeError("A layer with DSLA states cannot be cropped: recurrent states cannot be rolled back")
        DynamicLayer.crop(self, tokens_to_remove)  # the key/value part (there is no state to roll back)
        self.seen_tokens = self.kv_tokens

    @property
    def memory_bytes(self) -> int:
        tensors = []
        if self.kv_tokens:  # the buffers' spare room counts too, while they are this layer's
            tensors = list(self._buffers if self.owns_buffers else (self.keys, self.values))
        if self.state is not None:
            tensors.append(self.state)
        tensors += list(self.window or ())
        return tensor_bytes(tensors)


@dataclass(frozen=True)
class CacheCheckpoint:
    """What a one-sequence cache holds after its first `tokens` tokens, to start other caches from (a prompt prefix
    shared by several requests): :meth:`DSLACache.checkpoint`, :meth:`DSLACache.from_checkpoint`.

    `states` per layer: its DSLA states and window, or None (a softmax layer: states it may have are rebuilt by its
    next fold). They are copies, since decoding updates a cache's states in place. `keys_values` per layer: its keys
    and values, or None (a DSLA layer that freed them). They are references, since a cache only ever replaces them
    by longer tensors and never writes into them, and may run past `tokens`: a cache started from the checkpoint
    takes their first `tokens`, so the checkpoints along one prompt can share its final keys and values
    (:meth:`sharing_keys_values`). `keys_values` and `positions` are None until given."""

    tokens: int
    keep_kv: bool
    kv_layers: tuple[bool, ...]
    states: tuple[tuple[torch.Tensor, tuple[torch.Tensor, ...] | None] | None, ...]
    keys_values: tuple[tuple[torch.Tensor, torch.Tensor] | None, ...] | None = None
    positions: torch.LongTensor | None = None

    def sharing_keys_values(self, later: CacheCheckpoint) -> CacheCheckpoint:
        """This checkpoint with the keys, values and positions of a later checkpoint of the same sequence."""
        if later.keys_values is None or later.tokens < self.tokens or later.kv_layers != self.kv_layers:
            raise ValueError("the later checkpoint must hold the keys and values of the same layers, and more tokens")
        return replace(self, keys_values=later.keys_values, positions=later.positions)

    @property
    def state_bytes(self) -> int:
        """Bytes of the states and windows (the copies this checkpoint owns)."""
        return tensor_bytes(t for entry in self.states if entry is not None for t in (entry[0], *(entry[1] or ())))

    @property
    def keys_values_bytes(self) -> int:
        """Bytes of the keys and values it refers to (in full, past `tokens` too)."""
        return tensor_bytes(t for kv in self.keys_values or () if kv is not None for t in kv)


def _pad_left(t: torch.Tensor, count: int) -> torch.Tensor:
    """Left-pad the time axis: dim -2 of [B, H, T, D] keys and values, dim -1 of [B, T] masks and positions."""
    return torch.nn.functional.pad(t, (0, 0, count, 0) if t.dim() == 4 else (count, 0))


class DSLACache(Cache):
    """The cache of a `DSLALlamaForCausalLM`: one `DSLACacheLayer` per layer, plus the positions seen so far
    (needed to undo RoPE on cached keys when a layer's keys and values are folded into DSLA states).

    Args:
        config: the model's `DSLAConfig`.
        keep_kv: keep the keys and values of DSLA layers beside their states, so that reverting a layer to softmax
            attention is exact. Without it, a layer's keys and values are freed once folded (that is the memory gain).
    """

    def __init__(self, config=None, keep_kv: bool = False, num_layers: int | None = None):
        n = num_layers if num_layers is not None else config.get_text_config(decoder=True).num_hidden_layers
        super().__init__(layers=[DSLACacheLayer(keep_kv=keep_kv) for _ in range(n)])
        self.keep_kv = keep_kv
        self.position_ids: torch.LongTensor | None = None

    def record_positions(self, position_ids: torch.LongTensor, batch_size: int) -> None:
        position_ids = position_ids.expand(batch_size, -1)
        self.position_ids = (
            position_ids if self.position_ids is None else torch.cat([self.position_ids, position_ids], -1)
        )

    def past_positions(self, start: int, end: int) -> torch.LongTensor:
        if self.position_ids is None or self.position_ids.shape[-1] < end:
            raise RuntimeError("The cache has no record of the positions of its keys; it cannot fold them")
        return self.position_ids[:, start:end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    def can_revert(self, layers: list[int]) -> bool:
        """Whether each listed layer holds every key and value it has seen: it can run as softmax attention again
        (always, with `keep_kv=True`; not after a fold freed them)."""
        return all(self.layers[i].can_revert for i in layers)

    def _map_positions(self, fn) -> None:
        if self.position_ids is not None:
            self.position_ids = fn(self.position_ids)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_positions(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_positions(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_positions(lambda t: t[indices, ...])

    def reset(self) -> None:
        super().reset()
        self.position_ids = None

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.position_ids is not None and tokens_to_remove:
            self.position_ids = self.position_ids[:, : -abs(tokens_to_remove)]

    @classmethod
    def stack(cls, caches: list[DSLACache], masks: list[torch.Tensor | None]) -> tuple[DSLACache, torch.LongTensor]:
        """Join caches of different lengths into one batch, left-padded (for continuous batching).

        `masks[i]` is the 2-D attention mask of cache i (None: no padding). Returns the joined cache and its mask.
        Padding is exact for both kinds of layer: softmax attention masks it, DSLA never lets it into the states.
        States that lag behind their keys and values are dropped (a later fold rebuilds them from scratch).
        """
        if not caches:
            raise ValueError("Nothing to stack")
        first = caches[0]
        if any(len(c.layers) != len(first.layers) or c.keep_kv != first.keep_kv for c in caches):
            raise ValueError("Only caches of the same model and keep_kv setting can be stacked")
        lengths = [c.get_seq_length() for c in caches]
        total = max(lengths)
        masks = [torch.ones_like(c.position_ids) if m is None else m.long() for c, m in zip(caches, masks)]
        joined = cls(num_layers=len(first.layers), keep_kv=first.keep_kv)
        for i, layer in enumerate(joined.layers):
            parts = [c.layers[i] for c in caches]
            if any(p.seen_tokens != n for p, n in zip(parts, lengths)):
                raise ValueError(f"Layer {i} has not seen every token of its request")
            has_kv = {p.kv_tokens == p.seen_tokens and p.seen_tokens > 0 for p in parts}
            if len(has_kv) > 1:
                raise ValueError(f"Layer {i} keeps keys and values for some requests only; fold them first")
            if has_kv.pop():
                layer.gather_kv([(p.keys, p.values) for p in parts], total)
            current = [p.state is not None and p.state_tokens == p.seen_tokens for p in parts]
            if all(current):
                windows = [p.window for p in parts]
                window = None if windows[0] is None else tuple(torch.cat(w) for w in zip(*windows))
                layer.set_state(torch.cat([p.state for p in parts]), 0, window)
            elif layer.kv_tokens == 0 and any(p.seen_tokens for p in parts):
                raise ValueError(f"Layer {i} has neither keys and values nor up-to-date states for every request")
            layer.seen_tokens = total
            layer.state_tokens = total if all(current) else 0
        joined.position_ids = torch.cat([_pad_left(c.position_ids, total - n) for c, n in zip(caches, lengths)])
        mask = torch.cat([_pad_left(m, total - n) for m, n in zip(masks, lengths)])
        return joined, mask

    def checkpoint(
        self, keys_values: bool = True, row: int | None = None, tokens: int | None = None
    ) -> CacheCheckpoint:
        """A :class:`CacheCheckpoint` at the tokens the cache has seen: of this one-sequence, unpadded cache, or of
        batch `row`, whose last `tokens` positions are its own (left padding before them). With `keys_values=False`
        it refers to no keys and values yet (:meth:`CacheCheckpoint.sharing_keys_values` gives them later), so
        checkpoints taken along a prefill do not keep each intermediate key tensor alive. A row's keys and values
        are copied (a view would keep the whole batch's alive)."""
        if self.position_ids is None or (row is None and self.position_ids.shape[0] != 1):
            raise ValueError("A checkpoint is of one sequence that has seen tokens (or of one row of a batch)")
        seen = self.get_seq_length()
        tokens = seen if tokens is None else tokens
        if not 0 < tokens <= seen or (row is None and tokens != seen):
            raise ValueError(f"A checkpoint of {tokens} tokens from a cache of {seen} (fewer: a row's own tokens)")
        rows = slice(None) if row is None else slice(row, row + 1)
        if row is None:
            own = lambda t: t  # noqa: E731
        else:  # the row's last `tokens` positions, copied: [B, H, T, D] keys and values, [B, T] positions
            own = lambda t: t[rows, ..., seen - tokens :, :].clone()  # noqa: E731
        kv_layers, kvs, states = [], [], []
        for layer in self.layers:
            if layer.seen_tokens != seen:
                raise ValueError("Every layer of a checkpointed cache must have seen the same tokens")
            has_kv = layer.kv_tokens == seen
            current = layer.state is not None and layer.state_tokens == seen
            if not has_kv and not current:
                raise ValueError("A layer holds neither its keys and values nor up-to-date states")
            kv_layers.append(has_kv)
            kvs.append((own(layer.keys), own(layer.values)) if has_kv and keys_values else None)
            window = tuple(t[rows].clone() for t in layer.window) if current and layer.window is not None else None
            states.append((layer.state[rows].clone(), window) if current else None)
        positions = self.position_ids if row is None else self.position_ids[rows, seen - tokens :].clone()
        given = dict(keys_values=tuple(kvs), positions=positions) if keys_values else {}
        return CacheCheckpoint(tokens, self.keep_kv, tuple(kv_layers), tuple(states), **given)

    @classmethod
    def from_checkpoint(cls, checkpoint: CacheCheckpoint) -> DSLACache:
        """A cache holding the checkpoint's first `tokens` tokens: keys and values as views of the checkpoint's
        (nothing copied), states and windows copied (this cache updates them in place)."""
        if checkpoint.keys_values is None or checkpoint.positions is None:
            raise ValueError("This checkpoint has no keys and values yet: see CacheCheckpoint.sharing_keys_values")
        n = checkpoint.tokens
        cache = cls(num_layers=len(checkpoint.states), keep_kv=checkpoint.keep_kv)
        for layer, kv, state in zip(cache.layers, checkpoint.keys_values, checkpoint.states):
            layer.seen_tokens = n
            if kv is not None:
                keys, values = kv[0][..., :n, :], kv[1][..., :n, :]
                layer.lazy_initialization(keys, values)
                layer.keys, layer.values = keys, values
            if state is not None:
                window = None if state[1] is None else tuple(t.clone() for t in state[1])
                layer.set_state(state[0].clone(), 0, window)
        cache.position_ids = checkpoint.positions[:, :n]
        return cache

    def select_rows(self, rows: list[int], drop_left: int = 0) -> DSLACache:
        """A new cache of these rows of the batch, without its first `drop_left` positions (padding in every row
        kept): keys and values copied once into buffers with room to grow, states and windows indexed. For a
        server's batch as requests leave it (`batch_select_indices` then `trim_left` would copy twice)."""
        seen = self.get_seq_length()
        if not 0 <= drop_left <= seen or not rows:
            raise ValueError(f"Select at least one row and drop at most the {seen} positions seen")
        index = torch.tensor(rows, device=self.position_ids.device if self.position_ids is not None else None)
        out = type(self)(num_layers=len(self.layers), keep_kv=self.keep_kv)
        for mine, layer in zip(out.layers, self.layers):
            if layer.kv_tokens:
                parts = [
                    (layer.keys[i : i + 1, ..., drop_left:, :], layer.values[i : i + 1, ..., drop_left:, :])
                    for i in rows
                ]
                mine.gather_kv(parts, layer.kv_tokens - drop_left)
            if layer.state is not None:
                window = None if layer.window is None else tuple(t.index_select(0, index) for t in layer.window)
                mine.set_state(layer.state.index_select(0, index), 0, window)
            mine.seen_tokens = layer.seen_tokens - drop_left
            mine.state_tokens = max(0, layer.state_tokens - drop_left)
        if self.position_ids is not None:
            out.position_ids = self.position_ids.index_select(0, index)[:, drop_left:]
        return out

    def trim_left(self, count: int) -> None:
        """Drop the first `count` positions, which must be padding in every row (after requests left the batch)."""
        if count <= 0:
            return
        for layer in self.layers:
            if layer.kv_tokens:
                layer.keys, layer.values = layer.keys[..., count:, :], layer.values[..., count:, :]
            layer.seen_tokens -= count
            layer.state_tokens = max(0, layer.state_tokens - count)
        if self.position_ids is not None:
            self.position_ids = self.position_ids[:, count:]

    @property
    def memory_bytes(self) -> int:
        """Bytes held by keys, values and DSLA states across layers."""
        return sum(layer.memory_bytes for layer in self.layers)


__all__ = ["CacheCheckpoint", "DSLACache", "DSLACacheLayer"]
