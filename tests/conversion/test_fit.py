"""Stage 1 (`armorm fit`): per-objective ridge equal to scikit-learn's, α chosen on a seeded held-out split."""

import json
import logging

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.linear_model import Ridge

from armorm_cli import cli
from armorm_io.artifacts import load_regression
from armorm_io.features import write_features
from conversion.fit import (
    ALPHAS,
    FOLDER_STRIDE,
    GramStats,
    HeldOutRidge,
    fit_regression,
    label_groups,
    main,
    validation_mask,
)


OBJECTIVES = ["helpfulness", "correctness", "verbosity", "is_safe", "score"]


def make_ratings(n=240, d=20, seed=0):
    """Features with a decaying spectrum, so the penalty matters and the best α sits inside the grid.

    Three datasets label different objectives (the ArmoRM layout): rows 0-89 carry objectives 0-2, rows 90-179
    objective 3, rows 180-239 objectives 0, 3 and 4; objective 1 also misses a few scattered labels (a fourth mask).
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * np.logspace(0, -2, d)
    y = x @ rng.normal(size=(d, len(OBJECTIVES))) * 3 + rng.normal(size=(n, len(OBJECTIVES)))
    present = np.zeros_like(y, dtype=bool)
    present[:90, :3] = True
    present[90:180, 3] = True
    present[180:, [0, 3, 4]] = True
    present[rng.choice(90, 10, replace=False), 1] = False
    y[~present] = np.nan
    # Exactly what the file holds (float32), as float64, for the scikit-learn reference.
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)


def sklearn_reference(x, y, held_out, alphas):
    """Independent reference: for each objective, scikit-learn Ridge per α on its labelled training rows, the α of
    least validation MSE, then a refit on all its labelled rows. Returns α, weights and validation metrics."""
    x, y = x.double().numpy(), y.double().numpy()
    chosen, weights, metrics = [], [], []
    for j in range(y.shape[1]):
        labelled = ~np.isnan(y[:, j])
        train, val = labelled & ~held_out, labelled & held_out
        models = [Ridge(alpha=a, fit_intercept=False).fit(x[train], y[train, j]) for a in alphas]
        mse = [np.mean((m.predict(x[val]) - y[val, j]) ** 2) for m in models]
        best = int(np.argmin(mse))
        prediction = models[best].predict(x[val])
        chosen.append(alphas[best])
        weights.append(Ridge(alpha=alphas[best], fit_intercept=False).fit(x[labelled], y[labelled, j]).coef_)
        metrics.append(
            {
                "rows": int(labelled.sum()),
                "val_mse": mse[best],
                "mse_path": mse,
                "pearson": stats.pearsonr(prediction, y[val, j]).statistic,
                "spearman": stats.spearmanr(prediction, y[val, j]).statistic,
            }
        )
    return np.array(chosen), np.stack(weights), metrics


def test_fit_equals_scikit_learn_ridge_with_several_masks(tmp_path):
    x, y = make_ratings()
    write_features(
        tmp_path / "features", "ratings", {"embeddings": x, "labels": y}, objectives=OBJECTIVES, shard_rows=50
    )
    fit = fit_regression(tmp_path / "features", alphas=list(ALPHAS), val_fraction=0.2, seed=0)

    held_out = validation_mask(torch.arange(len(x)), 0.2, 0).numpy()
    alphas, weights, metrics = sklearn_reference(x, y, held_out, list(ALPHAS))
    assert fit.objectives == OBJECTIVES
    assert fit.alpha.tolist() == alphas.tolist()
    assert len(set(alphas.tolist())) > 1, "the data should make different objectives choose different alphas"
    np.testing.assert_allclose(fit.weight.numpy(), weights, rtol=1e-5, atol=1e-6)
    for name, reference in zip(OBJECTIVES, metrics):
        ours = fit.metrics[name]
        assert ours["rows"] == reference["rows"] and ours["train_rows"] + ours["val_rows"] == reference["rows"]
        np.testing.assert_allclose(ours["val_mse"], reference["val_mse"], rtol=1e-9)
        np.testing.assert_allclose(list(ours["val_mse_by_alpha"].values()), reference["mse_path"], rtol=1e-8)
        np.testing.assert_allclose(ours["pearson"], reference["pearson"], rtol=1e-9)
        np.testing.assert_allclose(ours["spearman"], reference["spearman"], rtol=1e-9)


def test_label_groups_gather_objectives_with_identical_masks():
    _, y = make_ratings()
    assert label_groups(~y.isnan()) == [[0], [1], [2], [3], [4]]
    present = torch.tensor([[1, 1, 0, 1], [0, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert label_groups(present) == [[0, 1, 3], [2]]


def test_split_is_per_row_so_sharding_and_row_order_do_not_change_the_fit(tmp_path):
    x, y = make_ratings(seed=1)
    write_features(tmp_path / "a", "ratings", {"embeddings": x, "labels": y}, objectives=OBJECTIVES, shard_rows=1000)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    shuffled = {"embeddings": x[order], "labels": y[order], "index": order}
    write_features(tmp_path / "b", "ratings", shuffled, objectives=OBJECTIVES, shard_rows=37)
    one = fit_regression(tmp_path / "a", alphas=list(ALPHAS), val_fraction=0.2, seed=5)
    other = fit_regression(tmp_path / "b", alphas=list(ALPHAS), val_fraction=0.2, seed=5)
    assert one.alpha.tolist() == other.alpha.tolist()
    torch.testing.assert_close(one.weight, other.weight, rtol=1e-5, atol=1e-6)
    assert one.metrics["score"]["val_rows"] == other.metrics["score"]["val_rows"]


def test_validation_mask_is_seeded_and_near_the_fraction():
    index = torch.arange(20_000)
    mask = validation_mask(index, 0.2, seed=0)
    assert abs(mask.float().mean().item() - 0.2) < 0.01
    assert torch.equal(mask, validation_mask(index, 0.2, seed=0))
    assert not torch.equal(mask, validation_mask(index, 0.2, seed=1))
    assert torch.equal(mask[1000:2000], validation_mask(index[1000:2000], 0.2, seed=0)), "a row's fate is its own"
    assert not validation_mask(index, 0.0, seed=0).any()


def test_held_out_ridge_from_gram_statistics_matches_closed_form():
    """w = (XᵀX + αI)⁻¹ Xᵀy on train + validation rows at the α of least validation MSE."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 6)), rng.normal(size=(40, 2))
    train, val = GramStats.zeros(6, 2), GramStats.zeros(6, 2)
    train.update(x[:30], y[:30])
    val.update(x[30:], y[30:])
    ridge = HeldOutRidge([0.1, 10.0, 1000.0]).fit(train, val)
    for j in range(2):
        a = ridge.alpha_[j]
        np.testing.assert_allclose(ridge.coef_[j], np.linalg.solve(x.T @ x + a * np.eye(6), x.T @ y[:, j]))
        w_train = np.linalg.solve(x[:30].T @ x[:30] + a * np.eye(6), x[:30].T @ y[:30, j])
        np.testing.assert_allclose(ridge.val_mse_[j], np.mean((x[30:] @ w_train - y[30:, j]) ** 2))
    with pytest.raises(ValueError, match="positive"):
        HeldOutRidge([0.0, 1.0]).fit(train, val)


