"""Train the gating network of ArmoRM on preference pairs (stage 2, arXiv 2406.12845 §3.2).

    armorm gate --features PAIR_FEATURES --regression regression.safetensors --transform transform.safetensors \\
        --out gating.safetensors [--steps 10000 --batch-size 1024 --lr 1e-3 --gating-hidden-dim 1024 ...]

The backbone, W and T are frozen, so the transformed rewards r' = (W h) T of both answers of every pair are computed
once; each step then runs only the MLP on the shared prompt feature h_x and minimises the Bradley-Terry loss
−log σ(s_chosen − s_rejected) with s = g(h_x) · r', g = β · softmax(MLP(h_x) / temperature).

The softmax runs over the gated objectives only: an objective whose column of T is zero (the verbosity objective
after decorrelation: r'_v ≡ 0) can only shrink every score toward zero, so it gets weight 0 by construction, and so
does an objective the rating data cannot support (`--min-objective-rows`, `--min-objective-z`: see
`conversion.support`). Its support metrics come from the regression file's metadata; for a file without them, from
the `fit.json` beside it if it was written for that very file (then listed among the report's inputs as
`fit_report`), else no floor applies and a warning and the report say so. β starts where the Bradley-Terry loss is
informative for the rewards actually fitted (from the spread of their differences over the training pairs) unless
`--gating-logit-scale-init` gives it (100 is the paper's); the gate starts with equal weights on the gated objectives (its last layer at zero) and trains
on standardized prompt features, the standardization folded into its first layer at the end. The learning rate warms up, then decays with a cosine; the parameters of the best validation
step are kept. The validation pairs are those whose prompt key (stored by `armorm extract`) `held_out` puts aside, the
rule and defaults of `armorm bt`, so a Bradley-Terry backbone never trained on them (`gate.json` counts any it did);
features without keys get a seeded random split. Writes `gating.safetensors` (the model's `gating.*`), the report
`gate.json` (curves, the best step, what was left out) and `gate.png` (the curves).
"""

import copy
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from armorm_io.artifacts import head_fingerprint, load_regression, load_transform, save_gating
from armorm_io.features import folder_fingerprint, load_pair_features
from armorm_io.pair_keys import held_out
from armorm_io.reports import report_path, write_report
from conversion.bt import trained_pairs_by_backbone
from conversion.preference import cross_fitted_rewards
from conversion.support import SupportSettings, find_support, unsupported_reason
from modeling_armorm import ArmoRMConfig, ArmoRMGatingNetwork
from modeling_armorm.heads import LENGTH_OBJECTIVE, pair_scores, transform
from modeling_armorm.settings import DeviceSettings, Location, normalize_locations, resolve_device


logger = logging.getLogger(__name__)

__all__ = [
    "ARGUMENTS",
    "GateConfig",
    "GateSettings",
    "bradley_terry_loss",
    "evaluate",
    "gated_objectives",
    "initial_beta",
    "main",
    "split_pairs",
    "train_gating",
]

# The typical |s_chosen − s_rejected| at initialisation when β is chosen from the data: margins of about 1 are where
# −log σ(margin) has a useful gradient (ln 2 at 0, 0.31 at 1, 0.05 at 3).
INITIAL_MARGIN = 1.0
# The two rules of the validation split (`gate.json`'s `split`): by the prompt's content key, or seeded random rows.
PROMPT_KEY_SPLIT, RANDOM_SPLIT = "prompt_key", "random"


