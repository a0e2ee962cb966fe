"""`armorm bt`: real `RewardTrainer` steps on a tiny random Llama, the checkpoint as a classifier and as a backbone,
resume, and which pairs it trains on.

The Bradley-Terry score of a conversation is s = wᵀ h, with h the backbone's last hidden state at its last token and
w the score head: the saved classifier's logits (one unpadded forward per conversation, tokenized here by
`apply_chat_template(tokenize=True)`) must equal w · h with h what `armorm extract` writes for the same pairs with the
saved folder as `--backbone`. The pairs are planted separable (every chosen answer says "yes", every rejected one
"no"), so a working trainer drives the loss down and ranks the held-out pairs right.
"""

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaModel, TrainerCallback

from armorm_io.features import load_features
from armorm_io.pair_keys import held_out
from conversion import bt as bt_module
from conversion.bt import main as bt
from conversion.extract import main as extract
from modeling_armorm.scoring import EncodedConversation
from tests.armorm_io.test_pair_keys import independent_key
from tests.utils import llama3_tokenizer, tiny_llama_config


pytestmark = pytest.mark.usefixtures("one_thread")
ATOL = 1e-5
VAL_FRACTION = 0.25
SETTINGS = dict(batch_size=4, epochs=3, lr=1e-2, save_steps=4, logging_steps=1, val_fraction=VAL_FRACTION)


def planted_pairs() -> list[dict]:
    """40 separable pairs over 20 prompts (two answers each), one tie by its scores and one identical answer pair."""
    rows = []
    for i in range(20):
        for j in range(2):
            rows.append(
                {
                    "prompt": f"Question number {i}: is it fine?",
                    "chosen": "Yes, yes, certainly yes." if j else "Yes.",
                    "rejected": "No." if j else "No, no, never.",
                }
            )
    rows.append(
        {"prompt": "A tie", "chosen": "Maybe.", "rejected": "Perhaps.", "score_chosen": 3, "score_rejected": 3}
    )
    rows.append({"prompt": "The same", "chosen": "Same.", "rejected": "Same."})
    return rows


def conversations(row: dict) -> tuple[list[dict], list[dict]]:
    prompt = [{"role": "user", "content": row["prompt"]}]
    return (
        [*prompt, {"role": "assistant", "content": row["chosen"]}],
        [*prompt, {"role": "assistant", "content": row["rejected"]}],
    )


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in planted_pairs()), encoding="utf-8")
    return str(path)