def test_cli_writes_regression_and_metrics(tmp_path, caplog):
    x, y = make_ratings(seed=2)
    write_features(
        tmp_path / "features", "ratings", {"embeddings": x, "labels": y}, objectives=OBJECTIVES, backbone="tiny"
    )
    out = tmp_path / "heads" / "regression.safetensors"
    alphas = [0.01, 1.0, 100.0]
    argv = ["fit", "--features", str(tmp_path / "features"), "--out", str(out), "--alphas", *map(str, alphas)]
    with caplog.at_level(logging.INFO, logger="conversion.fit"):
        cli.main([*argv, "--val-fraction", "0.3", "--seed", "4"])

    weight, alpha, objectives = load_regression(out)
    assert objectives == OBJECTIVES and weight.shape == (5, 20)
    held_out = validation_mask(torch.arange(len(x)), 0.3, 4).numpy()
    reference_alpha, reference_weight, _ = sklearn_reference(x, y, held_out, alphas)
    assert alpha.tolist() == reference_alpha.tolist()
    np.testing.assert_allclose(weight.numpy(), reference_weight, rtol=1e-5, atol=1e-6)
    report = json.loads((tmp_path / "heads" / "fit.json").read_text())
    settings = report["settings"]
    assert settings["val_fraction"] == 0.3 and settings["seed"] == 4 and settings["alphas"] == alphas
    assert list(report["metrics"]["objectives"]) == OBJECTIVES
    printed = caplog.text
    assert all(name in printed for name in OBJECTIVES) and "Spearman" in printed