@dataclass(kw_only=True)
class GateSettings(SupportSettings, DeviceSettings):
    """The knobs of `armorm gate` (the ones `armorm build` passes on as `--gate-<name>`), with the shared device.
    The gating network's own hyper-parameters take their defaults from `ArmoRMConfig` (the paper's values)."""

    steps: int = field(default=10_000, metadata={"help": "Optimizer steps."})
    # Not `BatchSettings.batch_size` (conversations per backbone forward): this trains on stored features.
    batch_size: int = field(
        default=1024, metadata={"help": "Pairs per optimizer step (not a forward pass's conversations)."}
    )
    lr: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate, then a cosine decay to 0."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of the steps the learning rate warms up."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    gating_hidden_dim: int = field(
        default=ArmoRMConfig.gating_hidden_dim, metadata={"help": "Width of the gating MLP's hidden layers."}
    )
    gating_n_hidden: int = field(
        default=ArmoRMConfig.gating_n_hidden, metadata={"help": "Hidden ReLU layers of the gating MLP."}
    )
    gating_temperature: float = field(
        default=ArmoRMConfig.gating_temperature, metadata={"help": "Fixed softmax temperature of the gating."}
    )
    gating_logit_scale_init: float | None = field(
        default=None,
        metadata={
            "help": "Initial β. Default: from the rewards' scale, so the initial margins are about 1 (100 is the "
            "paper's, for rewards whose differences are about 0.01)."
        },
    )
    val_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Share of the pairs held out for validation: by prompt when the features hold `prompt_keys` "
            "(`armorm bt`'s rule and default, so the backbone never trained on them), else random pairs."
        },
    )
    eval_every: int = field(default=500, metadata={"help": "Steps between two validation passes."})
    seed: int = field(default=0, metadata={"help": "Seed of the split, the initialisation and the batches."})


@dataclass(kw_only=True)
class GateConfig(GateSettings):
    """`armorm gate`: what it reads and writes, and its settings."""

    features: list[Location] = field(metadata={"help": "Pairs features folder(s) of `armorm extract` (training)."})
    regression: Location = field(metadata={"help": "`regression.safetensors` of `armorm fit` (W)."})
    transform: Location = field(metadata={"help": "`transform.safetensors` of `armorm decorrelate` (T)."})
    out: Location = field(metadata={"help": "The `gating.safetensors` to write (`gate.json` beside it)."})

    def __post_init__(self):
        super().__post_init__()
        normalize_locations(self)


ARGUMENTS = (GateConfig,)


# ---------------------------------------------------------------- the loss and its evaluation


def bradley_terry_loss(gating: ArmoRMGatingNetwork, prompt_embeddings: torch.Tensor, rewards: torch.Tensor):
    """Mean of −log σ(s_chosen − s_rejected) over the pairs (index 0 chosen, 1 rejected)."""
    scores = pair_scores(gating, prompt_embeddings, rewards)
    return -F.logsigmoid(scores[:, 0] - scores[:, 1]).mean()


@torch.no_grad()
def evaluate(
    gating: ArmoRMGatingNetwork, prompt_embeddings: torch.Tensor, rewards: torch.Tensor, batch_size: int = 8192
) -> dict[str, float]:
    """Pairwise accuracy (a tie counts as wrong), Bradley-Terry loss, and the share of exact ties."""
    correct, loss, ties = 0, 0.0, 0
    for start in range(0, len(rewards), batch_size):
        scores = pair_scores(
            gating, prompt_embeddings[start : start + batch_size], rewards[start : start + batch_size]
        )
        margin = scores[:, 0] - scores[:, 1]
        correct += int((margin > 0).sum())
        ties += int((margin == 0).sum())
        loss += float(-F.logsigmoid(margin).sum())
    n = len(rewards)
    if not n:
        return {"accuracy": float("nan"), "loss": float("nan"), "ties": float("nan")}
    return {"accuracy": correct / n, "loss": loss / n, "ties": ties / n}


# ---------------------------------------------------------------- which objectives, which β


