"""`armorm annotate --backend vllm`: vLLM's offline engine with the plugin gives the scores that the package's own
scoring path gives in the main environment (`cases.json`, `make_reference.py`), and the pairs follow from them.

The data holds every reference conversation, the answers to one prompt as that prompt's candidates (the GRPO prompt's
eight answers share it through vLLM's prefix cache)."""

import json

import pytest
import torch


pytest.importorskip("vllm", reason="vLLM is not installed here: `make test-vllm` runs these in .venv-vllm")

import datasets  # noqa: E402

from annotation import annotate as annotate_stage  # noqa: E402
from tests.serving.vllm.conftest import ENGINE  # noqa: E402


ATOL = 1e-5


def test_vllm_backend_equals_the_scoring_path(reference, cases, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: faster to start
    groups: dict[str, dict] = {}
    for row in cases["armorm"]["rows"]:
        prompt = row["messages"][:-1]
        group = groups.setdefault(json.dumps(prompt), {"messages": prompt, "completions": [], "expected": []})
        group["completions"].append(row["messages"][-1]["content"])
        group["expected"].append(row)
    data = tmp_path / "gens.jsonl"
    data.write_text(
        "".join(json.dumps({k: g[k] for k in ("messages", "completions")}) + "\n" for g in groups.values())
    )
    engine_args = {k: v for k, v in ENGINE.items() if k not in ("runner", "dtype")}
    report = annotate_stage.main(
        model=str(reference / "armorm"), data=str(data), out=str(tmp_path / "out"), backend="vllm",
        vllm_engine_args=json.dumps(engine_args), dtype="float32", max_length=ENGINE["max_model_len"],
    )  # fmt: skip

    scored = datasets.load_from_disk(str(tmp_path / "out" / "scored")).to_list()
    pairs = datasets.load_from_disk(str(tmp_path / "out" / "pairs")).to_list()
    assert len(scored) == len(groups) and report["skipped"] == []
    expected_pairs = []
    for out, group in zip(scored, groups.values()):
        for key, column in (("score", "scores"), ("rewards", "rewards")):
            torch.testing.assert_close(
                torch.tensor(out[column]), torch.tensor([row[key] for row in group["expected"]]), atol=ATOL, rtol=0
            )
        torch.testing.assert_close(
            torch.tensor(out["gating_output"]), torch.tensor(group["expected"][0]["gating_output"]), atol=ATOL, rtol=0
        )
        scores = [row["score"] for row in group["expected"]]
        if len(scores) > 1:
            best, worst = scores.index(max(scores)), scores.index(min(scores))
            expected_pairs.append((group["completions"][best], group["completions"][worst]))
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == expected_pairs
    assert report["settings"]["backend"] == "vllm" and report["metrics"]["counts"]["pairs"] == len(expected_pairs) > 0