def test_defaults_are_the_papers_grid_and_split(tmp_path):
    x, y = make_ratings(seed=3)
    write_features(tmp_path, "ratings", {"embeddings": x, "labels": y}, objectives=OBJECTIVES)
    report = main(features=str(tmp_path), out=str(tmp_path / "r.safetensors"))
    settings = report["settings"]
    assert settings["alphas"] == [10.0**e for e in range(-4, 5)] and settings["val_fraction"] == 0.2


def test_errors_name_the_problem(tmp_path):
    x, y = make_ratings()
    write_features(
        tmp_path / "pairs", "pairs", {"embeddings": torch.randn(4, 2, 3), "prompt_embeddings": torch.randn(4, 3)}
    )
    with pytest.raises(ValueError, match="needs ratings"):
        fit_regression(tmp_path / "pairs", alphas=[1.0], val_fraction=0.2, seed=0)
    y[:, 2] = float("nan")
    write_features(tmp_path / "empty", "ratings", {"embeddings": x, "labels": y}, objectives=OBJECTIVES)
    with pytest.raises(ValueError, match="`verbosity` has no labelled row"):
        fit_regression(tmp_path / "empty", alphas=[1.0], val_fraction=0.2, seed=0)
    y[:, 2] = 0.5
    y[7, 0] = float("inf")
    write_features(tmp_path / "inf", "ratings", {"embeddings": x, "labels": y}, objectives=OBJECTIVES)
    with pytest.raises(ValueError, match="Source row 7 .* infinite label"):
        fit_regression(tmp_path / "inf", alphas=[1.0], val_fraction=0.2, seed=0)


def test_several_folders_fit_the_union_of_their_objectives(tmp_path):
    """Datasets rating different objectives, extracted separately: the fit over the union of their columns equals
    scikit-learn on the table stacked by hand (labels NaN where a dataset lacks the objective)."""
    x, y = make_ratings()
    first, second = slice(0, 90), slice(90, 240)
    write_features(
        tmp_path / "a", "ratings", {"embeddings": x[first], "labels": y[first][:, :3]}, objectives=OBJECTIVES[:3]
    )
    # The second dataset names its columns in another order and lacks objective 1 and 2.
    order = [4, 3, 0]
    write_features(
        tmp_path / "b", "ratings", {"embeddings": x[second], "labels": y[second][:, order]},
        objectives=[OBJECTIVES[j] for j in order], shard_rows=70,
    )  # fmt: skip
    fit = main(features=[str(tmp_path / "a"), str(tmp_path / "b")], out=str(tmp_path / "regression.safetensors"))
    weight, alpha, names = load_regression(tmp_path / "regression.safetensors")
    union = [0, 1, 2, 4, 3]  # objectives in order of first appearance across the folders
    # The report names its inputs relative to its own folder (tmp_path, beside the regression file).
    assert names == [OBJECTIVES[j] for j in union] and fit["settings"]["features"] == ["a", "b"]

    stacked = y.clone()
    stacked[first, 3:] = float("nan")
    stacked[second, 1:3] = float("nan")
    keys = torch.cat([torch.arange(90), torch.arange(150) + FOLDER_STRIDE])
    held_out = validation_mask(keys, 0.2, 0).numpy()
    alphas, weights, _ = sklearn_reference(x, stacked, held_out, list(ALPHAS))
    assert alpha.tolist() == alphas[union].tolist()
    np.testing.assert_allclose(weight.numpy(), weights[union], rtol=1e-5, atol=1e-6)