def gated_objectives(
    matrix: torch.Tensor, objectives: list[str], metrics: dict | None, settings: GateSettings
) -> tuple[list[int], dict[str, str]]:
    """The objectives the softmax runs over, and every objective left out with the reason.

    Left out: a zero column of T (r'_j ≡ 0, e.g. the verbosity objective after decorrelation), and an objective the
    rating data does not support (`metrics`: its support metrics, `conversion.support.find_support`; None = unknown,
    no floor applied).
    """
    left_out = {}
    for j, name in enumerate(objectives):
        if not (matrix[:, j] != 0).any():
            left_out[name] = "its column of T is zero: r'_j = 0 for every answer (decorrelated away)"
        elif name != LENGTH_OBJECTIVE and metrics is not None:
            problem = unsupported_reason(
                name, metrics.get(name), settings.min_objective_rows, settings.min_objective_z
            )
            if problem:
                left_out[name] = problem
    gated = [j for j, name in enumerate(objectives) if name not in left_out]
    if not gated:
        raise ValueError(
            f"No objective is left to gate over: {left_out}. Lower the floor (`--min-objective-rows 0`, "
            "`--min-objective-z -1`) or fit the objectives on more rated rows."
        )
    return gated, left_out


def initial_beta(rewards: torch.Tensor, gated: list[int]) -> float:
    """β₀ that puts the initial margins at about `INITIAL_MARGIN`: at initialisation the softmax is nearly uniform
    over the gated objectives, and a pair's margin is β · Δr'_j for whichever objective the gating comes to favour,
    so β₀ = 1 / RMS_j(std(Δr'_j)) over the gated objectives j. rewards: (N, 2, k)."""
    delta = (rewards[:, 0] - rewards[:, 1])[:, gated].double()  # (N, gated)
    spread = float(delta.std(0).pow(2).mean().sqrt()) if len(delta) > 1 else 0.0
    if not math.isfinite(spread) or spread == 0.0:
        return ArmoRMConfig.gating_logit_scale_init  # constant rewards: any β is as good
    return INITIAL_MARGIN / spread


# ---------------------------------------------------------------- training


