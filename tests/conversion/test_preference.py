"""The `preference` objective: a Bradley-Terry row of W learned from pairs, cross-fitted by prompt.

The head minimises Σ_i softplus(−w · x_i) + α/2 ‖w‖² over the differences x_i = h_chosen − h_rejected. The tests solve
it independently by Newton's method (the gradient −Σ σ(−w·x) x + α w, the Hessian Σ σ(1 − σ) x xᵀ + α I), and check
the cross-fitting rule: a pair that fold f's head w_f was fitted on is never scored by w_f.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy import stats

from armorm_io.artifacts import load_preference_folds, load_regression, load_transform, save_regression
from armorm_io.features import write_features
from conversion import decorrelate, fit, gate
from conversion.preference import prompt_folds
from modeling_armorm.explanation import explanation_from_heads, learned_from


pytestmark = pytest.mark.usefixtures("one_thread")

D = 6
ALPHAS = [0.1, 10.0, 1000.0]


def newton_bradley_terry(x: np.ndarray, alpha: float, steps: int = 50) -> np.ndarray:
    """argmin_w Σ_i softplus(−w · x_i) + α/2 ‖w‖², by Newton's method (strictly convex: it converges)."""
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(x @ w))  # σ(−w · x)
        gradient = -(p[:, None] * x).sum(0) + alpha * w
        hessian = (x * (p * (1 - p))[:, None]).T @ x + alpha * np.eye(len(w))
        w -= np.linalg.solve(hessian, gradient)
    return w


def planted_pairs(n_prompts: int = 100, per_prompt: int = 4, seed: int = 0, duplicate: bool = True) -> dict:
    """Pairs whose chosen side is drawn by a Bradley-Terry model on a planted w, `per_prompt` pairs per prompt; with
    `duplicate`, the first pair appears twice (the same pair in two datasets)."""
    rng = np.random.default_rng(seed)
    n = n_prompts * per_prompt
    w_true = rng.normal(size=D)
    h = rng.normal(size=(n, 2, D))
    swap = rng.random(n) > 1 / (1 + np.exp(-(h[:, 0] - h[:, 1]) @ w_true))  # P(first ≻ second) = σ(w · Δh)
    h[swap] = h[swap][:, ::-1]
    prompt_keys = np.repeat(rng.integers(-(2**62), 2**62, size=n_prompts), per_prompt)
    pair_keys = rng.integers(-(2**62), 2**62, size=n)
    if duplicate:
        h, prompt_keys, pair_keys = (np.concatenate([a, a[:1]]) for a in (h, prompt_keys, pair_keys))
    return {
        "embeddings": torch.from_numpy(h).float(),
        "prompt_embeddings": torch.from_numpy(rng.normal(size=(len(h), D))).float(),
        "prompt_keys": torch.from_numpy(prompt_keys),
        "pair_keys": torch.from_numpy(pair_keys),
        "answer_lengths": torch.from_numpy(rng.integers(1, 200, size=(len(h), 2))),
    }


