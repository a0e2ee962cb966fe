"""Batches bounded by rows and by padded tokens, sorted by length."""

import random

import pytest
import torch

from modeling_armorm.batching import (
    CPU_MAX_BATCH_TOKENS,
    CPU_MAX_PACKED_TOKENS,
    default_max_tokens,
    length_sorted_batches,
)


@pytest.mark.parametrize("max_tokens", [None, 1, 40, 100, 1000])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batches_hold_every_row_once_within_the_budget(batch_size, max_tokens):
    lengths = [random.Random(seed).randrange(1, 60) for seed in range(50)]
    batches = length_sorted_batches(lengths, batch_size, max_tokens)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    order = [lengths[i] for batch in batches for i in batch]
    assert order == sorted(lengths, reverse=True)  # longest first, so padding is small
    for batch in batches:
        padded = len(batch) * max(lengths[i] for i in batch)
        assert len(batch) <= batch_size
        # A row longer than the budget runs alone; otherwise rows × the longest stays within it.
        assert max_tokens is None or padded <= max_tokens or len(batch) == 1
    # Greedy: a batch is closed only because the next row would break a bound.
    for batch, following in zip(batches, batches[1:]):
        longest = lengths[batch[0]]
        assert len(batch) == batch_size or (max_tokens is not None and (len(batch) + 1) * longest > max_tokens)
        assert lengths[following[0]] <= longest


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError, match="batch_size"):
        length_sorted_batches([3], 0)
    with pytest.raises(ValueError, match="max_tokens"):
        length_sorted_batches([3], 2, 0)


def test_a_cpu_forward_has_a_budget_unless_one_is_given():
    """On a CPU a forward costs its padded tokens: no budget given means `CPU_MAX_BATCH_TOKENS` there, rows only on an
    accelerator; a budget given is the one used, on either."""
    assert default_max_tokens(None, "cpu") == CPU_MAX_BATCH_TOKENS
    assert default_max_tokens(None, torch.device("cpu")) == CPU_MAX_BATCH_TOKENS
    assert default_max_tokens(None, "cuda:1") is None and default_max_tokens(None, "mps") is None
    assert default_max_tokens(64, "cpu") == 64 and default_max_tokens(10**9, "cpu") == 10**9
    assert default_max_tokens(64, "cuda") == 64
    # Packed batches compute no padding: a larger default on a CPU, still none on an accelerator.
    assert default_max_tokens(None, "cpu", packed=True) == CPU_MAX_PACKED_TOKENS > CPU_MAX_BATCH_TOKENS
    assert default_max_tokens(None, "cuda", packed=True) is None and default_max_tokens(64, "cpu", packed=True) == 64