def split_pairs(
    n: int, settings: GateSettings, prompt_keys: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(training rows, validation rows, the rule) of the gate's N pairs, a function of the settings and the keys
    alone. With `prompt_keys` (N,), the content keys `armorm extract` stores, a pair is for validation when
    `held_out(prompt_key, val_fraction, seed)`: the pairs of one prompt stay on one side, and it is the rule
    `armorm bt` holds its pairs out by, with the same defaults, so the gate never validates on a pair the
    Bradley-Terry backbone trained on. Without keys, a share `val_fraction` of the rows drawn with `seed`."""
    val_fraction = settings.val_fraction
    if not 0 <= val_fraction < 1:
        raise ValueError(f"`val_fraction` must be in [0, 1), got {val_fraction}.")
    if prompt_keys is not None:
        val = held_out(prompt_keys, val_fraction, settings.seed)
        train_rows, val_rows, rule = (~val).nonzero().flatten(), val.nonzero().flatten(), PROMPT_KEY_SPLIT
    else:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed))
        n_val = int(n * val_fraction)
        train_rows, val_rows, rule = order[n_val:], order[:n_val], RANDOM_SPLIT
    if len(train_rows) < 1:
        raise ValueError(
            f"{n} pairs leave nothing to train on with `val_fraction` = {val_fraction} (split {rule}): "
            "lower `--val-fraction` or give more pairs."
        )
    return train_rows, val_rows, rule


def _check_shapes(prompt_embeddings: torch.Tensor, rewards: torch.Tensor, settings: GateSettings) -> None:
    n = prompt_embeddings.shape[0]
    if rewards.ndim != 3 or rewards.shape[:2] != (n, 2):
        raise ValueError(f"`rewards` must be (N, 2, k) with N = {n} pairs, got shape {tuple(rewards.shape)}.")
    if settings.steps < 1 or settings.batch_size < 1 or settings.eval_every < 1:
        raise ValueError(
            f"`steps`, `batch_size` and `eval_every` must be >= 1, got {settings.steps}, {settings.batch_size}, "
            f"{settings.eval_every}."
        )
    if not 0 <= settings.warmup_ratio < 1:
        raise ValueError(f"`warmup_ratio` must be in [0, 1), got {settings.warmup_ratio}.")


def new_gating(d: int, k: int, settings: GateSettings, gated: list[int] | None, beta: float) -> ArmoRMGatingNetwork:
    """An untrained gating network, seeded, with β = `beta`."""
    torch.manual_seed(settings.seed)
    gating = ArmoRMGatingNetwork(
        d, k, hidden_dim=settings.gating_hidden_dim, n_hidden=settings.gating_n_hidden,
        temperature=settings.gating_temperature, gated_objectives=gated,
    )  # fmt: skip
    with torch.no_grad():
        gating.logit_scale.fill_(beta)  # β, learnable
        # The last layer starts at zero: every gated objective gets the same weight and the softmax is far from
        # saturated. A random start on large features is nearly one-hot already, where the softmax has no gradient
        # and the gate never leaves the objective it began on.
        gating.layers[-1].weight.zero_()
        gating.layers[-1].bias.zero_()
    return gating


def standardization(prompt_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and standard deviation of h_x: the gate trains on (h_x − μ) / σ, whatever the backbone's
    feature scale (SmolLM2's final hidden states reach hundreds), and `fold_standardization` moves it into the first
    layer afterwards, so the saved network takes h_x as the model gives it."""
    mean = prompt_embeddings.mean(0)
    std = prompt_embeddings.std(0) if len(prompt_embeddings) > 1 else torch.ones_like(mean)
    return mean, std.clamp_min(1e-6)


@torch.no_grad()
def fold_standardization(gating: ArmoRMGatingNetwork, mean: torch.Tensor, std: torch.Tensor) -> None:
    """layer₀((x − μ)/σ) = (W₀/σ) x + (b₀ − (W₀/σ) μ): the same outputs from the raw features, exactly."""
    first = gating.layers[0]
    first.weight.div_(std)  # (out, d) / (d,): each input column by its σ
    first.bias.sub_(first.weight @ mean)


def train_gating(
    prompt_embeddings: torch.Tensor,
    rewards: torch.Tensor,
    settings: GateSettings,
    gated: list[int] | None = None,
    prompt_keys: torch.Tensor | None = None,
    split: tuple[torch.Tensor, torch.Tensor, str] | None = None,
) -> tuple[ArmoRMGatingNetwork, dict]:
    """Fit g on pairs: prompt_embeddings (N, d) = h_x, rewards (N, 2, k) = r' (0 chosen, 1 rejected); `gated`: the
    objectives the softmax runs over (None: all); `prompt_keys` (N,): each pair's prompt key, the validation split
    is then by prompt; `split`: the rows `split_pairs` gave, when the caller drew them already.

    Returns the network of the best validation step (on CPU; the last step without a validation split) and its
    metrics: the curves, the best step, β₀ and the final accuracies.
    """
    _check_shapes(prompt_embeddings, rewards, settings)
    n, d = prompt_embeddings.shape
    device = resolve_device(settings.device)
    # One seed fixes the split, the initialisation and the batches; the generator stays on CPU so a seed gives the
    # same split and batches on every device.
    train_rows, val_rows, rule = split if split is not None else split_pairs(n, settings, prompt_keys)
    generator = torch.Generator().manual_seed(settings.seed)
    k = rewards.shape[-1]
    beta = settings.gating_logit_scale_init
    beta = initial_beta(rewards[train_rows], gated or list(range(k))) if beta is None else beta
    gating = new_gating(d, k, settings, gated, beta).to(device)
    x = prompt_embeddings.float().to(device)
    mean, std = standardization(x[train_rows.to(device)])
    standardized = (x - mean) / std
    train = (standardized[train_rows.to(device)], rewards[train_rows].float().to(device))
    val = (standardized[val_rows.to(device)], rewards[val_rows].float().to(device))
    history, best_step = _optimize(gating, train, val, settings, generator)
    fold_standardization(gating, mean, std)
    train, val = (x[train_rows.to(device)], train[1]), (x[val_rows.to(device)], val[1])

    gating.eval()
    final = {f"train_{key}": value for key, value in evaluate(gating, *train).items()}
    if len(val_rows):
        final.update({f"val_{key}": value for key, value in evaluate(gating, *val).items()})
    final["beta"] = float(gating.logit_scale.detach())
    metrics = {"pairs": n, "train_pairs": len(train_rows), "val_pairs": len(val_rows), "split": rule}
    metrics["beta_init"] = beta
    metrics.update(history=history, best_step=best_step, final=final)
    return gating.cpu(), metrics


def _optimize(gating, train: tuple, val: tuple, settings: GateSettings, generator: torch.Generator):
    """AdamW, linear warm-up then cosine decay, on the Bradley-Terry loss; every `eval_every` steps a validation
    pass, and the parameters of the step with the lowest validation loss are loaded back at the end.

    Returns the history and that best step (the last one without validation pairs)."""
    (x_train, r_train), (x_val, r_val) = train, val
    optimizer = torch.optim.AdamW(gating.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    warmup = int(settings.warmup_ratio * settings.steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, settings.steps)
    batch = min(settings.batch_size, len(x_train))
    history, running, seen = [], 0.0, 0
    best = {"step": settings.steps, "val_loss": math.inf, "state": None}
    progress = tqdm(range(1, settings.steps + 1), desc="gate", dynamic_ncols=True)
    for step in progress:
        gating.train()
        rows = torch.randint(len(x_train), (batch,), generator=generator).to(x_train.device)
        loss = bradley_terry_loss(gating, x_train[rows], r_train[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        running, seen = running + loss.detach(), seen + 1  # a tensor: no device sync per step
        if step % settings.eval_every == 0 or step == settings.steps:
            gating.eval()
            entry = {"step": step, "train_loss": float(running) / seen, "lr": optimizer.param_groups[0]["lr"]}
            if len(x_val):
                val_metrics = evaluate(gating, x_val, r_val)
                entry.update(val_accuracy=val_metrics["accuracy"], val_loss=val_metrics["loss"])
                if val_metrics["loss"] < best["val_loss"]:
                    best = {"step": step, "val_loss": val_metrics["loss"], "state": copy.deepcopy(gating.state_dict())}
            entry["beta"] = float(gating.logit_scale.detach())
            history.append(entry)
            progress.set_postfix({key: round(value, 4) for key, value in entry.items() if key != "step"})
            logger.debug("gate step %d: %s", step, entry)
            running, seen = 0.0, 0
    if best["state"] is not None:
        gating.load_state_dict(best["state"])
    return history, best["step"]


# ---------------------------------------------------------------- the stage


def _check_objectives(objectives: list[str], transform_metadata: dict, regression: str, transform: str) -> list[str]:
    """The transform's objectives: the regression's, plus the length objective when it decorrelated from length."""
    names = list(transform_metadata.get("objectives") or objectives)
    expected = objectives + ([LENGTH_OBJECTIVE] if transform_metadata.get("length_objective") else [])
    if names != expected:
        raise ValueError(
            f"The objectives of {transform} ({names}) differ from those of {regression} ({objectives}); "
            "re-run `armorm decorrelate` with this regression."
        )
    return names


def _load_pairs(config: GateConfig, weight: torch.Tensor, lengths: bool) -> dict[str, torch.Tensor]:
    tensors, metas = load_pair_features(config.features)
    if metas[0].get("kind", "pairs") != "pairs" or "prompt_embeddings" not in tensors:
        raise ValueError(
            f"{config.features} holds {metas[0].get('kind')} features; `armorm gate` needs pairs features "
            "(`embeddings` (N, 2, d) and `prompt_embeddings` (N, d)): run `armorm extract` on preference pairs."
        )
    if tensors["embeddings"].shape[-1] != weight.shape[1]:
        raise ValueError(
            f"The features of {config.features} have hidden size {tensors['embeddings'].shape[-1]} but W expects "
            f"{weight.shape[1]}: extract them with the backbone the regression was fitted on."
        )
    if lengths and "answer_lengths" not in tensors:
        raise ValueError(
            f"The transform decorrelates from the answer's length, but {config.features} hold no `answer_lengths`: "
            "extract the pairs again with this package's `armorm extract`."
        )
    return tensors


def gating_summary(gating, prompt_embeddings: torch.Tensor, objectives: list[str]) -> dict:
    """Each objective's mean share g_i / β over the pairs, and how many objectives carry weight (a mean share of
    at least 1 %)."""
    with torch.no_grad():
        shares = (gating(prompt_embeddings.float()) / gating.logit_scale).mean(0)  # (k,)
    carrying = [name for name, share in zip(objectives, shares.tolist()) if share >= 0.01]
    return {"mean_gating_share": dict(zip(objectives, shares.tolist())), "objectives_with_weight": carrying}


def backbone_trained_on_validation(
    config: GateConfig, tensors: dict[str, torch.Tensor], val_rows: torch.Tensor, rule: str
) -> tuple[dict | None, list]:
    """How many of the gate's validation pairs (`val_rows`, split by `rule`) the features' backbone was trained on,
    when that backbone is an `armorm bt` output; None for any other backbone. With the defaults (the same
    `val_fraction` and `seed` in both stages, a split by prompt key) the count is 0; otherwise the validation
    accuracy flatters the gate, and a warning says so."""
    trained = {b: keys for b, keys in trained_pairs_by_backbone(config.features).items() if keys is not None}
    if not trained:
        return None, []
    if "pair_keys" not in tensors:
        warning = (
            f"The backbone {list(trained)} was trained on preference pairs, but {config.features} hold no "
            "`pair_keys`: which validation pairs it saw is unknown. Extract the pairs again with `armorm extract`."
        )
        logger.warning(warning)
        return {"backbones": list(trained), "val_pairs_trained_on": None}, [warning]
    seen = torch.cat(list(trained.values()))
    count = int(torch.isin(tensors["pair_keys"][val_rows], seen).sum())
    report = {"backbones": list(trained), "trained_pairs": len(seen), "val_pairs": len(val_rows)}
    report["val_pairs_trained_on"] = count
    if not count:
        return report, []
    warning = (
        f"{count} of the gate's {len(val_rows)} validation pairs (split {rule}) are among the pairs the backbone "
        f"{list(trained)} was trained on: the validation accuracy is optimistic. Train the backbone (`armorm bt`) "
        "with the gate's `--val-fraction` and `--seed` (the defaults of both), or validate on other pairs."
    )
    logger.warning(warning)
    return report, [warning]


def _warnings(metrics: dict, left_out: dict[str, str]) -> list[str]:
    warnings = [f"`{name}` is left out of the gate: {reason}." for name, reason in left_out.items()]
    ties = metrics["final"]["train_ties"]
    if ties > 0.01:
        warnings.append(
            f"{ties:.0%} of the training pairs get the same score for both answers: the gate cannot separate them. "
            "Check the stage-1 metrics (`fit.json`) and the features, or start β higher "
            "(`--gating-logit-scale-init`)."
        )
    for warning in warnings:
        logger.warning(warning)
    return warnings


def plot_curves(history: list[dict], best_step: int, path: Path) -> None:
    """The training and validation Bradley-Terry loss and the validation accuracy per evaluation step, as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no display backend needed

    steps = [entry["step"] for entry in history]
    figure = Figure(figsize=(8, 3.2))
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    loss_axes.plot(steps, [entry["train_loss"] for entry in history], label="train")
    if any("val_loss" in entry for entry in history):
        loss_axes.plot(steps, [entry.get("val_loss") for entry in history], label="validation")
        accuracy_axes.plot(steps, [entry.get("val_accuracy") for entry in history], color="tab:orange")
    for axes in (loss_axes, accuracy_axes):
        axes.axvline(best_step, color="gray", linestyle=":", label=f"kept: step {best_step}")
        axes.set_xlabel("step")
    loss_axes.set_ylabel("Bradley-Terry loss")
    loss_axes.legend(fontsize=8)
    accuracy_axes.set_ylabel("validation accuracy")
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def main(config: GateConfig | None = None, /, **kwargs) -> dict:
    """Load → compute → save `config.out` (the gating state dict), its report `gate.json` (which it returns) and the
    curves `gate.png`. Pass a `GateConfig`, or its fields as keywords."""
    config = config or GateConfig(**kwargs)
    weight, _, objectives = load_regression(config.regression)
    matrix, _, transform_metadata = load_transform(config.transform)
    objectives = _check_objectives(objectives, transform_metadata, config.regression, config.transform)
    if matrix.shape != (len(objectives),) * 2:
        raise ValueError(f"T of {config.transform} is {tuple(matrix.shape)} for {len(objectives)} objectives.")
    lengths = LENGTH_OBJECTIVE in objectives
    tensors = _load_pairs(config, weight, lengths)
    answer_lengths = tensors["answer_lengths"] if lengths else None
    # (N, 2, k): W, T frozen, so computed once; a pair the `preference` head was fitted on gets its out-of-fold head
    r = cross_fitted_rewards(tensors, weight, objectives, config.regression, answer_lengths=answer_lengths)
    rewards = transform(r, matrix)
    support = find_support(config.regression)
    if support.warning:
        logger.warning(support.warning)
    gated, left_out = gated_objectives(matrix, objectives, support.metrics, config)
    prompt_keys = tensors.get("prompt_keys")
    split = split_pairs(len(rewards), config, prompt_keys)
    gating, metrics = train_gating(tensors["prompt_embeddings"], rewards, config, gated, prompt_keys, split)
    backbone_training, backbone_warnings = backbone_trained_on_validation(config, tensors, *split[1:])
    metrics = {
        "objectives": objectives,
        "gated_objectives": [objectives[j] for j in gated],
        "left_out": left_out,
        "support_source": support.source,
        "backbone_training": backbone_training,
        **gating_summary(gating, tensors["prompt_embeddings"], objectives),
        **metrics,
    }
    metrics["warnings"] = ([support.warning] if support.warning else []) + _warnings(metrics, left_out)
    metrics["warnings"] += backbone_warnings

    final, settings = metrics["final"], asdict(config)
    extra = {key: settings[key] for key in ("steps", "batch_size", "lr", "weight_decay", "val_fraction", "seed")}
    extra.update(objectives=objectives, gated_objectives=metrics["gated_objectives"], best_step=metrics["best_step"])
    extra.update(val_accuracy=final.get("val_accuracy"), train_accuracy=final["train_accuracy"])
    extra["logit_scale_init"] = metrics["beta_init"]
    save_gating(
        config.out, gating.state_dict(), config.gating_temperature, config.gating_hidden_dim, config.gating_n_hidden,
        extra_metadata=extra,
    )  # fmt: skip
    plot_curves(metrics["history"], metrics["best_step"], Path(config.out).with_name("gate.png"))
    report = write_report(
        report_path("gate", config.out),
        "gate",
        config,
        inputs={
            "features": [folder_fingerprint(folder) for folder in config.features],
            "regression": head_fingerprint(config.regression),
            "transform": head_fingerprint(config.transform),
            **support.inputs,
        },
        outputs={"gating": head_fingerprint(config.out)},
        metrics=metrics,
    )
    if final.get("val_accuracy") is not None:
        logger.info(
            "Validation accuracy %.4f over %d pairs (step %d kept, %d objectives gated, %d carry weight); wrote %s",
            final["val_accuracy"], metrics["val_pairs"], metrics["best_step"], len(gated),
            len(metrics["objectives_with_weight"]), config.out,
        )  # fmt: skip
    return report
