"""`serving/verl_reward.py` against a real `armorm serve` on 127.0.0.1, called the way verl's source calls a custom
reward function (verl is not installed here: it did not install within 5 minutes on this machine, so these tests
follow its source, volcengine/verl at b178a3c):

* `verl/workers/reward_manager/naive.py` and the reward loop's `reward_manager/naive.py`: one call per response,
  `compute_score(data_source=, solution_str=, ground_truth=, extra_info=)`, the reward loop adding
  `reward_router_address` and `reward_model_tokenizer`; `extra_info` gets `num_turns` and `rollout_reward_scores`.
* `verl/workers/reward_manager/batch.py`: `compute_score(data_sources=, solution_strs=, ground_truths=, extra_infos=)`
  on NumPy object arrays.
* `verl/utils/import_utils.py` `load_module`: the function loaded from the file by its path, or as `pkg://`.

Each score and per-objective reward equals an independent row-by-row forward of the same model on the chat
template's tokens (`tests.utils.reference_armorm_outputs`)."""

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.serving_utils import free_port, running_server, save_served_checkpoint
from tests.utils import reference_armorm_outputs


REPO = Path(__file__).resolve().parents[2]
OBJECTIVES = ["helpfulness", "correctness", "verbosity", "safety"]
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime number."}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a fact about owls."},
    ],
]
RESPONSES = ["Paris.", "Seven.", "Owls can turn their heads 270°."]


def load_like_verl(path: Path):
    """`verl.utils.import_utils.load_module` for a file path: a fresh module from the file, not put in sys.modules."""
    spec = importlib.util.spec_from_file_location(f"custom_module_{hash(str(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoint")
    return folder, *save_served_checkpoint(folder, OBJECTIVES)


@pytest.fixture(scope="module")
def expected(checkpoint):
    """Score and rewards of each (prompt, response), the chat template's tokens run one row at a time."""
    _, model, tokenizer = checkpoint
    rows = [
        tokenizer.apply_chat_template([*p, {"role": "assistant", "content": r}], tokenize=True)
        for p, r in zip(PROMPTS, RESPONSES)
    ]
    rows = [list(row["input_ids"]) if hasattr(row, "keys") else list(row) for row in rows]
    return reference_armorm_outputs(model, rows, list(model.config.gating_token_pattern))


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    folder, _, _ = checkpoint
    port = free_port()
    command = [sys.executable, "-m", "armorm_cli", "serve", "--model", str(folder), "--port", str(port)]
    command += ["--max-request-rows", str(len(PROMPTS))]
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    with running_server(command, port, tmp_path_factory.mktemp("serve") / "server.log", env=env):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def verl_reward(server, monkeypatch):
    """The module as verl loads it from `custom_reward_function.path`, the server named by `ARMORM_SERVE_URL`."""
    monkeypatch.setenv("ARMORM_SERVE_URL", server)
    return load_like_verl(REPO / "serving" / "verl_reward.py")


def assert_result(result: dict, expected: dict, i: int) -> None:
    assert sorted(result) == sorted(["score", *OBJECTIVES]), result
    assert result["score"] == pytest.approx(float(expected["score"][i]), abs=1e-4, rel=1e-4)
    for j, name in enumerate(OBJECTIVES):
        assert result[name] == pytest.approx(float(expected["rewards"][i][j]), abs=1e-4, rel=1e-4), (i, name)


def test_compute_score_as_the_naive_reward_manager_calls_it(verl_reward, expected):
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        extra_info = {"split": "train", "index": i, "prompt": prompt}
        extra_info["num_turns"] = None
        extra_info["rollout_reward_scores"] = {}
        result = verl_reward.compute_score(
            data_source="armorm-test", solution_str=response, ground_truth=None, extra_info=extra_info
        )
        assert_result(result, expected, i)


def test_compute_score_as_the_reward_loop_calls_it(verl_reward, expected, server, monkeypatch):
    """The reward loop's extra keyword arguments are accepted and unused; `reward_kwargs.url` names the server."""
    url = server
    monkeypatch.setenv("ARMORM_SERVE_URL", "http://127.0.0.1:9")  # nothing listens there: `url` must win
    result = verl_reward.compute_score(
        data_source="armorm-test", solution_str=RESPONSES[0], ground_truth=None, extra_info={"prompt": PROMPTS[0]},
        reward_router_address="127.0.0.1:1", reward_model_tokenizer=None, url=url,
    )  # fmt: skip
    assert_result(result, expected, 0)


def test_compute_score_batch_as_the_batch_reward_manager_calls_it(verl_reward, expected):
    """NumPy object arrays, as verl's `non_tensor_batch` holds them, the prompt lists too (as parquet gives them)."""
    extras = np.empty(len(PROMPTS), dtype=object)
    for i, prompt in enumerate(PROMPTS):
        extras[i] = {"prompt": np.array(prompt, dtype=object), "rollout_reward_scores": {}}
    results = verl_reward.compute_score_batch(
        data_sources=np.array(["armorm-test"] * len(PROMPTS), dtype=object), solution_strs=list(RESPONSES),
        ground_truths=[None] * len(PROMPTS), extra_infos=extras,
    )  # fmt: skip
    assert len(results) == len(PROMPTS)
    for i, result in enumerate(results):
        assert_result(result, expected, i)


def test_a_string_prompt_is_one_user_turn(verl_reward, expected):
    result = verl_reward.compute_score("armorm-test", RESPONSES[0], None, {"prompt": PROMPTS[0][0]["content"]})
    assert_result(result, expected, 0)


def test_loaded_as_a_pkg_path(server, monkeypatch, expected):
    """`custom_reward_function.path=pkg://serving.verl_reward`: verl imports the installed module."""
    import importlib

    monkeypatch.setenv("ARMORM_SERVE_URL", server)
    module = importlib.import_module("serving.verl_reward")
    assert_result(module.compute_score("armorm-test", RESPONSES[1], None, {"prompt": PROMPTS[1]}), expected, 1)


def test_a_missing_prompt_names_the_key_and_the_fix(verl_reward):
    with pytest.raises(ValueError, match=r"response 0: `extra_info` has no 'prompt'.*data preprocessing"):
        verl_reward.compute_score("armorm-test", "Paris.", None, {"split": "train", "index": 0})
    with pytest.raises(ValueError, match="response 1: .*must be a string or a list of messages"):
        verl_reward.compute_score_batch(["a", "b"], ["x", "y"], None, [{"prompt": PROMPTS[0]}, {"prompt": [1, 2]}])


def test_an_unreachable_server_names_the_setting(verl_reward, monkeypatch):
    monkeypatch.setenv("ARMORM_SERVE_URL", "http://127.0.0.1:9")
    with pytest.raises(verl_reward.ArmoRMServeError, match="cannot reach `armorm serve` at http://127.0.0.1:9"):
        verl_reward.compute_score("armorm-test", "Paris.", None, {"prompt": PROMPTS[0]})


def test_a_request_the_server_refuses_carries_its_message(verl_reward):
    """A batch over the server's `--max-request-rows`: its 422, with the server's message, reaches the trainer."""
    n = len(PROMPTS) + 1
    with pytest.raises(verl_reward.ArmoRMServeError, match="HTTP 422: .*more than `--max-request-rows` allows"):
        verl_reward.compute_score_batch(["a"] * n, ["Paris."] * n, None, [{"prompt": PROMPTS[0]}] * n)
