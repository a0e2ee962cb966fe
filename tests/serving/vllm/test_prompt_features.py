"""The pooler's bookkeeping without an engine: where h_x is read, which prompt positions are stored, under which key."""

import numpy as np
import pytest
import torch


pytest.importorskip("vllm", reason="vLLM is not installed here: `make test-vllm` runs these in .venv-vllm")

from vllm_armorm.outputs import ErrorCode  # noqa: E402
from vllm_armorm.pooler import plan_request  # noqa: E402
from vllm_armorm.prompt_features import PromptFeatureStore, candidate_positions, prefix_keys  # noqa: E402


PATTERN = (7, 8, 9)


def test_candidate_positions_are_where_the_pattern_head_ends():
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 11, size=400)
    for offset in range(len(PATTERN)):
        expected = [
            p for p in range(offset, len(tokens)) if list(tokens[p - offset : p + 1]) == list(PATTERN[: offset + 1])
        ]
        assert candidate_positions(tokens, PATTERN, offset).tolist() == expected
    assert candidate_positions(np.array([7, 8]), PATTERN, 2).tolist() == []


def test_prefix_keys_are_equal_exactly_when_the_prefixes_are():
    a = np.array([1, 7, 3, 7, 5, 7, 9])
    b = np.array([1, 7, 3, 7, 6, 7, 9])  # differs from position 4 on
    positions = [1, 3, 5, 6]
    ka, kb = prefix_keys(a, positions), prefix_keys(b, positions)
    assert [x == y for x, y in zip(ka, kb)] == [True, True, False, False]
    assert prefix_keys(a, [3]) == [ka[1]]  # a key does not depend on which other positions were asked for
    assert prefix_keys(a.astype(np.int32), positions) == ka


def test_the_store_evicts_the_least_recently_used_and_returns_copies():
    store = PromptFeatureStore(entries=2, hidden_size=3, dtype=torch.float32)
    store.put([b"a", b"b"], torch.tensor([[1.0, 1, 1], [2, 2, 2]]))
    assert store.get(b"a")[0] == 1  # "a" used: "b" is now the oldest
    store.put([b"c"], torch.tensor([[3.0, 3, 3]]))
    assert store.get(b"b") is None and store.get(b"c")[0] == 3 and len(store) == 2
    copy = store.get(b"a")
    store.put([b"d", b"e"], torch.tensor([[4.0, 4, 4], [5, 5, 5]]))
    assert copy.tolist() == [1, 1, 1] and store.get(b"a") is None


def test_plans_read_the_given_position_or_the_last_pattern_and_refuse_the_rest():
    tokens = np.array([1, 7, 8, 9, 4, 7, 8, 9, 5, 7])  # the pattern starts at 1 and at 5; a lone 7 at 9
    plan = plan_request(tokens, PATTERN, 0, None)
    assert plan.gating_position == 5 and plan.error == ErrorCode.OK
    assert plan.positions.tolist() == [1, 5, 9] and plan.gating_key == prefix_keys(tokens, [5])[0]
    assert plan_request(tokens, PATTERN, 2, None).gating_position == 7
    given = plan_request(tokens, PATTERN, 0, 2)
    assert given.gating_position == 2 and given.positions.tolist() == [1, 2, 5, 9]
    assert plan_request(np.array([1, 2, 3]), PATTERN, 0, None).error == ErrorCode.NO_GATING_PATTERN
    for bad in (10, -1, True, "3", 2.0):
        assert plan_request(tokens, PATTERN, 0, bad).error == ErrorCode.GATING_POSITION_OUTSIDE_PROMPT
