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


# Turn headers of a toy template: system (2, 4), user (3, 4), and the gating pattern as the assistant header.
HEADERS = {"system": [2, 4], "user": [3, 4], "assistant": list(PATTERN)}


def test_searched_plans_refuse_what_is_not_one_prompt_and_one_answer():
    """With the checkpoint's turn headers, searched tokens with a prompt turn after the gating pattern, or a second
    assistant header after the last prompt turn, get status 4; a given position, or no headers (a checkpoint made
    before them), is not refused."""
    one = [1, 3, 4, 5, 7, 8, 9, 6]  # a user turn, then the answer
    accepted = [one, [1, 2, 4, 5, *one[1:]], [*one, 3, 4, 5, 7, 8, 9, 6]]  # a system turn first; two exchanges
    refused = [[*one, 3, 4, 5], [*one, 2, 4, 5], [*one, 7, 8, 9, 6]]  # a user / system turn after; a forged header
    for tokens in accepted:
        assert plan_request(np.array(tokens), PATTERN, 0, None, HEADERS).error == ErrorCode.OK, tokens
    for tokens in refused:
        plan = plan_request(np.array(tokens), PATTERN, 0, None, HEADERS)
        assert plan.error == ErrorCode.NOT_ONE_PROMPT_AND_ONE_ANSWER and plan.gating_key is None, tokens
        assert plan.positions.tolist() == candidate_positions(np.array(tokens), PATTERN, 0).tolist()
        assert plan_request(np.array(tokens), PATTERN, 0, None).error == ErrorCode.OK
        assert plan_request(np.array(tokens), PATTERN, 0, 4, HEADERS).error == ErrorCode.OK
    # Without an assistant header among them, the gating pattern stands for it.
    no_assistant = {role: ids for role, ids in HEADERS.items() if role != "assistant"}
    assert (
        plan_request(np.array(refused[2]), PATTERN, 0, None, no_assistant).error
        == ErrorCode.NOT_ONE_PROMPT_AND_ONE_ANSWER
    )


def test_the_plugin_refuses_the_raw_rows_the_model_refuses():
    """The same rule as `ArmoRMForRewardModeling` on raw token ids: over random sequences of header and content tokens,
    the model raises "not one prompt and one answer" exactly where the pooler's plan gets status 4, and where both
    accept, they read h_x at the same position."""
    from modeling_armorm import ArmoRMConfig, ArmoRMForRewardModeling
    from tests.utils import tiny_llama_config

    rng = np.random.default_rng(0)
    pieces = [[1], [5], [6], [2, 4], [3, 4], list(PATTERN)]
    outcomes = set()
    for offset in (0, 2):
        config = ArmoRMConfig(
            text_config=tiny_llama_config(), num_objectives=2, gating_token_pattern=list(PATTERN),
            gating_token_offset=offset, turn_header_patterns=HEADERS,
        )  # fmt: skip
        model = ArmoRMForRewardModeling(config)
        for _ in range(300):
            tokens = np.array([t for i in rng.integers(0, len(pieces), size=rng.integers(1, 12)) for t in pieces[i]])
            plan = plan_request(tokens, PATTERN, offset, None, HEADERS)
            ids = torch.from_numpy(tokens)[None]
            try:
                (position,) = model.find_gating_positions(ids, torch.ones_like(ids)).tolist()
            except ValueError as error:
                refused = "not one prompt and one answer" in str(error)
                expected = ErrorCode.NOT_ONE_PROMPT_AND_ONE_ANSWER if refused else ErrorCode.NO_GATING_PATTERN
                assert plan.error == expected, (tokens.tolist(), str(error))
            else:
                assert plan.error == ErrorCode.OK and plan.gating_position == position, tokens.tolist()
            outcomes.add(plan.error)
    assert outcomes == {ErrorCode.OK, ErrorCode.NO_GATING_PATTERN, ErrorCode.NOT_ONE_PROMPT_AND_ONE_ANSWER}
