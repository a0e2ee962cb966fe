"""`armorm build`: every stage in one command, the checkpoint made of the work folder's files, reruns reuse stages."""

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from armorm_cli.cli import main as cli
from armorm_io.artifacts import load_gating, load_regression, load_transform
from conversion.build import main as build
from tests.utils import tiny_llama_config


EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


@pytest.fixture
def backbone(tmp_path, smollm2_tokenizer):
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_llama_config(vocab_size=len(smollm2_tokenizer), pad_token_id=2))
    model.save_pretrained(tmp_path / "backbone")
    smollm2_tokenizer.save_pretrained(tmp_path / "backbone")
    return str(tmp_path / "backbone")


def run_build(backbone, tmp_path, *extra):
    return cli([
        "build", "--backbone", backbone,
        "--ratings", str(EXAMPLES / "ratings.jsonl"), "--pairs", str(EXAMPLES / "pairs.jsonl"),
        "--extract-split", "train[:60]", "--out", str(tmp_path / "ckpt"), "--work", str(tmp_path / "work"),
        "--gate-steps", "30", "--gate-batch-size", "16", "--gate-gating-hidden-dim", "16", "--gate-eval-every", "10",
        "--extract-device", "cpu", "--gate-device", "cpu", *extra,
    ])  # fmt: skip


def test_build_makes_a_checkpoint_from_its_stages_and_reuses_them(backbone, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="conversion.build")
    run_build(backbone, tmp_path)
    work = tmp_path / "work"
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt").eval()

    weight, _, objectives = load_regression(work / "regression.safetensors")
    matrix, penalties, metadata = load_transform(work / "transform.safetensors")
    gating, _ = load_gating(work / "gating.safetensors")
    assert model.config.objective_names == objectives == [
        "demo-helpfulness", "demo-correctness", "demo-safety", "demo-verbosity"
    ]  # fmt: skip
    assert metadata["verbosity"] == "demo-verbosity" and model.config.verbosity_objective == 3
    # The gate runs over the objectives the gate stage kept; verbosity's column of T is zero, so it is never one.
    gated = json.loads((work / "gate.json").read_text())["metrics"]["gated_objectives"]
    assert model.config.gated_objectives == [objectives.index(name) for name in gated] and 3 not in gated
    assert penalties[3] == 0 and (penalties[:3] >= 0).all()
    torch.testing.assert_close(model.regression_layer.weight, weight, rtol=0, atol=0)
    torch.testing.assert_close(model.reward_transform_matrix, matrix, rtol=0, atol=0)
    for name, tensor in gating.items():
        torch.testing.assert_close(model.gating.state_dict()[name], tensor, rtol=0, atol=0)
    assert {p.name for p in (work / "features").iterdir()} == {"ratings-0", "pairs-0"}

    # A rerun reuses every finished stage: nothing is rewritten.
    files = sorted(p for p in work.rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in files}
    caplog.clear()
    run_build(backbone, tmp_path)
    printed = caplog.text
    assert printed.count("done earlier, reused") == 6, printed
    assert {p: p.stat().st_mtime_ns for p in files} == stamps

    # A stage whose report is gone (interrupted there) runs again and gives the same result; reuse follows content,
    # so the stage after it, whose inputs did not change, is reused.
    (work / "gate.json").unlink()
    caplog.clear()
    run_build(backbone, tmp_path)
    printed = caplog.text
    assert "[build] gate ..." in printed and printed.count("done earlier, reused") == 5
    again, _ = load_gating(work / "gating.safetensors")
    for name, tensor in gating.items():
        torch.testing.assert_close(again[name], tensor, rtol=0, atol=0)

    # Another gating seed: a new gating file, so assemble runs again too; the stages before it are reused.
    caplog.clear()
    run_build(backbone, tmp_path, "--gate-seed", "1")
    printed = caplog.text
    assert "[build] gate ..." in printed and "[build] assemble ..." in printed
    assert printed.count("done earlier, reused") == 4


def test_build_rejects_an_unknown_option():
    with pytest.raises(TypeError, match="unexpected keyword argument 'stepz'"):
        build(backbone="b", ratings=["r"], pairs=["p"], out="out", stepz=3)
