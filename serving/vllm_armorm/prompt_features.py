# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""Hidden states at prompt positions, kept across requests for the tokens vLLM serves from its prefix cache.

With prefix caching, a request whose prompt begins like an earlier one's reuses that request's KV blocks and vLLM
computes no hidden state for those tokens. ArmoRM reads h_x at the gating position, which lies in the prompt, so in
the GRPO case (one prompt, many completions) it is in the cached prefix for every completion but the first.

Attention is causal: the hidden state at position p depends on tokens[0..p] only. So a hidden state computed by any
request can serve every later request that shares tokens[0..p], and tokens[0..p] (hashed) is its key. Every request
stores the hidden state at each position that could be a gating position of some prompt sharing its tokens (where
the pattern's first `offset + 1` tokens end), whether or not it reads h_x there itself: whichever request computed a
cached block stored the candidates it holds. Entries live in one preallocated (entries, d) tensor on the model's
device, least recently used first out.
"""

import hashlib
from collections import OrderedDict

import numpy as np
import torch


__all__ = ["PromptFeatureStore", "candidate_positions", "prefix_keys"]


def candidate_positions(tokens: np.ndarray, pattern: tuple[int, ...], offset: int) -> np.ndarray:
    """Positions p where `pattern[: offset + 1]` ends: every place a gating position of this prompt, or of a longer
    prompt that starts with these tokens, can be."""
    head = np.asarray(pattern[: offset + 1], dtype=tokens.dtype)
    n = len(head)
    if len(tokens) < n:
        return np.zeros(0, dtype=np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(tokens, n)  # (len - n + 1, n)
    return np.flatnonzero((windows == head).all(-1)) + (n - 1)


def prefix_keys(tokens: np.ndarray, positions) -> list[bytes]:
    """A digest of tokens[0..p] for each p of `positions` (ascending): one pass over the tokens in all."""
    hasher, done, keys = hashlib.blake2b(digest_size=16), 0, []
    tokens = np.ascontiguousarray(tokens, dtype=np.int64)
    for p in positions:
        hasher.update(tokens[done : p + 1].tobytes())
        done = p + 1
        keys.append(hasher.copy().digest())
    return keys


class PromptFeatureStore:
    """A bounded map from a prefix key to that prefix's last hidden state, least recently used evicted first."""

    def __init__(self, entries: int, hidden_size: int, dtype: torch.dtype, device: torch.device | str | None = None):
        if entries < 1:
            raise ValueError(f"`armorm_prompt_feature_entries` must be at least 1, got {entries}.")
        self.features = torch.zeros(entries, hidden_size, dtype=dtype, device=device)  # (entries, d)
        self.slots: OrderedDict[bytes, int] = OrderedDict()
        self.free = list(range(entries - 1, -1, -1))

    def __len__(self) -> int:
        return len(self.slots)

    def put(self, keys: list[bytes], features: torch.Tensor) -> None:
        """Store `features[j]` under `keys[j]` (features: (len(keys), d))."""
        slots = []
        for key in keys:
            slot = self.slots.get(key)
            if slot is None:
                slot = self.free.pop() if self.free else self.slots.popitem(last=False)[1]
                self.slots[key] = slot
            else:
                self.slots.move_to_end(key)
            slots.append(slot)
        if slots:
            index = torch.tensor(slots, dtype=torch.long, device=self.features.device)
            self.features.index_copy_(0, index, features.to(self.features.dtype))

    def get(self, key: bytes) -> torch.Tensor | None:
        """A copy of the stored feature (the slot may be reused before the caller is done), or None."""
        slot = self.slots.get(key)
        if slot is None:
            return None
        self.slots.move_to_end(key)
        return self.features[slot].clone()
