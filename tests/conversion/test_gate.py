"""`armorm gate`: the stage-2 gating network, trained with Bradley-Terry on frozen rewards r' = (W h) T."""

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sklearn.linear_model import LogisticRegression

from armorm_cli.cli import main as cli_main
from armorm_io.artifacts import load_gating, save_gating, save_regression, save_transform
from armorm_io.features import write_features
from armorm_io.pair_keys import held_out
from conversion import gate as gate_module
from conversion.gate import GateSettings, bradley_terry_loss, main, train_gating
from modeling_armorm import ArmoRMGatingNetwork
from modeling_armorm.heads import chunked_transformed_rewards
from tests.utils import tiny_armorm


pytestmark = pytest.mark.usefixtures("one_thread")


D = 16
# Small and quick on two CPU cores; the defaults of `main` (the paper's) are for 10⁵+ pairs.
FAST = dict(
    steps=200, batch_size=128, lr=3e-3, gating_hidden_dim=32, gating_n_hidden=2, val_fraction=0.25, eval_every=50
)


def write_pipeline(tmp_path, raw_rewards: np.ndarray, prompts: np.ndarray, matrix: np.ndarray) -> dict:
    """Pairs features whose raw rewards W h are `raw_rewards` (N, 2, k) (h = [r, noise], W = [I, 0]), W and T files."""
    n, _, k = raw_rewards.shape
    rng = np.random.default_rng(1)
    h = np.concatenate([raw_rewards, rng.normal(size=(n, 2, D - k))], axis=-1)
    weight = np.zeros((k, D), dtype=np.float32)
    weight[:, :k] = np.eye(k)
    objectives = [f"objective-{i}" for i in range(k)]
    tensors = {
        "embeddings": torch.tensor(h, dtype=torch.float32),
        "prompt_embeddings": torch.tensor(prompts, dtype=torch.float32),
    }
    write_features(tmp_path / "pairs", "pairs", tensors)
    save_regression(tmp_path / "regression.safetensors", torch.from_numpy(weight), torch.ones(k), objectives)
    save_transform(tmp_path / "transform.safetensors", torch.tensor(matrix), torch.zeros(k), objectives)
    return dict(
        features=str(tmp_path / "pairs"),
        regression=str(tmp_path / "regression.safetensors"),
        transform=str(tmp_path / "transform.safetensors"),
    )


def prompt_dependent_pairs(n: int = 1200, seed: int = 0):
    """Prompts of type A prefer objective 0, type B objective 1; the two are anti-correlated across answers.

    The type is the sign of the prompt feature's first coordinate. The chosen answer has the higher reward on the
    objective its prompt prefers, hence the lower one on the other: no fixed weighting w · Δr can be right for both.
    Objective 2 is noise the gating must learn to ignore.
    """
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 2, size=n)
    prompts = rng.normal(size=(n, D))
    prompts[:, 0] = np.where(kind == 0, 2.0, -2.0) + 0.3 * rng.normal(size=n)
    u = rng.normal(size=(n, 2))
    rewards = np.stack([u, -u + 0.1 * rng.normal(size=(n, 2)), 0.5 * rng.normal(size=(n, 2))], axis=-1)  # (n, 2, 3)
    preferred = np.where(kind[:, None] == 0, rewards[:, :, 0], rewards[:, :, 1])  # (n, 2)
    swap = preferred[:, 1] > preferred[:, 0]
    rewards[swap] = rewards[swap][:, ::-1]
    return prompts, rewards


def best_fixed_weighting_accuracy(rewards: np.ndarray, n_train: int) -> float:
    """Held-out accuracy of the best prompt-independent weighting w, fitted by logistic regression on Δr."""
    delta = rewards[:, 0] - rewards[:, 1]
    x = np.concatenate([delta[:n_train], -delta[:n_train]])
    y = np.r_[np.ones(n_train), np.zeros(n_train)]
    w = LogisticRegression(fit_intercept=False).fit(x, y).coef_[0]
    return float(((delta[n_train:] @ w) > 0).mean())


def test_prompt_dependent_preference_is_learned(tmp_path):
    prompts, rewards = prompt_dependent_pairs()
    assert best_fixed_weighting_accuracy(rewards, 900) < 0.65  # a fixed weighting cannot express it
    paths = write_pipeline(tmp_path, rewards, prompts, np.eye(3, dtype=np.float32))
    report = main(out=str(tmp_path / "gating.safetensors"), device="cpu", **paths, **FAST)["metrics"]
    assert report["final"]["val_accuracy"] >= 0.9
    assert report["val_pairs"] == 300 and len(report["history"]) == 4
    assert json.loads((tmp_path / "gate.json").read_text())["metrics"]["final"] == report["final"]

    # The gating favours objective 0 on type-A prompts and objective 1 on type-B ones.
    state_dict, metadata = load_gating(tmp_path / "gating.safetensors")
    gating = ArmoRMGatingNetwork(D, 3, metadata["hidden_dim"], metadata["n_hidden"], metadata["temperature"])
    gating.load_state_dict(state_dict)
    with torch.no_grad():
        g = gating(torch.tensor(prompts, dtype=torch.float32))
    type_a = prompts[:, 0] > 0
    assert (g[type_a, 0] > g[type_a, 1]).float().mean() > 0.9
    assert (g[~type_a, 1] > g[~type_a, 0]).float().mean() > 0.9


def test_softmax_is_over_objectives_and_beta_is_learned(tmp_path):
    prompts, rewards = prompt_dependent_pairs(n=400)
    paths = write_pipeline(tmp_path, rewards, prompts, np.eye(3, dtype=np.float32))
    main(
        out=str(tmp_path / "gating.safetensors"),
        device="cpu",
        **paths,
        **{**FAST, "steps": 20},
        gating_logit_scale_init=50.0,
    )
    state_dict, metadata = load_gating(tmp_path / "gating.safetensors")
    assert metadata["temperature"] == 10.0 and metadata["hidden_dim"] == 32 and metadata["n_hidden"] == 2
    assert metadata["steps"] == 20 and metadata["seed"] == 0 and 0 <= metadata["val_accuracy"] <= 1
    beta = float(state_dict["logit_scale"])
    assert beta != 50.0  # β is trained
    # Rebuild g by hand: ReLU MLP, then a softmax across the k = 3 objectives (not across chosen/rejected).
    x = torch.tensor(prompts[:5], dtype=torch.float32)
    for i in range(metadata["n_hidden"] + 1):
        x = x @ state_dict[f"layers.{i}.weight"].T + state_dict[f"layers.{i}.bias"]
        x = torch.relu(x) if i < metadata["n_hidden"] else x
    z = x.double().numpy() / metadata["temperature"]
    expected = beta * np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    gating = ArmoRMGatingNetwork(D, 3, 32, 2, 10.0)
    gating.load_state_dict(state_dict)
    with torch.no_grad():
        g = gating(torch.tensor(prompts[:5], dtype=torch.float32))
    np.testing.assert_allclose(g.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(g.sum(-1).numpy(), beta, rtol=1e-5)  # rows sum to β


def test_loss_is_bradley_terry_on_transformed_rewards():
    """loss = mean −log σ(s_c − s_r), s = Σ_i g_i (r T)_i, g from the prompt only, r = W h."""
    torch.manual_seed(0)
    k, n = 4, 6
    gating = ArmoRMGatingNetwork(D, k, 8, 1, 10.0)
    torch.nn.init.constant_(gating.logit_scale, 3.0)
    embeddings, weight, matrix = torch.randn(n, 2, D), torch.randn(k, D), torch.randn(k, k)
    prompts = torch.randn(n, D)
    rewards = chunked_transformed_rewards(embeddings, weight, matrix)
    loss = bradley_terry_loss(gating, prompts, rewards)
    with torch.no_grad():
        g = gating(prompts).double().numpy()
    expected = 0.0
    for row in range(n):
        scores = []
        for side in range(2):
            r = weight.double().numpy() @ embeddings[row, side].double().numpy()
            scores.append(g[row] @ (r @ matrix.double().numpy()))
        expected += np.log1p(np.exp(-(scores[0] - scores[1]))) / n
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_transform_is_applied_in_training(tmp_path):
    """Only T makes this preference learnable.

    Objective 0 is quality q polluted by verbosity: r_0 = q + 2 r_v. The chosen answer always has the higher q; on
    half the pairs it is also shorter by as much as q is better (Δr = (−Δq, −Δq)), on the other half longer. The
    prompt says nothing about which half. Raw rewards: no gating β·softmax(·) · Δr (β may even turn negative) is
    right on both halves. With T (λ_0 = 2, r'_0 = q, r'_v = 0) every pair is Δr' = (Δq, 0) > 0.
    """
    rng = np.random.default_rng(0)
    n = 800
    quality = rng.normal(size=(n, 2))
    quality.sort(axis=1)
    quality = quality[:, ::-1] + np.array([0.5, 0.0])  # chosen (0) better
    dq = quality[:, 0] - quality[:, 1]
    verbosity = rng.normal(size=(n, 2))
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    verbosity[:, 0] = verbosity[:, 1] + sign * dq
    raw = np.stack([quality + 2 * verbosity, verbosity], axis=-1)  # (n, 2, 2); v = 1
    matrix = np.array([[1.0, 0.0], [-2.0, 0.0]], dtype=np.float32)  # T = I; T[v, :] −= λ; T[v, v] = 0
    prompts = rng.normal(size=(n, D))
    fast = {**FAST, "steps": 40}

    with_t = main(
        out=str(tmp_path / "t" / "gating.safetensors"),
        device="cpu",
        **fast,
        **write_pipeline(tmp_path / "t", raw, prompts, matrix),
    )
    identity = np.eye(2, dtype=np.float32)
    paths = write_pipeline(tmp_path / "i", raw, prompts, identity)
    without_t = main(out=str(tmp_path / "i" / "gating.safetensors"), device="cpu", **fast, **paths)
    assert with_t["metrics"]["final"]["val_accuracy"] >= 0.95
    assert without_t["metrics"]["final"]["val_accuracy"] <= 0.7


def test_same_seed_same_files_and_cli(tmp_path):
    prompts, rewards = prompt_dependent_pairs(n=300)
    paths = write_pipeline(tmp_path, rewards, prompts, np.eye(3, dtype=np.float32))
    args = ["gate", "--features", paths["features"], "--regression", paths["regression"]]
    args += ["--transform", paths["transform"], "--steps", "30", "--batch-size", "64", "--gating-hidden-dim", "16"]
    args += ["--gating-n-hidden", "2", "--eval-every", "10", "--device", "cpu", "--seed", "7"]
    for name in ("a", "b"):
        cli_main([*args, "--out", str(tmp_path / name / "gating.safetensors")])
    first, second = (tmp_path / name / "gating.safetensors" for name in ("a", "b"))
    # The same tensors and metadata (not bytes: safetensors 0.8 writes the metadata keys in a random order).
    (tensors_1, metadata_1), (tensors_2, metadata_2) = load_gating(first), load_gating(second)
    assert metadata_1 == metadata_2 and tensors_1.keys() == tensors_2.keys()
    assert all(torch.equal(tensors_1[key], tensors_2[key]) for key in tensors_1)
    assert (first.parent / "gate.json").read_text() == (second.parent / "gate.json").read_text()
    report = json.loads((first.parent / "gate.json").read_text())
    assert [entry["step"] for entry in report["metrics"]["history"]] == [10, 20, 30]
    assert report["settings"]["seed"] == 7 and report["metrics"]["val_pairs"] == 30  # default val_fraction 0.1
    cli_main([*args[:-2], "--seed", "8", "--out", str(tmp_path / "c" / "gating.safetensors")])
    other, _ = load_gating(tmp_path / "c" / "gating.safetensors")
    assert not torch.equal(other["layers.0.weight"], tensors_1["layers.0.weight"])


def test_gating_state_dict_loads_into_the_model(tmp_path):
    """The trained network's state dict, written by `save_gating` and read back by `load_gating`, is the model's
    `gating.*`: the same names, shapes, dtypes and values, the metadata its hyper-parameters; loaded (strictly) into
    the model, the model's gating gives the trained network's weights. A state dict with a missing or extra tensor,
    or layers of another width than its metadata says, is refused, naming it."""
    model = tiny_armorm(num_objectives=3)
    prompts, rewards = prompt_dependent_pairs(n=200)
    config = model.config
    shape = {"gating_hidden_dim": config.gating_hidden_dim, "gating_n_hidden": config.gating_n_hidden}
    gating, _ = train_gating(
        torch.tensor(prompts, dtype=torch.float32),
        torch.tensor(rewards, dtype=torch.float32),
        GateSettings(
            **{**FAST, "steps": 5, **shape},
            gating_temperature=config.gating_temperature,
            gating_logit_scale_init=100.0,
            device="cpu",
        ),
    )
    trained = gating.state_dict()
    path = tmp_path / "gating.safetensors"
    save_gating(
        path, trained, config.gating_temperature, config.gating_hidden_dim, config.gating_n_hidden,
        extra_metadata={"seed": 0, "gated_objectives": ["a", "b", "c"]},
    )  # fmt: skip
    state_dict, metadata = load_gating(path)
    assert state_dict.keys() == trained.keys() == model.gating.state_dict().keys()
    for name, tensor in trained.items():
        assert state_dict[name].dtype == tensor.dtype and torch.equal(state_dict[name], tensor), name
    assert metadata == {
        "temperature": config.gating_temperature, "hidden_dim": config.gating_hidden_dim,
        "n_hidden": config.gating_n_hidden, "seed": 0, "gated_objectives": ["a", "b", "c"],
    }  # fmt: skip

    model.gating.load_state_dict(state_dict)  # strict
    x = torch.tensor(prompts, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(model.gating(x), gating(x))

    # Refused before anything is written: a tensor missing, one the network does not have, layers of another width.
    missing = {name: tensor for name, tensor in trained.items() if name != "logit_scale"}
    extra = {**trained, "logit_bias": torch.zeros(1)}
    width, n_hidden = config.gating_hidden_dim, config.gating_n_hidden
    narrow = f"`layers.0.weight` has {width} rows, hidden_dim = 7"
    for state_dict, hidden_dim, on_saving, on_loading in [
        (missing, width, "logit_scale", "not a gating file"),
        (extra, width, "logit_bias", "logit_bias"),
        (trained, 7, narrow, narrow),
    ]:
        with pytest.raises(ValueError, match=on_saving):
            save_gating(tmp_path / "bad.safetensors", state_dict, 10.0, hidden_dim, n_hidden)
        assert not (tmp_path / "bad.safetensors").exists()
        # The same file written by another tool (metadata values are strings) is refused on loading.
        metadata = {"temperature": "10.0", "hidden_dim": str(hidden_dim), "n_hidden": str(n_hidden)}
        save_file(state_dict, tmp_path / "other.safetensors", metadata=metadata)
        with pytest.raises(ValueError, match=on_loading):
            load_gating(tmp_path / "other.safetensors")


def scale_100_prompts(prompts: np.ndarray) -> np.ndarray:
    """h_x as a backbone whose features sit in the hundreds gives them (SmolLM2's final hidden states): every coordinate
    about 100 on average; all but the first spread by about 100, the first, which carries the prompt's type (see
    `prompt_dependent_pairs`), by about 2. Stored as float32, as features are."""
    features = 100.0 + 100.0 * prompts
    features[:, 0] = 100.0 + prompts[:, 0]
    return features.astype(np.float32)


def test_the_standardization_is_folded_into_the_saved_first_layer(tmp_path, monkeypatch):
    """The gate trains on z = (h_x − μ) / σ, μ and σ the per-feature mean and sample standard deviation of the
    training prompts, and saves layer₀ rewritten as (W₀/σ) h_x + b₀ − (W₀/σ) μ: the saved network on the raw h_x is
    the trained network on z. μ and σ are computed here from the rows (no validation split: every row trains)."""
    as_trained = []
    fold = gate_module.fold_standardization

    def keep_the_trained_network(gating, mean, std):
        as_trained.append(copy.deepcopy(gating))
        fold(gating, mean, std)

    monkeypatch.setattr(gate_module, "fold_standardization", keep_the_trained_network)
    prompts, rewards = prompt_dependent_pairs(n=400)
    h_x = scale_100_prompts(prompts)
    paths = write_pipeline(tmp_path, rewards, h_x, np.eye(3, dtype=np.float32))
    main(out=str(tmp_path / "gating.safetensors"), device="cpu", **paths, **{**FAST, "steps": 50, "val_fraction": 0})
    state_dict, metadata = load_gating(tmp_path / "gating.safetensors")
    saved = ArmoRMGatingNetwork(D, 3, metadata["hidden_dim"], metadata["n_hidden"], metadata["temperature"])
    saved.load_state_dict(state_dict)
    (trained,) = as_trained

    rows = h_x.astype(np.float64)
    z = torch.tensor((rows - rows.mean(0)) / rows.std(0, ddof=1), dtype=torch.float32)
    raw = torch.from_numpy(h_x)
    with torch.no_grad():
        torch.testing.assert_close(saved.layers[0](raw), trained.layers[0](z), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(saved(raw), trained(z), rtol=1e-5, atol=1e-5)
        # The trained network itself is far off on raw features: without the fold the saved gate would be wrong.
        assert (trained(raw) - saved(raw)).abs().max() > 0.1 * float(saved.logit_scale)


def test_standardized_training_finds_the_prompt_type_that_raw_features_of_scale_100_hide(monkeypatch):
    """Why the gate trains on standardized features: the prompt's type is a coordinate of spread ~2 beside fifteen of
    spread ~100 (`scale_100_prompts`). Standardized, every coordinate weighs alike and the gate learns the type; on
    the raw features (the same training with μ = 0, σ = 1) the first layer sees the type under noise fifty times
    larger and the gate stays near chance, on held-out pairs."""
    prompts, rewards = prompt_dependent_pairs(n=1200)
    h_x, rewards = torch.from_numpy(scale_100_prompts(prompts)), torch.tensor(rewards, dtype=torch.float32)
    settings = GateSettings(**FAST, device="cpu")
    _, standardized = train_gating(h_x, rewards, settings)
    monkeypatch.setattr(gate_module, "standardization", lambda x: (torch.zeros(x.shape[1]), torch.ones(x.shape[1])))
    _, raw = train_gating(h_x, rewards, settings)
    assert standardized["final"]["val_accuracy"] >= 0.95, standardized["final"]
    assert raw["final"]["val_accuracy"] <= 0.65, raw["final"]
    assert standardized["final"]["val_loss"] < raw["final"]["val_loss"] - 0.2


def test_mismatched_objectives_are_an_error(tmp_path):
    prompts, rewards = prompt_dependent_pairs(n=50)
    paths = write_pipeline(tmp_path, rewards, prompts, np.eye(3, dtype=np.float32))
    save_transform(paths["transform"], torch.eye(3), torch.zeros(3), ["a", "b", "c"])
    with pytest.raises(ValueError, match="re-run `armorm decorrelate`"):
        main(out=str(tmp_path / "g.safetensors"), device="cpu", **paths, steps=1)


def test_no_weight_on_a_zero_column_so_the_score_cannot_be_switched_off(tmp_path):
    """Rewards that do not separate the pairs, and a T whose verbosity column is zero (r'_v = 0). Before the mask the
    gating escaped to that column (every score 0, every pair a tie, loss ln 2); now v is left out of the softmax by
    construction: its weight is exactly 0, the report says why, and the scores still differ."""
    rng = np.random.default_rng(0)
    matrix = np.eye(3, dtype=np.float32)
    matrix[2, :] -= 0.5
    matrix[2, 2] = 0.0  # T = I, T[v, :] -= λ, T[v, v] = 0 with v = 2
    noise = rng.normal(size=(400, 2, 3)) * 5
    prompts = rng.normal(size=(400, D))
    paths = write_pipeline(tmp_path / "noise", noise, prompts, matrix)
    report = main(out=str(tmp_path / "noise" / "gating.safetensors"), device="cpu", **paths, **FAST)["metrics"]
    assert report["mean_gating_share"]["objective-2"] == 0.0
    assert report["gated_objectives"] == ["objective-0", "objective-1"]
    assert "column of T is zero" in report["left_out"]["objective-2"]
    assert report["final"]["train_ties"] == 0.0

    state_dict, metadata = load_gating(tmp_path / "noise" / "gating.safetensors")
    assert metadata["gated_objectives"] == ["objective-0", "objective-1"]
    gating = ArmoRMGatingNetwork(D, 3, 32, 2, 10.0, gated_objectives=[0, 1])
    gating.load_state_dict(state_dict)
    with torch.no_grad():
        g = gating(torch.tensor(prompts, dtype=torch.float32))
    assert (g[:, 2] == 0).all() and torch.allclose(g.sum(-1), gating.logit_scale.expand(400))

    prompts, rewards = prompt_dependent_pairs()
    paths = write_pipeline(tmp_path / "signal", rewards, prompts, matrix)
    report = main(out=str(tmp_path / "signal" / "gating.safetensors"), device="cpu", **paths, **FAST)["metrics"]
    assert report["final"]["val_accuracy"] > 0.8 and report["mean_gating_share"]["objective-2"] == 0.0


def keyed_pipeline(tmp_path, backbone: str | None = None, per_prompt: int = 4, n: int = 400) -> dict:
    """`write_pipeline`'s pairs with the content keys `armorm extract` stores: `per_prompt` pairs share each prompt
    (its key and its feature), every pair has its own key; `backbone` is the features' backbone in meta.json."""
    prompts, rewards = prompt_dependent_pairs(n=n)
    prompts = np.repeat(prompts[::per_prompt], per_prompt, axis=0)  # the pairs of one prompt share h_x
    paths = write_pipeline(tmp_path, rewards, prompts, np.eye(3, dtype=np.float32))
    rng = np.random.default_rng(2)
    prompt_keys = torch.from_numpy(np.repeat(rng.integers(-(2**63), 2**63 - 1, size=n // per_prompt), per_prompt))
    pair_keys = torch.from_numpy(rng.integers(-(2**63), 2**63 - 1, size=n))
    tensors = {
        "embeddings": torch.tensor(np.concatenate([rewards, rng.normal(size=(n, 2, D - 3))], -1), dtype=torch.float32),
        "prompt_embeddings": torch.tensor(prompts, dtype=torch.float32),
        "prompt_keys": prompt_keys,
        "pair_keys": pair_keys,
    }
    write_features(tmp_path / "pairs", "pairs", tensors, backbone=backbone)
    return {**paths, "prompt_keys": prompt_keys, "pair_keys": pair_keys, "prompts": prompts, "rewards": rewards}


def test_validation_pairs_are_held_out_by_prompt_key(tmp_path):
    """With `prompt_keys` in the features, the validation pairs are exactly `held_out(prompt_keys, val_fraction,
    seed)`: the pairs of a prompt are all on one side. Checked end to end: the reported validation accuracy is the
    saved network's accuracy on those rows, computed here."""
    data = keyed_pipeline(tmp_path)
    settings = {**FAST, "val_fraction": 0.25, "seed": 3}
    paths = {key: data[key] for key in ("features", "regression", "transform")}
    report = main(out=str(tmp_path / "gating.safetensors"), device="cpu", **paths, **settings)["metrics"]

    val = held_out(data["prompt_keys"], 0.25, 3)
    assert report["split"] == "prompt_key" and report["val_pairs"] == int(val.sum()) > 0
    assert report["backbone_training"] is None  # a backbone without `trained_pairs.safetensors`
    for key in data["prompt_keys"].unique():
        assert val[data["prompt_keys"] == key].unique().numel() == 1  # one side per prompt
    state_dict, metadata = load_gating(tmp_path / "gating.safetensors")
    gating = ArmoRMGatingNetwork(D, 3, metadata["hidden_dim"], metadata["n_hidden"], metadata["temperature"])
    gating.load_state_dict(state_dict)
    with torch.no_grad():
        scores = (gating(torch.tensor(data["prompts"][val.numpy()], dtype=torch.float32))[:, None, :]
                  * torch.tensor(data["rewards"][val.numpy()], dtype=torch.float32)).sum(-1)  # fmt: skip
    expected = float((scores[:, 0] > scores[:, 1]).double().mean())
    assert report["final"]["val_accuracy"] == pytest.approx(expected, abs=1e-12)

    # Without keys: the seeded random split of before, and the report says so.
    unkeyed = write_pipeline(tmp_path / "unkeyed", data["rewards"], data["prompts"], np.eye(3, dtype=np.float32))
    report = main(out=str(tmp_path / "unkeyed" / "g.safetensors"), device="cpu", **unkeyed, **settings)["metrics"]
    assert report["split"] == "random" and report["val_pairs"] == 100


def test_the_report_counts_validation_pairs_the_bradley_terry_backbone_trained_on(tmp_path):
    """A backbone folder with `trained_pairs.safetensors` (what `armorm bt` leaves): trained on the pairs its default
    rule keeps (not `held_out(prompt_key, 0.1, 0)`), it saw none of the gate's validation pairs under the gate's
    defaults; a gate with another seed validates on pairs it saw, counted here independently and warned about."""
    backbone = tmp_path / "bt"
    backbone.mkdir()
    data = keyed_pipeline(tmp_path, backbone=str(backbone))
    trained = ~held_out(data["prompt_keys"], 0.1, 0)
    save_file(
        {"pair_keys": data["pair_keys"][trained], "prompt_keys": data["prompt_keys"][trained]},
        backbone / "trained_pairs.safetensors",
    )
    paths = {key: data[key] for key in ("features", "regression", "transform")}
    fast = {**FAST, "steps": 20, "eval_every": 10}
    fast.pop("val_fraction")
    report = main(out=str(tmp_path / "a" / "gating.safetensors"), device="cpu", **paths, **fast)["metrics"]
    assert report["backbone_training"] == {
        "backbones": [str(backbone)], "trained_pairs": int(trained.sum()), "val_pairs": report["val_pairs"],
        "val_pairs_trained_on": 0,
    }  # fmt: skip
    assert report["val_pairs"] > 0 and not any("trained on" in w for w in report["warnings"])

    report = main(out=str(tmp_path / "b" / "gating.safetensors"), device="cpu", **paths, **fast, seed=5)["metrics"]
    val = held_out(data["prompt_keys"], 0.1, 5)
    seen = int((val & trained).sum())
    assert seen > 0 and report["backbone_training"]["val_pairs_trained_on"] == seen
    assert any(f"{seen} of the gate's {int(val.sum())} validation pairs" in w for w in report["warnings"])
