"""The vLLM plugin offline (`LLM.classify`): both checkpoint layouts score as `ArmoRMForRewardModeling` does, under
chunked prefill and with prefix caching on, and a request it cannot score gets an error while the others are served.
A plain `LLM.classify` returns the reward [s] alone; `pooling_params(full_output=True)` the full vector.

Bars (float32): rewards, gating weights and coefficients within 1e-5, scores within 1e-4 relative, of the
transformers model on the same weights (`make_reference.py`, run in the main environment).
"""

import json
import math
import os

import pytest


vllm = pytest.importorskip("vllm", reason="vLLM is not installed here: `make test-vllm` runs these in .venv-vllm")

from tests.serving.vllm.conftest import ENGINE  # noqa: E402
from vllm_armorm import ArmoRMOutput, ArmoRMRequestError, ErrorCode, pooling_params, score_tokens  # noqa: E402


def assert_matches(got: ArmoRMOutput, row: dict) -> None:
    import torch

    for key in ("rewards", "gating_output", "coefficients"):
        torch.testing.assert_close(
            torch.tensor(getattr(got, key)), torch.tensor(row[key]), atol=1e-5, rtol=0, msg=f"{row['name']}: {key}"
        )
    assert abs(got.score - row["score"]) <= 1e-4 * max(abs(row["score"]), 1e-3), (row["name"], got.score, row["score"])


def assert_score(got: float, row: dict) -> None:
    assert abs(got - row["score"]) <= 1e-4 * max(abs(row["score"]), 1e-3), (row["name"], got, row["score"])


def classify(llm, token_ids: list[list[int]], gating_positions=None) -> list[list[float]]:
    """The full vectors [status, s, r, g, c] of `LLM.classify`."""
    positions = gating_positions or [None] * len(token_ids)
    outputs = llm.classify(
        [{"prompt_token_ids": ids} for ids in token_ids],
        pooling_params=[pooling_params(g, full_output=True) for g in positions],
        use_tqdm=False,
    )
    return [output.outputs.probs for output in outputs]


def stats(llm) -> dict:
    import dataclasses

    return dataclasses.asdict(llm.apply_model(lambda model: model.pooler.stats)[0])


def prefix_cache_counts(llm) -> tuple[int, int]:
    metrics = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
    return metrics["vllm:prefix_cache_hits"], metrics["vllm:prefix_cache_queries"]


def engine_here(model: str, **kwargs):
    """An `LLM` whose engine runs in this process (faster to start; `apply_model` reads the pooler's counters)."""
    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        return vllm.LLM(model, **ENGINE, **kwargs)
    finally:
        if previous is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous


@pytest.fixture(scope="module")
def armorm_llm(reference):
    """This package's layout, prefix caching and 64-token prefill chunks on."""
    llm = engine_here(str(reference / "armorm"), disable_log_stats=False)
    yield llm
    del llm


@pytest.fixture(scope="module")
def rlhflow_llm(reference):
    """The released layout, with a prompt-feature store of two entries (so evictions happen)."""
    llm = engine_here(str(reference / "rlhflow"), hf_overrides={"armorm_prompt_feature_entries": 2})
    yield llm
    del llm


@pytest.mark.parametrize("positions", ["from-the-rendering", "pattern-search"])
def test_this_package_layout_matches_transformers(armorm_llm, cases, positions):
    """Every conversation, with the gating position passed (as `armorm serve` does) or found by vLLM's pooler in the
    tokens (as vLLM's own endpoints do); the long one is split over several prefill chunks."""
    rows = cases["armorm"]["rows"]
    assert max(len(r["input_ids"]) for r in rows) > ENGINE["max_num_batched_tokens"] * 3
    given = [r["gating_position"] for r in rows] if positions == "from-the-rendering" else None
    for row, vector in zip(rows, classify(armorm_llm, [r["input_ids"] for r in rows], given)):
        assert_matches(ArmoRMOutput.from_vector(vector, row["name"]), row)


def test_released_layout_matches_its_conversion(rlhflow_llm, cases):
    """The released RLHFlow layout (flat Llama config) loads as is and scores as its `armorm convert-rlhflow` copy,
    through `score_tokens` (its store holds two entries: the GRPO rows that lose their cached h_x are resubmitted)."""
    rows = cases["rlhflow"]["rows"]
    results = score_tokens(rlhflow_llm, [r["input_ids"] for r in rows], [r["gating_position"] for r in rows])
    for row, result in zip(rows, results):
        assert isinstance(result, ArmoRMOutput), result
        assert len(result.rewards) == 19
        assert_matches(result, row)


