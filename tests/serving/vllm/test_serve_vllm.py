"""`armorm serve --backend vllm`: vLLM's async engine behind the same endpoints, every answer equal to the
transformers model's scores (the references of `make_reference.py`), under a load of concurrent clients with malformed
and abandoned requests among them, and with prompt features evicted from a small store (resubmitted, still exact)."""

import json
import sys

import pytest


pytest.importorskip("vllm", reason="vLLM is not installed here: `make test-vllm` runs these in .venv-vllm")

from transformers import AutoTokenizer  # noqa: E402

from tests.serving.vllm.conftest import ENGINE  # noqa: E402
from tests.serving_utils import assert_close_scores, free_port, load_with_faults, request, running_server  # noqa: E402


@pytest.fixture(scope="module")
def server(reference, tmp_path_factory):
    port = free_port()
    engine = {k: v for k, v in ENGINE.items() if k not in ("runner", "dtype")}
    engine["hf_overrides"] = {"armorm_prompt_feature_entries": 4}  # small: evictions happen and must be recovered
    command = [sys.executable, "-m", "armorm_cli", "serve", "--model", str(reference / "armorm")]
    command += [
        "--backend",
        "vllm",
        "--dtype",
        "float32",
        "--port",
        str(port),
        "--vllm-engine-args",
        json.dumps(engine),
    ]
    with running_server(command, port, tmp_path_factory.mktemp("serve-vllm") / "server.log"):
        yield port


def test_score_and_get_reward_match_transformers(server, reference, cases):
    rows = cases["armorm"]["rows"]
    status, answer = request(server, "/score", {"conversations": [r["messages"] for r in rows]})
    assert status == 200, answer
    for i, row in enumerate(rows):
        assert_close_scores([answer["scores"][i]], [row["score"]], row["name"])
        for key in ("rewards", "gating_output", "coefficients"):
            assert answer[key][i] == pytest.approx(row[key], abs=1e-5), (row["name"], key)

    tokenizer = AutoTokenizer.from_pretrained(reference / "armorm")
    prompts = [
        tokenizer.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, tokenize=False) for r in rows
    ]
    queries = [p + r["messages"][-1]["content"] + tokenizer.eos_token for p, r in zip(prompts, rows)]
    status, rewards = request(
        server, "/get_reward", {"query": queries, "prompts": prompts, "labels": [None] * len(rows)}
    )
    assert status == 200, rewards
    assert_close_scores(rewards["rewards"], [r["score"] for r in rows], "/get_reward")
    names = cases["armorm"]["objective_names"]
    for i, name in enumerate(names):
        assert rewards["extra_logs"][f"armorm/{name}"] == pytest.approx([r["rewards"][i] for r in rows], abs=1e-5)


def test_concurrent_clients_with_malformed_and_abandoned_requests(server, cases):
    rows = cases["armorm"]["rows"]
    result = load_with_faults(server, [r["messages"] for r in rows], [r["score"] for r in rows], clients=4, seconds=10)
    assert len(result.records) > 10


def test_an_evicted_prompt_feature_is_resubmitted(server, cases):
    """With four prompt features kept, other prompts push out the GRPO prompt's; the next completion's gating token
    comes from vLLM's prefix cache, the plugin reports it, the server sends it again without the cache: exact."""
    rows = {r["name"]: r for r in cases["armorm"]["rows"]}
    _, before = request(server, "/info")
    for name in ("grpo-3", "single-turn", "multi-turn", "unicode", "empty-answer", "grpo-4"):
        status, answer = request(server, "/score", {"conversations": [rows[name]["messages"]]})
        assert status == 200, answer
        assert_close_scores(answer["scores"], [rows[name]["score"]], name)
    _, after = request(server, "/info")
    assert after["stats"]["resubmitted"] > before["stats"]["resubmitted"]
