# Copyright 2026 The armorm developers. Licensed under the Apache License, Version 2.0.
"""Batches of token rows: sorted by length and bounded by a token budget, right-padded.

The cost of a forward pass is its padded tokens (rows × the longest row), not its rows: a batch holds up to
`batch_size` rows and, given `max_tokens`, no more rows than keep rows × longest within it. Sorting by length first
keeps the padding small; the longest batch runs first, so an out-of-memory error shows at once. On a CPU a larger
batch gains next to nothing while its padding costs in full (BENCHMARKS.md), so a CPU forward has a budget by default.
"""

from collections.abc import Sequence

import torch


__all__ = [
    "CPU_MAX_BATCH_TOKENS",
    "CPU_MAX_PACKED_TOKENS",
    "default_max_tokens",
    "length_sorted_batches",
    "right_pad",
]

# Padded tokens per forward on a CPU when no budget is given: with SmolLM2-135M, 16 mixed-length answers in batches of
# 16 ran at 0.40x one at a time by rows alone and 0.75x with this budget (BENCHMARKS.md, the pipeline).
CPU_MAX_BATCH_TOKENS = 1024
# The same for packed batches (`packing`), which compute no padding: a longer row makes a longer, cheaper matrix
# product (the pipeline at batch 8 and 16: 1.33x and 1.31x the model card's loop at 4096, 1.25x and 1.21x at 1024).
CPU_MAX_PACKED_TOKENS = 4096


def default_max_tokens(max_tokens: int | None, device: torch.device | str, packed: bool = False) -> int | None:
    """The token budget of a forward: `max_tokens` where given, else on a CPU `CPU_MAX_BATCH_TOKENS` (padded batches)
    or `CPU_MAX_PACKED_TOKENS` (`packed`), and none (rows only) on an accelerator, where a larger batch does pay."""
    if max_tokens is None and torch.device(device).type == "cpu":
        return CPU_MAX_PACKED_TOKENS if packed else CPU_MAX_BATCH_TOKENS
    return max_tokens


def length_sorted_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices in batches sorted by length, longest first: at most `batch_size` rows, and at most `max_tokens` padded
    tokens (rows × the batch's longest row; a row longer than the budget runs alone)."""
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"`max_tokens` must be >= 1, got {max_tokens}.")
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        batch = batches[-1] if batches else None
        # Sorted longest first: the batch's first row is its longest.
        if (
            batch
            and len(batch) < batch_size
            and (max_tokens is None or (len(batch) + 1) * lengths[batch[0]] <= max_tokens)
        ):
            batch.append(i)
        else:
            batches.append([i])
    return batches


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Token rows padded on the right to one width: `input_ids` and `attention_mask`, each (batch, width)."""
    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask
