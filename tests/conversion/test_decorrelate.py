"""`armorm decorrelate`: the verbosity penalties λ and the reward transform T, checked against scipy's Spearman."""

import json
import logging

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from armorm_cli.cli import main as cli_main
from armorm_io.artifacts import load_transform, save_regression
from armorm_io.features import load_features, write_features
from conversion.decorrelate import decorrelate, find_penalty, main, transform_matrix


THRESHOLD, TOLERANCE = 0.03, 1e-3
OBJECTIVES = ["helpfulness", "correctness", "verbosity", "honesty", "safety"]
VERBOSITY = 2


def spearman(x, y) -> float:
    return spearmanr(x, y).statistic


def planted_rewards(n: int = 500, seed: int = 0) -> np.ndarray:
    """r (n, 5): objectives 0, 1, 3 lean on the verbosity reward r_2 by different amounts, 4 leans against it."""
    rng = np.random.default_rng(seed)
    verbosity = rng.normal(size=n)
    rewards = np.stack(
        [
            0.8 * verbosity + rng.normal(size=n),
            0.2 * verbosity + rng.normal(size=n),
            verbosity,
            3.0 * verbosity + 0.5 * rng.normal(size=n),
            -0.5 * verbosity + rng.normal(size=n),
        ],
        axis=1,
    )
    return rewards