def test_grpo_group_reads_the_prompt_feature_of_the_prefix_cache(armorm_llm, cases):
    """Eight completions of one prompt (GRPO): the first computes the prompt, the seven others get it from vLLM's
    prefix cache, gating token included; h_x then comes from the plugin's store and every score is exact."""
    rows = [r for r in cases["armorm"]["rows"] if r["name"].startswith("grpo-")]
    assert len(rows) == 8
    armorm_llm.reset_prefix_cache()
    before, (hits, queries) = stats(armorm_llm), prefix_cache_counts(armorm_llm)
    first = classify(armorm_llm, [rows[0]["input_ids"]], [rows[0]["gating_position"]])
    rest = classify(armorm_llm, [r["input_ids"] for r in rows[1:]], [r["gating_position"] for r in rows[1:]])
    after, (hits_after, queries_after) = stats(armorm_llm), prefix_cache_counts(armorm_llm)
    for row, vector in zip(rows, first + rest):
        assert_matches(ArmoRMOutput.from_vector(vector, row["name"]), row)
    # The gating token (position 61) lies in the second 32-token block, made of prompt tokens only: cached.
    assert hits_after - hits >= 7 * 64, (hits_after - hits, queries_after - queries)
    assert after["from_store"] - before["from_store"] == 7
    assert after["computed"] - before["computed"] == 1 and after["evicted"] == before["evicted"]


def test_a_wrong_gating_position_changes_the_gating(armorm_llm, cases):
    """The references would catch a prompt feature read at the wrong token: one token earlier moves g far past 1e-5."""
    import torch

    row = next(r for r in cases["armorm"]["rows"] if r["name"] == "single-turn")
    (vector,) = classify(armorm_llm, [row["input_ids"]], [row["gating_position"] - 1])
    moved = torch.tensor(ArmoRMOutput.from_vector(vector).gating_output) - torch.tensor(row["gating_output"])
    assert moved.abs().max() > 1e-2


def test_unscorable_requests_get_an_error_and_the_others_are_served(armorm_llm, cases):
    """No gating pattern, or a gating position outside the prompt: status 1 / 2, zeros, valid JSON (no NaN); the
    requests around them are scored exactly, and the engine keeps serving afterwards."""
    rows = cases["armorm"]["rows"]
    good = rows[:2]
    no_pattern = good[0]["input_ids"][: good[0]["gating_position"]]  # the prompt cut before its assistant header
    token_ids = [good[0]["input_ids"], no_pattern, good[1]["input_ids"], good[1]["input_ids"]]
    positions = [good[0]["gating_position"], None, good[1]["gating_position"], len(good[1]["input_ids"]) + 3]
    vectors = classify(armorm_llm, token_ids, positions)
    json.dumps(vectors, allow_nan=False)
    assert_matches(ArmoRMOutput.from_vector(vectors[0]), good[0])
    assert_matches(ArmoRMOutput.from_vector(vectors[2]), good[1])
    for vector, code in (
        (vectors[1], ErrorCode.NO_GATING_PATTERN),
        (vectors[3], ErrorCode.GATING_POSITION_OUTSIDE_PROMPT),
    ):
        assert vector[0] == code and not any(vector[1:])
        with pytest.raises(ArmoRMRequestError, match="gating") as error:
            ArmoRMOutput.from_vector(vector, "row 1")
        assert error.value.code == code
    (again,) = classify(armorm_llm, [rows[2]["input_ids"]])
    assert_matches(ArmoRMOutput.from_vector(again), rows[2])


def test_raw_tokens_that_are_not_one_prompt_and_one_answer_are_refused_naming_the_row(armorm_llm, cases):
    """Raw token ids without a gating position (TRL's raw path: the template rendered, special tokens recognised): the
    rows the transformers model refuses (a user turn after the answer; an answer that writes the assistant header,
    which would move h_x into itself) get status 4 from the pooler's search, and `score_tokens` names them; the rows
    around them are scored as before. With its gating position given (the rendering located it), a row is not
    searched, so not refused."""
    raw = {row["name"]: row for row in cases["armorm"]["raw"]}
    refused = [raw["ends-with-a-user-turn"], raw["answer-writes-the-header"]]
    assert all("not one prompt and one answer" in (row["refused"] or "") for row in refused)  # by the model too
    good, proper = cases["armorm"]["rows"][0], raw["one-prompt-one-answer"]
    assert proper["refused"] is None
    token_ids = [good["input_ids"], refused[0]["input_ids"], proper["input_ids"], refused[1]["input_ids"]]
    before = stats(armorm_llm)
    results = score_tokens(armorm_llm, token_ids)
    for i in (1, 3):
        assert isinstance(results[i], ArmoRMRequestError), (i, results[i])
        assert results[i].code == ErrorCode.NOT_ONE_PROMPT_AND_ONE_ANSWER
        assert str(results[i]).startswith(f"prompt {i}: ") and "not one prompt and one answer" in str(results[i])
        assert "ArmoRMReward" in str(results[i]) and "armorm serve" in str(results[i])
    assert stats(armorm_llm)["refused"] - before["refused"] == 2
    assert_matches(results[0], good)
    assert_matches(results[2], proper)
    vectors = classify(armorm_llm, token_ids[1:2])
    json.dumps(vectors, allow_nan=False)
    assert vectors[0][0] == ErrorCode.NOT_ONE_PROMPT_AND_ONE_ANSWER and not any(vectors[0][1:])
    # The user turn after the answer, with the position of the answer's header given: scored, as the rendering says.
    position = good["gating_position"]
    assert refused[0]["input_ids"][: position + 1] == good["input_ids"][: position + 1]
    (given,) = score_tokens(armorm_llm, [refused[0]["input_ids"]], [position])
    assert isinstance(given, ArmoRMOutput), given


