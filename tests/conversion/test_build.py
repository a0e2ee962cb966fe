"""`armorm build`: every stage in one command, the checkpoint made of the work folder's files, reruns reuse stages."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from armorm_cli.cli import main as cli
from armorm_io.artifacts import load_gating, load_regression, load_transform
from conversion import build as build_module
from conversion.bt import BTSettings
from conversion.build import main as build
from tests.utils import file_stamps, spy_on_stages, tiny_llama_config


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


def test_build_makes_a_checkpoint_from_its_stages_and_reuses_them(backbone, tmp_path, monkeypatch):
    """Every stage runs once; a rerun runs none and writes no file; a change runs exactly the stages that depend on
    it (what ran is seen by each stage's work function, what was kept by each file's bytes, mtime and inode)."""
    runs = spy_on_stages(monkeypatch)
    run_build(backbone, tmp_path)
    assert runs == ["extract:ratings-0", "extract:pairs-0", "fit", "decorrelate", "gate", "assemble"]
    work, checkpoint = tmp_path / "work", tmp_path / "ckpt"
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
    # The score's scale, over both answers of each pair the gate read (values: test_assemble's statistics test).
    pairs = json.loads((work / "features" / "pairs-0" / "meta.json").read_text())["counts"]["rows"]
    assert model.config.score_statistics["count"] == 2 * pairs > 0

    # A rerun reuses every finished stage: no stage runs (one that starts raises), no file is written again.
    stamps = file_stamps(work, checkpoint)
    runs.forbidden = True
    run_build(backbone, tmp_path)
    assert file_stamps(work, checkpoint) == stamps
    runs.forbidden = False

    def under(folder: Path, stamps: dict, *but: str) -> dict:
        return {p: s for p, s in stamps.items() if folder in p.parents and p.name not in but}

    # A stage whose report is gone (interrupted there) runs again and gives the same result; reuse follows content,
    # so the stage after it, whose inputs did not change, is reused: the checkpoint is not written again.
    (work / "gate.json").unlink()
    runs.clear()
    run_build(backbone, tmp_path)
    assert runs == ["gate"]
    gate_files = ("gating.safetensors", "gate.json", "gate.png")
    now = file_stamps(work, checkpoint)
    assert under(work, now, *gate_files) == under(work, stamps, *gate_files)
    assert under(checkpoint, now) == under(checkpoint, stamps)
    again, _ = load_gating(work / "gating.safetensors")
    for name, tensor in gating.items():
        torch.testing.assert_close(again[name], tensor, rtol=0, atol=0)

    # Another gating seed: a new gating file, so assemble runs again too; the stages before it are reused.
    runs.clear()
    run_build(backbone, tmp_path, "--gate-seed", "1")
    assert runs == ["gate", "assemble"]
    assert under(work, file_stamps(work), *gate_files) == under(work, stamps, *gate_files)
    assert not torch.equal(load_gating(work / "gating.safetensors")[0]["layers.0.weight"], gating["layers.0.weight"])

    # Another ridge grid: a new regression, so every stage that reads it, directly or not, runs again; the features
    # are reused.
    runs.clear()
    run_build(backbone, tmp_path, "--gate-seed", "1", "--fit-alphas", "0.5")
    assert runs == ["fit", "decorrelate", "gate", "assemble"]
    assert file_stamps(work / "features") == under(work / "features", stamps) != {}


def test_build_rejects_an_unknown_option():
    with pytest.raises(TypeError, match="unexpected keyword argument 'stepz'"):
        build(backbone="b", ratings=["r"], pairs=["p"], out="out", stepz=3)


def test_build_with_bt_pairs_stands_every_stage_on_the_bradley_terry_backbone(backbone, tmp_path, monkeypatch):
    """`--bt-pairs` runs `armorm bt` first, into `<work>/bt`: the features are those `armorm extract` gives with that
    folder as `--backbone`, the checkpoint's backbone is its body (score head dropped), the gate's validation pairs
    are none it trained on. A rerun reuses every stage; another Bradley-Terry setting runs it and everything after
    it again; settings that would train it on the gate's validation prompts are refused before any stage runs."""
    from safetensors.torch import load_file

    from armorm_io.features import load_features
    from armorm_io.pair_keys import held_out
    from conversion.extract import main as extract

    bt_flags = ["--bt-pairs", str(EXAMPLES / "pairs.jsonl"), "--bt-batch-size", "16", "--bt-lora-r", "2"]
    bt_flags += ["--bt-max-length", "256", "--bt-truncate-prompt", "--bt-logging-steps", "1"]
    runs = spy_on_stages(monkeypatch)
    run_build(backbone, tmp_path, *bt_flags)
    assert runs == ["bt", "extract:ratings-0", "extract:pairs-0", "fit", "decorrelate", "gate", "assemble"]
    work, checkpoint = tmp_path / "work", tmp_path / "ckpt"
    bt_folder = work / "bt"
    assert json.loads((bt_folder / "bt.json").read_text())["metrics"]["steps"] > 0

    # The features: exactly what `armorm extract` writes with the Bradley-Terry folder as the backbone.
    again = extract(
        backbone=str(bt_folder), data=str(EXAMPLES / "pairs.jsonl"), kind="pairs", split="train[:60]",
        out=str(tmp_path / "again"), device="cpu",
    )  # fmt: skip
    assert again["counts"]["rows"] > 0
    built, _ = load_features(work / "features" / "pairs-0")
    expected, _ = load_features(tmp_path / "again")
    assert built.keys() == expected.keys() and {"prompt_keys", "pair_keys"} <= built.keys()
    for name in expected:
        torch.testing.assert_close(built[name], expected[name], rtol=0, atol=0)

    # The checkpoint's backbone is the Bradley-Terry model's body, which the fine-tuning moved off `--backbone`.
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    classifier = AutoModelForSequenceClassification.from_pretrained(bt_folder)
    plain = load_file(Path(backbone) / "model.safetensors")
    body = classifier.model.state_dict()
    assert set(model.model.state_dict()) == set(body) and "score.weight" not in model.state_dict()
    for name, tensor in body.items():
        torch.testing.assert_close(model.model.state_dict()[name], tensor, rtol=0, atol=0)
    assert any(not torch.equal(body[name], plain[name]) for name in plain if name in body)

    # The gate validated on prompts the Bradley-Terry stage held out, none it trained on.
    gate_report = json.loads((work / "gate.json").read_text())["metrics"]
    assert gate_report["split"] == "prompt_key"
    assert gate_report["backbone_training"]["val_pairs_trained_on"] == 0 < gate_report["val_pairs"]
    trained = load_file(bt_folder / "trained_pairs.safetensors")
    validation = held_out(built["prompt_keys"], 0.1, 0)
    assert int(validation.sum()) == gate_report["val_pairs"]
    assert not torch.isin(built["pair_keys"][validation], trained["pair_keys"]).any()
    assert not torch.isin(built["prompt_keys"][validation], trained["prompt_keys"]).any()
    assert torch.isin(built["pair_keys"][~validation], trained["pair_keys"]).any()  # the same data: it could

    # A rerun reuses every stage, the Bradley-Terry one included.
    stamps = file_stamps(work, checkpoint)
    runs.forbidden = True
    run_build(backbone, tmp_path, *bt_flags)
    assert file_stamps(work, checkpoint) == stamps
    runs.forbidden = False

    # Another Bradley-Terry setting: a new backbone, so every stage after it runs again.
    runs.clear()
    run_build(backbone, tmp_path, *bt_flags[:-2], "--bt-lora-r", "4", "--bt-logging-steps", "1")
    assert runs == ["bt", "extract:ratings-0", "extract:pairs-0", "fit", "decorrelate", "gate", "assemble"]
    assert json.loads((bt_folder / "bt.json").read_text())["settings"]["lora_r"] == 4

    # A Bradley-Terry split that would train on the gate's validation prompts is refused, before any stage runs.
    runs.clear()
    with pytest.raises(ValueError, match=r"would train on \d+ of the \d+ prompts the gate validates on"):
        run_build(backbone, tmp_path, *bt_flags, "--bt-seed", "1")
    assert runs == []
    # Another seed is fine for Bradley-Terry pairs that share no prompt with the gate's.
    other = tmp_path / "other-pairs.jsonl"
    other.write_text(json.dumps({"prompt": "Another question?", "chosen": "Yes.", "rejected": "No."}) + "\n")
    for bt_pairs, refused in ((EXAMPLES / "pairs.jsonl", True), (other, False)):
        config = build_module.BuildConfig(
            backbone=backbone, ratings=[], pairs=[str(EXAMPLES / "pairs.jsonl")], out="o", bt_pairs=[str(bt_pairs)],
            bt=BTSettings(seed=1),
        )  # fmt: skip
        if refused:
            with pytest.raises(ValueError, match="prompts the gate validates on"):
                build_module._check_bt_held_out(config)
        else:
            build_module._check_bt_held_out(config)
