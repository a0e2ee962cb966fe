"""Quality on thin, unbalanced data: objectives the data cannot support are named and kept out of the math, length can
stand in for verbosity, β starts where the Bradley-Terry loss is informative, and the gate keeps its best step.

The data is planted so every expected value is known: features h = [signal coordinates, noise], W reads the signal.
"""

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from armorm_io.artifacts import load_gating, load_transform, save_regression
from armorm_io.data import load_pairs
from armorm_io.features import write_features
from conversion import decorrelate, fit, gate
from conversion.gate import GateSettings, initial_beta, train_gating
from modeling_armorm.heads import LENGTH_OBJECTIVE, chunked_transformed_rewards


pytestmark = pytest.mark.usefixtures("one_thread")


D = 12
FAST = dict(steps=150, batch_size=128, lr=3e-3, gating_hidden_dim=16, gating_n_hidden=1, eval_every=25, device="cpu")


def thin_ratings(tmp_path, labelled_verbosity: int):
    """Ratings features: `quality` rated on 300 rows (h[:, 0] + noise), `verbosity` on `labelled_verbosity` rows."""
    rng = np.random.default_rng(0)
    h = rng.normal(size=(300, D)).astype(np.float32)
    labels = np.full((300, 2), np.nan, dtype=np.float32)
    labels[:, 0] = h[:, 0] + 0.1 * rng.normal(size=300)
    labels[:labelled_verbosity, 1] = h[:labelled_verbosity, 1]
    write_features(tmp_path / "ratings", "ratings", {"embeddings": torch.from_numpy(h), "labels": torch.from_numpy(labels)},
                   objectives=["quality", "verbosity"])  # fmt: skip
    fit.main(features=str(tmp_path / "ratings"), out=str(tmp_path / "regression.safetensors"))
    pairs = torch.from_numpy(rng.normal(size=(100, 2, D)).astype(np.float32))
    write_features(tmp_path / "pairs", "pairs", {"embeddings": pairs, "prompt_embeddings": torch.randn(100, D),
                                                 "answer_lengths": torch.randint(5, 500, (100, 2))})  # fmt: skip
    return dict(regression=str(tmp_path / "regression.safetensors"), reference=str(tmp_path / "pairs"))


def test_a_verbosity_objective_fitted_on_few_rows_is_refused_and_the_override_is_explicit(tmp_path):
    paths = thin_ratings(tmp_path, labelled_verbosity=7)
    metrics = json.loads((tmp_path / "fit.json").read_text())["metrics"]["objectives"]
    assert metrics["verbosity"]["rows"] == 7 and metrics["quality"]["rows"] == 300  # `fit` reports both
    assert metrics["quality"]["spearman"] > 0.9
    with pytest.raises(
        ValueError, match=r"`verbosity` is fitted on 7 rated rows \(fewer than 50\).*--verbosity length"
    ):
        decorrelate.main(**paths, verbosity="verbosity", out=str(tmp_path / "t.safetensors"))

    # The explicit override decorrelates from it anyway.
    report = decorrelate.main(
        **paths, verbosity="verbosity", min_objective_rows=0, min_objective_z=-1,
        out=str(tmp_path / "override.safetensors"),
    )  # fmt: skip
    assert report["metrics"]["verbosity"] == "verbosity"

    # `auto` does not trust it either: it says why and decorrelates from the answer's length instead.
    report = decorrelate.main(**paths, out=str(tmp_path / "auto.safetensors"))
    assert report["metrics"]["verbosity"] == LENGTH_OBJECTIVE
    assert "fitted on 7 rated rows" in report["metrics"]["verbosity_reason"]
    _, _, metadata = load_transform(tmp_path / "auto.safetensors")
    assert metadata["objectives"] == ["quality", "verbosity", LENGTH_OBJECTIVE]

    # T = I from the stage command itself, with the reason in the report.
    report = decorrelate.main(**paths, verbosity="none", out=str(tmp_path / "identity.safetensors"))
    matrix, _, metadata = load_transform(tmp_path / "identity.safetensors")
    assert torch.equal(matrix, torch.eye(2)) and "verbosity" not in metadata
    assert "T = I" in report["metrics"]["verbosity_reason"]


