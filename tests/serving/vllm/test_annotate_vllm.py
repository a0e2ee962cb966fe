"""`armorm annotate --backend vllm`: vLLM's offline engine with the plugin gives the scores that the package's own
scoring path gives in the main environment (`cases.json`, `make_reference.py`), and the pairs follow from them; under
`torchrun` each process runs its own engine on its share of the prompts and rank 0 writes the same outputs.

The data holds every reference conversation, the answers to one prompt as that prompt's candidates (the GRPO prompt's
eight answers share it through vLLM's prefix cache)."""

import json
import multiprocessing
import os
import subprocess
import sys
import threading

import pytest
import torch


pytest.importorskip("vllm", reason="vLLM is not installed here: `make test-vllm` runs these in .venv-vllm")

import datasets  # noqa: E402

from annotation import annotate as annotate_stage  # noqa: E402
from annotation.scorers import VllmScorer  # noqa: E402
from armorm_io.backbone import load_tokenizer  # noqa: E402
from tests.serving.vllm.conftest import ENGINE, REPO  # noqa: E402


ATOL = 1e-5
ENGINE_ARGS = json.dumps({k: v for k, v in ENGINE.items() if k not in ("runner", "dtype")})


def write_groups(cases: dict, data) -> list[dict]:
    """The reference conversations grouped by prompt, written as `messages` + `completions` rows to `data`."""
    groups: dict[str, dict] = {}
    for row in cases["armorm"]["rows"]:
        prompt = row["messages"][:-1]
        group = groups.setdefault(json.dumps(prompt), {"messages": prompt, "completions": [], "expected": []})
        group["completions"].append(row["messages"][-1]["content"])
        group["expected"].append(row)
    data.write_text(
        "".join(json.dumps({k: g[k] for k in ("messages", "completions")}) + "\n" for g in groups.values())
    )
    return list(groups.values())


def test_vllm_backend_equals_the_scoring_path(reference, cases, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: faster to start
    groups = write_groups(cases, tmp_path / "gens.jsonl")
    report = annotate_stage.main(
        model=str(reference / "armorm"), data=str(tmp_path / "gens.jsonl"), out=str(tmp_path / "out"),
        backend="vllm", vllm_engine_args=ENGINE_ARGS, dtype="float32", max_length=ENGINE["max_model_len"],
    )  # fmt: skip
    assert_outputs(tmp_path / "out", groups, report)


@pytest.mark.slow  # two vLLM engines start on the CPU: about 5 minutes on 2 busy cores
def test_two_processes_each_run_an_engine(reference, cases, tmp_path):
    """`torchrun --nproc_per_node 2`: each rank starts its own engine (in a spawned process: in the rank's own, vLLM
    would take the ranks' process group for its world) and scores every other chunk of one prompt; rank 0's outputs
    are the transformers model's scores and pairs, as one process's are."""
    groups = write_groups(cases, tmp_path / "gens.jsonl")
    args = ["annotate", "--model", str(reference / "armorm"), "--data", str(tmp_path / "gens.jsonl")]
    args += ["--out", str(tmp_path / "out"), "--backend", "vllm", "--vllm-engine-args", ENGINE_ARGS]
    args += ["--dtype", "float32", "--max-length", str(ENGINE["max_model_len"]), "--shard-prompts", "1"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # the scorer overrides it
    result = subprocess.run(
        [*command, "-m", "armorm_cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-5000:]
    logs = result.stdout + result.stderr
    engines = [line for line in logs.splitlines() if "Initializing a V1 LLM engine" in line]
    # One engine per rank, each in its own process (vLLM tags its log lines with the process), and clean exits: an
    # engine inside the rank takes torchrun's process group for its world and fails at exit.
    assert len(engines) == 2 and all(line.startswith("(EngineCore") for line in engines), engines
    assert "Traceback" not in logs, logs[-5000:]
    assert_outputs(tmp_path / "out", groups, json.loads((tmp_path / "out" / "annotate.json").read_text()))


def test_closing_the_scorer_stops_its_engine(reference):
    """An engine in a process of its own (as under torchrun, and vLLM's default): `close` ends that process and the
    daemon threads the engine started in this one. vLLM's finalizer left to stop them at exit wakes a thread while
    Python shuts down, which can abort a finished job."""
    threads, processes = set(threading.enumerate()), set(multiprocessing.active_children())
    checkpoint = str(reference / "armorm")
    engine_args = {k: v for k, v in ENGINE.items() if k != "runner"}
    scorer = VllmScorer(
        checkpoint, load_tokenizer(checkpoint), max_length=ENGINE["max_model_len"], truncate_prompt=False,
        engine_args=engine_args, rank_device=torch.device("cpu"),
    )  # fmt: skip
    row = scorer.encode([{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"}])
    assert torch.isfinite(scorer.score([row]).score).all()
    engines = set(multiprocessing.active_children()) - processes  # the processes this scorer started
    assert engines and threading.active_count() > len(threads)

    scorer.close()
    left = [thread.name for thread in threading.enumerate() if thread not in threads and thread.daemon]
    assert left == [], left
    for engine in engines:
        engine.join(timeout=30)
        assert engine.exitcode is not None, engine
    scorer.close()  # again: nothing left to stop


def assert_outputs(out, groups: list[dict], report: dict) -> None:
    scored = datasets.load_from_disk(str(out / "scored")).to_list()
    pairs = datasets.load_from_disk(str(out / "pairs")).to_list()
    assert len(scored) == len(groups) and report["skipped"] == []
    expected_pairs = []
    for item, group in zip(scored, groups):
        for key, column in (("score", "scores"), ("rewards", "rewards")):
            torch.testing.assert_close(
                torch.tensor(item[column]), torch.tensor([row[key] for row in group["expected"]]), atol=ATOL, rtol=0
            )
        torch.testing.assert_close(
            torch.tensor(item["gating_output"]), torch.tensor(group["expected"][0]["gating_output"]), atol=ATOL, rtol=0
        )
        scores = [row["score"] for row in group["expected"]]
        if len(scores) > 1:
            best, worst = scores.index(max(scores)), scores.index(min(scores))
            expected_pairs.append((group["completions"][best], group["completions"][worst]))
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == expected_pairs
    assert report["settings"]["backend"] == "vllm" and report["metrics"]["counts"]["pairs"] == len(expected_pairs) > 0