def test_a_group_without_held_out_rows_chooses_alpha_by_gcv():
    """Too few rated rows to hold any out (e.g. 8 HelpSteer2 rows): no crash, α by generalized cross-validation,
    GCV(α) = n‖y − H y‖² / (n − tr H)² with H = X (XᵀX + αI)⁻¹ Xᵀ, computed here from the rows."""
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(7, 5)) * np.logspace(0, -1, 5)).astype(np.float32).astype(np.float64)  # as stored
    y = x @ rng.normal(size=(5, 2)) + 0.3 * rng.normal(size=(7, 2))
    train = GramStats.zeros(5, 2)
    train.update(x.astype(np.float32), y)
    ridge = HeldOutRidge(list(ALPHAS)).fit(train, GramStats.zeros(5, 2))
    assert ridge.selection_.startswith("GCV")
    for j in range(2):
        scores = []
        for alpha in ALPHAS:
            hat = x @ np.linalg.solve(x.T @ x + alpha * np.eye(5), x.T)
            scores.append(len(x) * np.sum((y[:, j] - hat @ y[:, j]) ** 2) / (len(x) - np.trace(hat)) ** 2)
        best = ALPHAS[int(np.argmin(scores))]
        assert ridge.alpha_[j] == best
        reference = Ridge(alpha=best, fit_intercept=False).fit(x, y[:, j])
        np.testing.assert_allclose(ridge.coef_[j], reference.coef_, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("alphas", [list(ALPHAS), list(ALPHAS)[::-1], [1.0, 1e-2, 100.0]], ids=["up", "down", "mixed"])
def test_an_alpha_tie_goes_to_the_alpha_listed_first(alphas):
    """Training labels y ≡ 0 give w(α) = (XᵀX + αI)⁻¹ Xᵀ0 = 0 for every α: every α predicts 0 on the held-out rows,
    so every α has the same held-out MSE, mean(y_val²), to the last bit. The tie goes to the α listed first (the
    smallest on the paper's ascending grid), and the refit on all rows, whose labels are not all zero, uses it.
    Without held-out rows, y ≡ 0 ties GCV(α) = n · 0 / (n − df(α))² = 0 the same way."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6))
    y = np.concatenate([np.zeros((30, 1)), rng.normal(size=(10, 1))])
    train, val = GramStats.zeros(6, 1), GramStats.zeros(6, 1)
    train.update(x[:30], y[:30])
    val.update(x[30:], y[30:])
    ridge = HeldOutRidge(alphas).fit(train, val)
    assert ridge.selection_ == "held-out MSE"
    assert np.all(ridge.val_mse_path_ == np.mean(y[30:] ** 2)), "the data must tie every α exactly"
    assert ridge.alpha_[0] == alphas[0]
    np.testing.assert_allclose(ridge.coef_[0], np.linalg.solve(x.T @ x + alphas[0] * np.eye(6), x.T @ y[:, 0]))

    full = GramStats.zeros(6, 1)
    full.update(x, np.zeros((40, 1)))
    ridge = HeldOutRidge(alphas).fit(full, GramStats.zeros(6, 1))
    assert ridge.selection_.startswith("GCV") and ridge.alpha_[0] == alphas[0]