def write_ratings(folder, n: int = 300, seed: int = 1, verbosity_direction: np.ndarray | None = None) -> None:
    """Two rated objectives on random features; `demo-verbosity` follows `verbosity_direction` when given."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D))
    direction = rng.normal(size=D) if verbosity_direction is None else verbosity_direction
    labels = np.stack([x @ rng.normal(size=D), x @ direction], 1) + 0.1 * rng.normal(size=(n, 2))
    tensors = {"embeddings": torch.from_numpy(x).float(), "labels": torch.from_numpy(labels).float()}
    write_features(folder, "ratings", tensors, objectives=["demo-quality", "demo-verbosity"])


def fit_with_preference(tmp_path, pairs: dict, **settings) -> dict:
    write_ratings(tmp_path / "ratings")
    write_features(tmp_path / "pairs", "pairs", pairs)
    out = tmp_path / "regression.safetensors"
    fit.main(
        features=[str(tmp_path / "ratings")], preference_pairs=[str(tmp_path / "pairs")], out=str(out),
        preference=True, preference_alphas=ALPHAS, **settings,
    )  # fmt: skip
    return {"regression": str(out), "pairs": str(tmp_path / "pairs"), "report": tmp_path / "fit.json"}


def test_the_preference_row_is_the_bradley_terry_fit_and_each_fold_head_leaves_its_fold_out(tmp_path):
    pairs = planted_pairs()
    paths = fit_with_preference(tmp_path, pairs, preference_folds=4)
    weight, alpha, objectives = load_regression(paths["regression"])
    assert objectives == ["demo-quality", "demo-verbosity", "preference"]
    fold_weights, pair_keys, folds = load_preference_folds(paths["regression"])
    x = (pairs["embeddings"][:, 0] - pairs["embeddings"][:, 1]).double().numpy()
    assert torch.equal(pair_keys, pairs["pair_keys"]) and folds.shape == (len(x),)

    # A prompt's pairs (and so a pair that appears twice) are in one fold, and every fold holds pairs.
    for key in pairs["prompt_keys"].unique():
        assert folds[pairs["prompt_keys"] == key].unique().numel() == 1
    assert folds[0] == folds[-1] and sorted(folds.unique().tolist()) == [0, 1, 2, 3]
    assert torch.equal(folds, prompt_folds(pairs["prompt_keys"], 4, 0))

    # α: the lowest held-out log-loss over the folds, each fold scored by the head fitted on the others.
    folds = folds.numpy()
    held_out_loss = []
    for a in ALPHAS:
        heads = [newton_bradley_terry(x[folds != f], a) for f in range(4)]
        held_out_loss.append(sum(np.logaddexp(0, -x[folds == f] @ heads[f]).sum() for f in range(4)))
    best = ALPHAS[int(np.argmin(held_out_loss))]
    assert float(alpha[2]) == best
    for f in range(4):
        # Fold f's head never saw a pair of fold f: it equals the fit on the other folds alone.
        np.testing.assert_allclose(fold_weights[f].numpy(), newton_bradley_terry(x[folds != f], best), atol=2e-4)
    np.testing.assert_allclose(weight[2].numpy(), newton_bradley_terry(x, best), atol=2e-4)

    # Judged by its pairs and its out-of-fold accuracy (no ratings, no Pearson), in fit.json and the file's metadata.
    report = json.loads(paths["report"].read_text())["metrics"]["objectives"]["preference"]
    oof = np.einsum("md,md->m", x, fold_weights.double().numpy()[folds])
    assert report["rows"] == report["pairs"] == len(x) and report["pearson"] is None
    assert report["pairwise_accuracy"] == pytest.approx((oof > 0).mean()) and report["pairwise_accuracy"] > 0.7


def test_the_gate_scores_every_fitted_pair_with_the_head_of_its_own_fold(tmp_path, monkeypatch):
    """The cross-fitting rule on planted data: in the gate's rewards, a fitted pair's `preference` reward is
    w_f · h with f its fold (whose head was not fitted on it); a pair the head was not fitted on gets the final w."""
    pairs = planted_pairs()
    paths = fit_with_preference(tmp_path, pairs, preference_folds=3)
    weight, _, objectives = load_regression(paths["regression"])
    fold_weights, _, folds = load_preference_folds(paths["regression"])
    # Other pairs, never fitted: the final head scores them.
    others = planted_pairs(n_prompts=20, seed=7, duplicate=False)
    write_features(tmp_path / "others", "pairs", others)
    decorrelate.main(regression=paths["regression"], verbosity="none", out=str(tmp_path / "transform.safetensors"))

    captured = []
    train_gating = gate.train_gating

    def spy(prompt_embeddings, rewards, *args, **kwargs):
        captured.append(rewards)
        return train_gating(prompt_embeddings, rewards, *args, **kwargs)

    monkeypatch.setattr(gate, "train_gating", spy)
    report = gate.main(
        features=[paths["pairs"], str(tmp_path / "others")], regression=paths["regression"],
        transform=str(tmp_path / "transform.safetensors"), out=str(tmp_path / "gating.safetensors"), steps=20,
        batch_size=64, gating_hidden_dim=8, eval_every=10, device="cpu",
    )  # fmt: skip
    column = objectives.index("preference")
    got = captured[0][..., column].double()  # (N, 2), T = I
    n = len(pairs["embeddings"])
    h = pairs["embeddings"].double()
    for i in range(n):
        f = int(folds[i])
        expected = h[i] @ fold_weights[f].double()  # (2,): w_f · h of both answers
        torch.testing.assert_close(got[i], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[n:], others["embeddings"].double() @ weight[column].double(), rtol=1e-5, atol=1e-5)
    # The other objectives are W h as ever.
    torch.testing.assert_close(captured[0][:n, :, 0].double(), h @ weight[0].double(), rtol=1e-5, atol=1e-5)
    # Judged by its out-of-fold pairwise accuracy, it is gated, not left out for lacking a correlation with ratings.
    assert "preference" in report["metrics"]["gated_objectives"]


def test_the_preference_objective_is_decorrelated_from_verbosity_on_its_out_of_fold_rewards(tmp_path):
    pairs = planted_pairs()
    # Verbosity along the first feature, which the planted w also reads: r_pref correlates with r_v before T.
    direction = np.zeros(D)
    direction[0] = 3.0
    pairs["embeddings"][..., 0] += 2.0 * (pairs["embeddings"] @ torch.ones(D)).sign()
    write_ratings(tmp_path / "ratings", verbosity_direction=direction)
    write_features(tmp_path / "pairs", "pairs", pairs)
    regression = str(tmp_path / "regression.safetensors")
    fit.main(
        features=[str(tmp_path / "ratings")], preference_pairs=[str(tmp_path / "pairs")], out=regression,
        preference=True, preference_alphas=ALPHAS, preference_folds=3,
    )  # fmt: skip
    report = decorrelate.main(
        regression=regression, reference=[str(tmp_path / "pairs")], verbosity="demo-verbosity",
        out=str(tmp_path / "transform.safetensors"),
    )  # fmt: skip
    matrix, penalties, _ = load_transform(tmp_path / "transform.safetensors")
    weight, _, objectives = load_regression(regression)
    fold_weights, _, folds = load_preference_folds(regression)
    p, v = objectives.index("preference"), objectives.index("demo-verbosity")
    h = pairs["embeddings"].double()
    r_pref = torch.einsum("npd,nd->np", h, fold_weights.double()[folds]).flatten().numpy()  # out of fold
    r_v = (h @ weight[v].double()).flatten().numpy()
    assert stats.spearmanr(r_pref, r_v).statistic > 0.1  # there is something to remove
    assert penalties[p] > 0 and matrix[v, p] == -penalties[p]
    after = stats.spearmanr(r_pref - float(penalties[p]) * r_v, r_v).statistic
    assert after <= 0.03 + 1e-6
    assert report["metrics"]["spearman_after"]["preference"] == pytest.approx(after, abs=1e-6)


def test_fit_refuses_preference_without_pairs_and_pairs_without_keys(tmp_path):
    write_ratings(tmp_path / "ratings")
    with pytest.raises(ValueError, match="--preference-pairs"):
        fit.FitConfig(features=[str(tmp_path / "ratings")], out=str(tmp_path / "r.safetensors"), preference=True)
    pairs = planted_pairs()
    del pairs["prompt_keys"], pairs["pair_keys"]
    write_features(tmp_path / "pairs", "pairs", pairs)
    with pytest.raises(ValueError, match="extract them again"):
        fit.main(
            features=[str(tmp_path / "ratings")], preference_pairs=[str(tmp_path / "pairs")], preference=True,
            out=str(tmp_path / "r.safetensors"),
        )  # fmt: skip


def write_bt_backbone(folder, trained_pair_keys: torch.Tensor, score: torch.Tensor) -> None:
    """The files of `armorm bt` that the `backbone` head reads: the score head and the trained pairs' keys."""
    folder.mkdir()
    save_file({"score.weight": score[None], "model.norm.weight": torch.ones(D)}, folder / "model.safetensors")
    save_file(
        {"pair_keys": trained_pair_keys, "prompt_keys": trained_pair_keys.clone()},
        folder / "trained_pairs.safetensors",
    )


def test_the_backbone_head_is_used_only_when_it_never_trained_on_the_gates_pairs(tmp_path):
    pairs = planted_pairs(duplicate=False)
    score = torch.randn(D)
    write_ratings(tmp_path / "ratings")
    settings = dict(features=[str(tmp_path / "ratings")], preference=True, preference_alphas=ALPHAS)

    # A backbone trained on other pairs: its score head is the row, nothing is cross-fitted.
    write_bt_backbone(tmp_path / "bt-other", torch.tensor([1, 2, 3]), score)
    write_features(tmp_path / "pairs-other", "pairs", pairs, backbone=str(tmp_path / "bt-other"))
    out = str(tmp_path / "other.safetensors")
    fit.main(**settings, preference_pairs=[str(tmp_path / "pairs-other")], out=out, preference_head="backbone")
    torch.testing.assert_close(load_regression(out)[0][2], score, rtol=0, atol=0)
    assert load_preference_folds(out) is None

    # A backbone trained on one of the gate's pairs: `backbone` is refused with the fix, `auto` fits a head.
    write_bt_backbone(tmp_path / "bt-seen", pairs["pair_keys"][5:6], score)
    write_features(tmp_path / "pairs-seen", "pairs", pairs, backbone=str(tmp_path / "bt-seen"))
    seen = dict(settings, preference_pairs=[str(tmp_path / "pairs-seen")], out=str(tmp_path / "seen.safetensors"))
    with pytest.raises(ValueError, match="refused: 1 of the 400 pairs.*--preference-head fit"):
        fit.main(**seen, preference_head="backbone")
    fit.main(**seen, preference_head="auto")
    assert load_preference_folds(seen["out"]) is not None
    assert not torch.equal(load_regression(seen["out"])[0][2], score)