def test_gate_leaves_out_objectives_the_data_cannot_support(tmp_path, caplog):
    paths = thin_ratings(tmp_path, labelled_verbosity=7)
    decorrelate.main(**paths, verbosity="none", out=str(tmp_path / "transform.safetensors"))
    config = dict(
        features=paths["reference"], regression=paths["regression"], transform=str(tmp_path / "transform.safetensors")
    )
    report = gate.main(**config, out=str(tmp_path / "gating.safetensors"), **FAST)["metrics"]
    assert report["gated_objectives"] == ["quality"]
    assert "fitted on 7 rated rows" in report["left_out"]["verbosity"]
    assert any("`verbosity` is left out of the gate" in w for w in report["warnings"])
    assert "`verbosity` is left out of the gate" in caplog.text
    assert report["mean_gating_share"]["verbosity"] == 0.0
    # Lowering the floor explicitly gates over both.
    report = gate.main(
        **config, out=str(tmp_path / "all.safetensors"), **FAST, min_objective_rows=0, min_objective_z=-1
    )
    assert report["metrics"]["gated_objectives"] == ["quality", "verbosity"]


def length_biased_pairs(n: int, seed: int):
    """Pairs whose chosen answer has the higher quality q; half of the time it is also much shorter.

    h = [q, log(1 + n_tokens), q2, noise]; W: objective-0 = q + 0.8 log(1+n), objective-1 = q2 + 0.5 log(1+n), where
    q2 is noise: both objectives carry a length component, so with T = I the longer answer is favoured."""
    rng = np.random.default_rng(seed)
    quality = np.sort(rng.normal(size=(n, 2)), axis=1)[:, ::-1] + np.array([0.3, 0.0])  # chosen (0) better
    tokens = rng.integers(20, 60, size=(n, 2))
    shorter = rng.random(n) < 0.5
    tokens[shorter, 1] = tokens[shorter, 0] * 8  # the chosen answer is the much shorter one
    tokens[~shorter, 0] = tokens[~shorter, 1] * 8
    h = rng.normal(size=(n, 2, D)) * 0.1
    h[..., 0], h[..., 1], h[..., 2] = quality, np.log1p(tokens), rng.normal(size=(n, 2))
    return torch.tensor(h, dtype=torch.float32), torch.tensor(tokens), torch.from_numpy(shorter)


def test_decorrelating_from_the_answer_length_removes_a_planted_length_bias(tmp_path):
    weight = torch.zeros(2, D)
    weight[0, 0], weight[0, 1] = 1.0, 0.8
    weight[1, 2], weight[1, 1] = 1.0, 0.5
    save_regression(tmp_path / "regression.safetensors", weight, torch.ones(2), ["objective-0", "objective-1"])
    embeddings, tokens, _ = length_biased_pairs(800, seed=0)
    write_features(tmp_path / "pairs", "pairs", {"embeddings": embeddings, "prompt_embeddings": torch.randn(800, D), "answer_lengths": tokens})  # fmt: skip
    regression = str(tmp_path / "regression.safetensors")
    report = decorrelate.main(regression=regression, reference=str(tmp_path / "pairs"), verbosity="length",
                              out=str(tmp_path / "transform.safetensors"))["metrics"]  # fmt: skip
    matrix, penalties, _ = load_transform(tmp_path / "transform.safetensors")
    # r'_i = r_i − λ_i log(1 + n) has (almost) no rank correlation with the length any more.
    r = embeddings.reshape(-1, D).double() @ weight.double().T
    length = np.log1p(tokens.reshape(-1).double().numpy())
    for i in range(2):
        assert spearmanr(r[:, i].numpy(), length).statistic > 0.4  # planted
        after = r[:, i].numpy() - float(penalties[i]) * length
        assert spearmanr(after, length).statistic <= 0.03
        assert report["spearman_after"][f"objective-{i}"] == pytest.approx(
            spearmanr(after, length).statistic, abs=1e-6
        )
    assert penalties[0] == pytest.approx(0.8, abs=0.1) and penalties[1] == pytest.approx(0.5, abs=0.1)

    # The gate on these pairs: with T the length-adversarial half (chosen much shorter) is right; with T = I it is not.
    held_out, held_out_tokens, shorter = length_biased_pairs(400, seed=1)
    prompts = torch.randn(400, D)
    accuracy = {}
    for name, transform in (("T", matrix), ("I", torch.eye(3))):
        rewards = chunked_transformed_rewards(embeddings, weight, transform, answer_lengths=tokens)
        gated = [0, 1]
        gating, _ = train_gating(torch.randn(800, D), rewards, GateSettings(**FAST), gated)
        scores = torch.einsum("nk,nsk->ns", gating(prompts).detach(),
                              chunked_transformed_rewards(held_out, weight, transform, answer_lengths=held_out_tokens))  # fmt: skip
        right = scores[:, 0] > scores[:, 1]
        accuracy[name] = float(right[shorter].float().mean())
    assert accuracy["T"] >= 0.8 > 0.3 >= accuracy["I"], accuracy