def save_backbone(folder: Path, tokenizer, pad_token_id: int) -> str:
    torch.manual_seed(0)
    LlamaModel(tiny_llama_config(vocab_size=len(tokenizer), pad_token_id=pad_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


# ChatML with nothing after a turn's `<|im_end|>`: a conversation ends with SmolLM2's pad token, as Llama 3's end with
# `<|eot_id|>`, its pad token.
CHATML_ENDING_WITH_PAD = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module", params=["chatml", "ends_with_pad", pytest.param("llama3", marks=pytest.mark.slow)])
def backbone(request, smollm2_tokenizer_dir, tmp_path_factory) -> str:
    """A tiny random Llama with a real tokenizer: SmolLM2's ChatML (a conversation ends with "\\n"), the same ending
    each turn at its pad token `<|im_end|>`, or Llama 3's (ends with `<|eot_id|>`, its pad token). Where the last
    token is the pad token, the classifier must not pool one token early."""
    folder = tmp_path_factory.mktemp(f"backbone_{request.param}")
    if request.param == "llama3":
        tokenizer = llama3_tokenizer()
        return save_backbone(folder, tokenizer, pad_token_id=tokenizer.pad_token_id)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    if request.param == "ends_with_pad":
        tokenizer.chat_template = CHATML_ENDING_WITH_PAD
    return save_backbone(folder, tokenizer, pad_token_id=2)


@pytest.fixture(scope="module")
def trained(backbone, pairs_file, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bt") / "out"
    return out, bt(backbone=backbone, pairs=[pairs_file], out=str(out), **SETTINGS)


def test_loss_falls_and_held_out_pairs_rank_right(trained):
    out, report = trained
    metrics = report["metrics"]
    assert metrics["steps"] == 3 * math.ceil(metrics["counts"]["trained"] / 4), "3 epochs of 4 pairs per step"
    losses = metrics["losses"]
    assert (
        len(losses) == metrics["steps"] and losses[0] == metrics["first_loss"] and losses[-1] == metrics["final_loss"]
    )
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    assert metrics["first_loss"] == pytest.approx(0.693, abs=0.05), "a fresh head starts at log 2"
    assert metrics["held_out_accuracy"] == 1.0
    assert not (out / "checkpoints").exists(), "trainer checkpoints are removed once the model is saved"
    assert json.loads((out / "bt.json").read_text())["metrics"]["counts"] == metrics["counts"]
    card = (out / "README.md").read_text()
    assert (
        "bradley-terry" in card and "reward-model" in card and Path(report["inputs"]["pairs"][0]["path"]).name in card
    )


def test_ties_identical_and_held_out_pairs_are_excluded_and_counted(trained, pairs_file):
    out, report = trained
    rows = planted_pairs()
    sides = [conversations(row) for row in rows[:40]]
    prompts = torch.tensor([independent_key(chosen[:-1]) for chosen, _ in sides])
    held = held_out(prompts, VAL_FRACTION, 0).tolist()
    assert 0 < sum(held) < 40, "the planted prompts must fall on both sides of the split"
    expected = [independent_key([*chosen, rejected[-1]]) for (chosen, rejected), h in zip(sides, held) if not h]

    keys = load_file(out / "trained_pairs.safetensors")
    assert keys["pair_keys"].tolist() == expected
    assert keys["prompt_keys"].tolist() == [int(k) for k, h in zip(prompts, held) if not h]
    counts = report["metrics"]["counts"]
    assert counts == {"read": 42, "skipped": 2, "trained": len(expected), "held_out": sum(held)}
    skipped = report["metrics"]["skipped"]
    assert [s["index"] for s in skipped] == [40, 41]
    assert "tie" in skipped[0]["reason"] and "same answer" in skipped[1]["reason"]


@torch.no_grad()
def test_checkpoint_scores_are_the_head_on_extracted_features(trained, pairs_file, tmp_path):
    out, _ = trained
    classifier = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)

    def logit(messages):
        ids = tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
        assert ids[-1] != classifier.config.pad_token_id, "the classifier would pool one token early"
        return classifier(input_ids=torch.tensor([ids])).logits[0, 0]

    assert classifier.config.pad_token_id == tokenizer.pad_token_id, "saved with the pad token it was trained with"
    extract(backbone=str(out), data=pairs_file, kind="pairs", out=str(tmp_path), batch_size=3)
    tensors, meta = load_features(tmp_path)
    assert meta["counts"]["rows"] == 40
    w = classifier.score.weight[0]  # (d,)
    expected = torch.stack([torch.stack([logit(side) for side in conversations(row)]) for row in planted_pairs()[:40]])
    torch.testing.assert_close(tensors["embeddings"] @ w, expected, rtol=0, atol=ATOL)
    assert (expected[:, 0] > expected[:, 1]).all(), "a trained BT model ranks the separable pairs right"


@torch.no_grad()
def test_held_out_scores_are_the_classifiers_logits(trained):
    """`bt_scores` (the held-out accuracy's scores: batched, packed on a CPU) equals the saved classifier's logit of
    each conversation run alone."""
    out, _ = trained
    classifier = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    sides = [side for row in planted_pairs()[:12] for side in conversations(row)]
    ids = [tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"] for messages in sides]
    encoded = [EncodedConversation(row, 0, 1) for row in ids]  # h is read at the last token; no gating here
    scores = bt_module.bt_scores(classifier, encoded, batch_size=5, pad_id=tokenizer.pad_token_id)
    expected = torch.stack([classifier(input_ids=torch.tensor([row])).logits[0, 0] for row in ids])
    torch.testing.assert_close(scores, expected, rtol=0, atol=ATOL)


def test_a_finished_folder_is_reused_and_other_settings_are_refused(
    trained, backbone, pairs_file, monkeypatch, tmp_path
):
    out, report = trained
    monkeypatch.setattr(bt_module, "_trainer", lambda *args: pytest.fail("a finished run must not train again"))
    assert bt(backbone=backbone, pairs=[pairs_file], out=str(out), **SETTINGS) == json.loads(
        (out / "bt.json").read_text()
    )
    with pytest.raises(ValueError, match="lr: 0.01 there, 0.001 now.*--overwrite"):
        bt(backbone=backbone, pairs=[pairs_file], out=str(out), **{**SETTINGS, "lr": 1e-3})
    (tmp_path / "notes.txt").write_text("not a bt run")
    for overwrite in (False, True):  # `--overwrite` empties only a folder that holds an `armorm bt` run
        with pytest.raises(FileExistsError, match="holds no `armorm bt` run"):
            bt(backbone=backbone, pairs=[pairs_file], out=str(tmp_path), overwrite=overwrite, **SETTINGS)
    assert (tmp_path / "notes.txt").is_file()


class Interrupt(Exception):
    pass


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupt(f"stopped after step {self.step}")


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_an_interrupted_run_resumes_to_the_same_weights(
    finetune, smollm2_tokenizer_dir, pairs_file, tmp_path, monkeypatch, caplog
):
    backbone = save_backbone(tmp_path / "backbone", AutoTokenizer.from_pretrained(smollm2_tokenizer_dir), 2)
    settings = {**SETTINGS, "epochs": 1, "finetune": finetune, "lr": 1e-3 if finetune == "full" else 3e-3}
    whole = bt(backbone=backbone, pairs=[pairs_file], out=str(tmp_path / "whole"), **settings)

    build = bt_module._trainer
    with monkeypatch.context() as patch:
        patch.setattr(bt_module, "_trainer", lambda *args: _with_callback(build(*args), StopAt(6)))
        with pytest.raises(Interrupt):
            bt(backbone=backbone, pairs=[pairs_file], out=str(tmp_path / "resumed"), **settings)
    assert (tmp_path / "resumed" / "checkpoints" / "checkpoint-4").is_dir()
    with caplog.at_level(logging.INFO, logger="conversion.bt"):
        resumed = bt(backbone=backbone, pairs=[pairs_file], out=str(tmp_path / "resumed"), **settings)
    assert "resuming from" in caplog.text and "checkpoint-4" in caplog.text

    assert resumed["metrics"]["steps"] == whole["metrics"]["steps"] > 6
    assert (resumed["metrics"]["resumed_from_step"], whole["metrics"]["resumed_from_step"]) == (4, 0)
    first = load_file(tmp_path / "whole" / "model.safetensors")
    second = load_file(tmp_path / "resumed" / "model.safetensors")
    assert first.keys() == second.keys()
    initial = load_file(tmp_path / "backbone" / "model.safetensors")
    assert first.keys() == {f"model.{k}" for k in initial} | {"score.weight"}
    assert all(not torch.equal(first[f"model.{k}"], initial[k]) for k in initial if "proj" in k), "the body trained"
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=1e-5, atol=1e-6, msg=name)


def _with_callback(trainer, callback):
    trainer.add_callback(callback)
    return trainer