def test_explanations_say_the_preference_objective_is_learned_from_pairs():
    assert learned_from("preference").startswith("preference pairs") and learned_from("demo-quality") == "ratings"
    explanation = explanation_from_heads(["demo-quality", "preference"], 0.5, [1.0, 2.0], [0.1, 0.2], [0.5, 0.5])
    by_name = {o.name: o for o in explanation.objectives}
    assert by_name["preference"].learned_from == learned_from("preference")
    assert by_name["demo-quality"].learned_from == "ratings"


def test_a_regression_file_keeps_its_fold_heads(tmp_path):
    path = tmp_path / "r.safetensors"
    folds = (torch.randn(3, D), torch.tensor([5, 6, 7]), torch.tensor([0, 2, 1]))
    save_regression(path, torch.randn(2, D), torch.ones(2), ["a", "preference"], preference_folds=folds)
    for got, expected in zip(load_preference_folds(path), folds):
        torch.testing.assert_close(got, expected.to(got.dtype), rtol=0, atol=0)
    assert set(load_file(path)) == {
        "weight",
        "alpha",
        *("preference_" + s for s in ("fold_weights", "pair_keys", "folds")),
    }


def test_a_build_with_fit_preference_gives_the_model_a_preference_reward_of_w_dot_h(tmp_path, smollm2_tokenizer):
    """`armorm build --fit-preference` on a tiny backbone: the checkpoint's `preference` reward is w · h with w the
    regression file's row, its explanation and card say it is learned from pairs."""
    from transformers import AutoModel, AutoModelForSequenceClassification, pipeline

    from armorm_cli.cli import main as cli
    from tests.utils import tiny_llama_config

    torch.manual_seed(0)
    backbone = AutoModel.from_config(tiny_llama_config(vocab_size=len(smollm2_tokenizer), pad_token_id=2))
    backbone.save_pretrained(tmp_path / "backbone")
    smollm2_tokenizer.save_pretrained(tmp_path / "backbone")
    examples = Path(__file__).resolve().parents[2] / "examples" / "data"
    cli([
        "build", "--backbone", str(tmp_path / "backbone"), "--ratings", str(examples / "ratings.jsonl"),
        "--pairs", str(examples / "pairs.jsonl"), "--extract-split", "train[:60]", "--out", str(tmp_path / "ckpt"),
        "--work", str(tmp_path / "work"), "--gate-steps", "10", "--gate-batch-size", "16",
        "--gate-gating-hidden-dim", "8", "--gate-eval-every", "5", "--extract-device", "cpu", "--gate-device", "cpu",
        "--fit-preference", "--fit-preference-folds", "2",
    ])  # fmt: skip
    weight, _, objectives = load_regression(tmp_path / "work" / "regression.safetensors")
    assert objectives[-1] == "preference" and load_preference_folds(tmp_path / "work" / "regression.safetensors")
    fit_report = json.loads((tmp_path / "work" / "fit.json").read_text())
    assert fit_report["inputs"]["preference_pairs"][0]["path"].endswith("pairs-0")

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt").eval()
    p = model.config.objective_names.index("preference")
    conversation = [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."}]
    ids = smollm2_tokenizer.apply_chat_template(conversation, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
    torch.testing.assert_close(out.rewards[:, p], out.hidden_state @ weight[objectives.index("preference")])

    explanation = pipeline("reward-scoring", model=str(tmp_path / "ckpt"), device="cpu").explain(conversation)
    assert {o.name: o.learned_from for o in explanation.objectives}["preference"] == learned_from("preference")
    card = (tmp_path / "ckpt" / "README.md").read_text()
    assert "`preference`: Bradley-Terry score learned from preference pairs, not from ratings" in card