def test_initial_beta_follows_the_scale_of_the_rewards():
    """The same pairs on two reward scales (×1 and ×100): β₀ differs by exactly that factor, the initial margins are
    about 1 on both, and both trainings leave ln 2 at once (the paper's β₀ = 100 on the ×100 rewards would not)."""
    torch.manual_seed(0)
    n = 600
    prompts = torch.randn(n, D)
    rewards = torch.randn(n, 2, 3) * 0.05
    rewards[:, 0, 0] += 0.1  # objective 0 prefers the chosen answer
    results = {}
    for scale in (1.0, 100.0):
        beta = initial_beta(rewards * scale, [0, 1, 2])
        _, metrics = train_gating(prompts, rewards * scale, GateSettings(**FAST, val_fraction=0.2), [0, 1, 2])
        results[scale] = (beta, metrics)
    assert results[1.0][0] == pytest.approx(100 * results[100.0][0], rel=1e-6)
    delta = (rewards[:, 0] - rewards[:, 1]) * results[1.0][0]
    assert float(delta.std(0).pow(2).mean().sqrt()) == pytest.approx(1.0, rel=1e-6)
    # `train_gating` sets β₀ from its training pairs, with the same scale invariance.
    assert results[1.0][1]["beta_init"] == pytest.approx(100 * results[100.0][1]["beta_init"], rel=1e-6)
    for _, metrics in results.values():
        assert metrics["history"][0]["train_loss"] < math.log(2) - 0.01
        assert metrics["final"]["val_accuracy"] > 0.75
    assert abs(results[1.0][1]["final"]["val_accuracy"] - results[100.0][1]["final"]["val_accuracy"]) < 0.05


def test_the_gate_keeps_its_best_validation_step_and_warms_up():
    """Pure noise and a wide gate: the validation loss is lowest early and rises as the gate overfits. The kept
    parameters are those of the best logged step, not the last."""
    torch.manual_seed(0)
    n = 120
    prompts, rewards = torch.randn(n, D), torch.randn(n, 2, 3)
    settings = GateSettings(steps=400, batch_size=32, lr=3e-2, gating_hidden_dim=64, gating_n_hidden=2, eval_every=20,
                            val_fraction=0.4, warmup_ratio=0.1, device="cpu")  # fmt: skip
    gating, metrics = train_gating(prompts, rewards, settings, [0, 1, 2])
    losses = {entry["step"]: entry["val_loss"] for entry in metrics["history"]}
    best = min(losses, key=losses.get)
    assert metrics["best_step"] == best and best < settings.steps
    assert losses[best] < losses[settings.steps]
    assert metrics["final"]["val_loss"] == pytest.approx(losses[best], rel=1e-6)
    # Linear warm-up over the first 40 steps, then the cosine decay.
    lr = {entry["step"]: entry["lr"] for entry in metrics["history"]}
    assert lr[20] == pytest.approx(settings.lr * 20 / 40) and lr[40] == pytest.approx(settings.lr)
    assert lr[400] == pytest.approx(0.0, abs=1e-12)


def test_gate_writes_its_curves(tmp_path):
    paths = thin_ratings(tmp_path, labelled_verbosity=300)
    decorrelate.main(**paths, verbosity="none", out=str(tmp_path / "transform.safetensors"))
    report = gate.main(features=paths["reference"], regression=paths["regression"],
                       transform=str(tmp_path / "transform.safetensors"), out=str(tmp_path / "gating.safetensors"), **FAST)  # fmt: skip
    assert (tmp_path / "gate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state, metadata = load_gating(tmp_path / "gating.safetensors")
    assert metadata["best_step"] == report["metrics"]["best_step"]
    assert report["metrics"]["objectives_with_weight"]


def test_tied_and_identical_pairs_are_skipped_with_a_reason(tmp_path):
    rows = [
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away.", "metadata": {"score_chosen": 8.0, "score_rejected": 3.0}},
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Hey.", "metadata": {"score_chosen": 7.5, "score_rejected": 7.5}},
        {"prompt": "Hi", "chosen": "Same.", "rejected": "Same."},
        {"prompt": "Hi", "chosen": "A", "rejected": "B", "score_chosen": 2, "score_rejected": 2},
    ]  # fmt: skip
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    pairs = load_pairs(path)
    assert pairs.index == [0]
    reasons = {entry["index"]: entry["reason"] for entry in pairs.skipped}
    assert "a tie: score_chosen == score_rejected (7.5)" in reasons[1] and "a tie" in reasons[3]
    assert "the same answer" in reasons[2]