def test_an_evicted_prompt_feature_is_reported_and_recomputed_exactly(rlhflow_llm, cases):
    """A store of two entries: once other prompts pushed the GRPO prompt's feature out, a completion whose gating token
    vLLM serves from its prefix cache gets status 3 (never a wrong h_x); sent again without the prefix cache, exact."""
    rows = {r["name"]: r for r in cases["rlhflow"]["rows"]}
    grpo, other = rows["grpo-1"], rows["grpo-2"]
    rlhflow_llm.reset_prefix_cache()
    classify(rlhflow_llm, [grpo["input_ids"]], [grpo["gating_position"]])
    fillers = [rows[name] for name in ("single-turn", "multi-turn", "unicode")]
    classify(rlhflow_llm, [r["input_ids"] for r in fillers], [r["gating_position"] for r in fillers])
    (vector,) = classify(rlhflow_llm, [other["input_ids"]], [other["gating_position"]])
    assert vector[0] == ErrorCode.PROMPT_FEATURE_EVICTED and not any(vector[1:])
    again = rlhflow_llm.classify(
        [{"prompt_token_ids": other["input_ids"]}],
        pooling_params=pooling_params(other["gating_position"], skip_prefix_cache=True, full_output=True),
        use_tqdm=False,
    )
    assert_matches(ArmoRMOutput.from_vector(again[0].outputs.probs), other)


def test_a_plain_classify_returns_the_score_alone(armorm_llm, cases):
    """What a generic reward-model client sends (no `PoolingParams`, so vLLM's default `use_activation=True`) and reads:
    one value per request, so verl's `probs[-1]` and a single-label client's `probs[0]` are both the transformers
    model's score, raw: some references exceed 1, where a sigmoid cannot land, and they differ, where a softmax over
    one value (always 1) could not."""
    rows = cases["armorm"]["rows"]
    scores = [row["score"] for row in rows]
    assert max(scores) > 1 and len(set(scores)) > 1, scores
    outputs = armorm_llm.classify([{"prompt_token_ids": r["input_ids"]} for r in rows], use_tqdm=False)
    for row, output in zip(rows, outputs):
        probs = output.outputs.probs
        assert len(probs) == 1, (row["name"], probs)
        assert_score(probs[-1], row)  # verl
        assert_score(probs[0], row)  # a single-label client
    encoded = armorm_llm.encode([{"prompt_token_ids": rows[0]["input_ids"]}], pooling_task="classify", use_tqdm=False)
    (score,) = encoded[0].outputs.data.tolist()
    assert_score(score, rows[0])


def test_a_plain_classify_gives_no_number_to_an_unscorable_request(armorm_llm, cases):
    """No gating pattern, a gating position outside the prompt, and raw tokens that are not one prompt and one answer:
    NaN (which the OpenAI server answers with an error), never a number; the requests beside them get their scores."""
    rows = cases["armorm"]["rows"]
    raw = {row["name"]: row for row in cases["armorm"]["raw"]}
    good = rows[:2]
    no_pattern = good[0]["input_ids"][: good[0]["gating_position"]]
    token_ids = [good[0]["input_ids"], no_pattern, good[1]["input_ids"], good[1]["input_ids"]]
    token_ids.append(raw["answer-writes-the-header"]["input_ids"])
    positions = [None, None, None, len(good[1]["input_ids"]) + 3, None]
    outputs = armorm_llm.classify(
        [{"prompt_token_ids": ids} for ids in token_ids],
        pooling_params=[pooling_params(g) for g in positions],
        use_tqdm=False,
    )
    probs = [output.outputs.probs for output in outputs]
    for i in (1, 3, 4):
        assert len(probs[i]) == 1 and math.isnan(probs[i][0]), (i, probs[i])
    for i, row in ((0, good[0]), (2, good[1])):
        (score,) = probs[i]
        assert_score(score, row)