def planted_features(tmp_path, rewards: np.ndarray, weight_rows: dict | None = None):
    """A pairs features folder and a regression W whose rewards W h over both sides of every pair are `rewards`.

    h = [r, noise] and W = [I, 0], so r = W h exactly (float64 → float32 rounding aside, so r is recomputed).
    """
    n, k = rewards.shape
    d = 16
    rng = np.random.default_rng(1)
    h = np.concatenate([rewards, rng.normal(size=(n, d - k))], axis=1).astype(np.float32)
    weight = np.zeros((k, d), dtype=np.float32)
    weight[:, :k] = np.eye(k)
    for row, value in (weight_rows or {}).items():
        weight[row] = value
    pairs = torch.from_numpy(h).reshape(n // 2, 2, d)
    write_features(
        tmp_path / "reference",
        "pairs",
        {"embeddings": pairs, "prompt_embeddings": torch.randn(n // 2, d)},
    )
    save_regression(tmp_path / "regression.safetensors", torch.from_numpy(weight), torch.ones(k), OBJECTIVES)
    # The rewards the stage sees: float32 features times W, in float64 (the test's own computation).
    return h.astype(np.float64) @ weight.astype(np.float64).T


def assert_penalties_exact(rewards: np.ndarray, penalties, verbosity: int):
    """λ_i meets τ and λ_i − tolerance does not (the smallest penalty, to the bisection's tolerance)."""
    r_v = rewards[:, verbosity]
    for i, penalty in enumerate(penalties):
        if i == verbosity:
            assert penalty == 0
            continue
        assert spearman(rewards[:, i] - penalty * r_v, r_v) <= THRESHOLD
        if penalty > 0:
            assert spearman(rewards[:, i] - max(penalty - TOLERANCE, 0.0) * r_v, r_v) > THRESHOLD
        else:
            assert spearman(rewards[:, i], r_v) <= THRESHOLD


def test_penalties_are_the_smallest_meeting_the_threshold():
    rewards = planted_rewards()
    result = decorrelate(torch.from_numpy(rewards), VERBOSITY, THRESHOLD, TOLERANCE)
    penalties = result.penalties.double().numpy()
    assert_penalties_exact(rewards, penalties.astype(np.float32), VERBOSITY)
    assert penalties[4] == 0  # already anti-correlated with verbosity: no penalty
    assert penalties[3] > 1.0  # needs a bracket larger than the first one [0, 1]
    assert result.unreachable == []
    for i in range(len(OBJECTIVES)):
        if i != VERBOSITY:
            r_v = rewards[:, VERBOSITY]
            assert result.correlations_before[i] == pytest.approx(spearman(rewards[:, i], r_v), abs=1e-9)
            expected_after = spearman(rewards[:, i] - penalties[i] * r_v, r_v)
            assert result.correlations_after[i] == pytest.approx(expected_after, abs=1e-9)


def test_find_penalty_with_ties_and_a_constant_objective():
    rng = np.random.default_rng(3)
    verbosity = rng.integers(0, 5, size=300).astype(np.float64)  # discrete: heavy ties
    reward = verbosity + rng.normal(size=300)
    penalty, rho, reached = find_penalty(reward, verbosity, THRESHOLD, TOLERANCE)
    assert reached and rho == pytest.approx(spearman(reward - penalty * verbosity, verbosity), abs=1e-9)
    assert rho <= THRESHOLD < spearman(reward - (penalty - TOLERANCE) * verbosity, verbosity)
    assert find_penalty(np.ones(300), verbosity, THRESHOLD)[::2] == (0.0, True)
    with pytest.raises(ValueError, match="constant"):
        find_penalty(reward, np.zeros(300), THRESHOLD)


def test_transform_layout():
    """r' = r T gives r'_i = r_i − λ_i r_v for i ≠ v and r'_v = 0, row by row."""
    penalties = torch.tensor([0.5, 0.0, 7.0, 1.25, 0.0])
    matrix = transform_matrix(penalties, VERBOSITY)
    rewards = torch.randn(10, 5)
    transformed = rewards @ matrix
    for row in range(10):
        for i in range(5):
            expected = 0.0 if i == VERBOSITY else rewards[row, i] - penalties[i] * rewards[row, VERBOSITY]
            assert transformed[row, i] == pytest.approx(float(expected), abs=1e-5)
    off_verbosity = [i for i in range(5) if i != VERBOSITY]
    assert torch.equal(matrix[off_verbosity][:, off_verbosity], torch.eye(4))
    assert torch.all(matrix[off_verbosity][:, VERBOSITY] == 0)


def test_main_writes_transform_and_report(tmp_path):
    rewards = planted_features(tmp_path, planted_rewards())
    out = tmp_path / "heads" / "transform.safetensors"
    cli_main(
        [
            "decorrelate",
            "--regression",
            str(tmp_path / "regression.safetensors"),
            "--reference",
            str(tmp_path / "reference"),
            "--verbosity",
            "verbosity",
            "--out",
            str(out),
        ]
    )
    matrix, penalties, metadata = load_transform(out)
    assert metadata["objectives"] == OBJECTIVES and metadata["verbosity"] == "verbosity"
    assert metadata["unreachable"] == []
    assert torch.equal(matrix, transform_matrix(penalties, VERBOSITY))
    assert_penalties_exact(rewards, penalties.numpy(), VERBOSITY)
    report = json.loads((out.parent / "decorrelate.json").read_text())["metrics"]
    assert report["reference_responses"] == len(rewards)  # both sides of every pair
    r_v = rewards[:, VERBOSITY]
    for i, name in enumerate(OBJECTIVES):
        if i != VERBOSITY:
            expected = spearman(rewards[:, i] - float(penalties[i]) * r_v, r_v)
            assert report["spearman_after"][name] == pytest.approx(expected, abs=1e-6)
            assert metadata["spearman_after"][name] == pytest.approx(expected, abs=1e-6)


def test_ratings_reference_gives_the_same_transform(tmp_path):
    planted_features(tmp_path, planted_rewards())
    tensors, _ = load_features(tmp_path / "reference")
    flat = tensors["embeddings"].reshape(-1, 16)
    write_features(
        tmp_path / "ratings",
        "ratings",
        {"embeddings": flat, "labels": torch.zeros(len(flat), 5)},
        objectives=OBJECTIVES,
    )
    common = dict(regression=str(tmp_path / "regression.safetensors"), verbosity="verbosity")
    main(reference=str(tmp_path / "reference"), out=str(tmp_path / "a.safetensors"), **common)
    main(reference=str(tmp_path / "ratings"), out=str(tmp_path / "b.safetensors"), **common)
    _, from_pairs, _ = load_transform(tmp_path / "a.safetensors")
    _, from_ratings, _ = load_transform(tmp_path / "b.safetensors")
    assert torch.equal(from_pairs, from_ratings)


def test_unreachable_objective_is_reported_by_name(tmp_path, caplog):
    """`honesty` = 10⁶ × verbosity + a little noise needs λ ≈ 10⁶, beyond `max_penalty`: reported, not a crash."""
    rewards = planted_rewards()
    weight_honesty = np.zeros(16, dtype=np.float32)
    weight_honesty[VERBOSITY] = 1e6
    weight_honesty[0] = 1.0
    rewards = planted_features(tmp_path, rewards, weight_rows={3: weight_honesty})
    out = tmp_path / "transform.safetensors"
    with caplog.at_level(logging.WARNING, logger="conversion.decorrelate"):
        report = main(
            regression=str(tmp_path / "regression.safetensors"),
            reference=str(tmp_path / "reference"),
            verbosity="verbosity",
            out=str(out),
            max_penalty=100.0,
        )
    assert report["metrics"]["unreachable"] == [OBJECTIVES[3]]
    assert "`honesty`" in caplog.text
    _, penalties, metadata = load_transform(out)
    assert metadata["unreachable"] == ["honesty"]
    assert json.loads((out.parent / "decorrelate.json").read_text())["metrics"]["unreachable"] == ["honesty"]
    assert penalties[3] == 0  # left unchanged
    r_v = rewards[:, VERBOSITY]
    assert spearman(rewards[:, 3] - 100.0 * r_v, r_v) > THRESHOLD  # indeed not reachable within the bound
    assert_penalties_exact(rewards[:, [0, 1, 2, 4]], penalties[[0, 1, 2, 4]].numpy(), VERBOSITY)


def test_unknown_verbosity_name_is_an_error(tmp_path):
    planted_features(tmp_path, planted_rewards(n=20))
    with pytest.raises(ValueError, match="helpsteer-verbosity.*objectives"):
        main(
            regression=str(tmp_path / "regression.safetensors"),
            reference=str(tmp_path / "reference"),
            verbosity="helpsteer-verbosity",
            out=str(tmp_path / "t.safetensors"),
        )
