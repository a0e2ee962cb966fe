"""Train the gating network of ArmoRM on preference pairs (stage 2, arXiv 2406.12845 §3.2).

    armorm gate --features PAIR_FEATURES --regression regression.safetensors --transform transform.safetensors \
        --out gating.safetensors [--steps 10000 --batch-size 1024 --lr 1e-3 --gating-hidden-dim 1024 ...]

The backbone, W and T are frozen, so the transformed rewards r' = (W h) T of both answers of every pair are computed
once; each step then runs only the MLP on the shared prompt feature h_x and minimises the Bradley-Terry loss
−log σ(s_chosen − s_rejected) with s = g(h_x) · r', g = β · softmax(MLP(h_x) / temperature) over the k objectives.
Writes `gating.safetensors` (the state dict of `ArmoRMGatingNetwork`, i.e. the model's `gating.*`) and the report
`gate.json` (validation accuracy along the way and at the end).
"""

import logging
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from conversion.artifacts import head_fingerprint, load_regression, load_transform, save_gating
from conversion.cli import Location, normalize_locations
from conversion.features import folder_fingerprint, load_pair_features
from conversion.heads import pair_scores, transformed_rewards
from conversion.reports import report_path, write_report
from modeling_armorm import ArmoRMConfig, ArmoRMGatingNetwork


logger = logging.getLogger(__name__)

__all__ = [
    "ARGUMENTS",
    "GateConfig",
    "GateSettings",
    "bradley_terry_loss",
    "evaluate",
    "main",
    "train_gating",
]


@dataclass(kw_only=True)
class GateSettings:
    """The knobs of `armorm gate` (the ones `armorm build` passes on as `--gate-<name>`). The gating network's own
    hyper-parameters take their defaults from `ArmoRMConfig` (the paper's values)."""

    steps: int = field(default=10_000, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=1024, metadata={"help": "Pairs per step."})
    lr: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate, decayed with a cosine."})
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
    gating_logit_scale_init: float = field(
        default=ArmoRMConfig.gating_logit_scale_init, metadata={"help": "Initial value of the learnable scale β."}
    )
    val_fraction: float = field(default=0.1, metadata={"help": "Share of the pairs held out for validation."})
    eval_every: int = field(default=500, metadata={"help": "Steps between two validation passes."})
    seed: int = field(default=0, metadata={"help": "Seed of the split, the initialisation and the batches."})
    device: str | None = field(default=None, metadata={"help": "`cpu`, `cuda`, `cuda:1`, … (default: cuda if any)."})


@dataclass(kw_only=True)
class GateConfig(GateSettings):
    """`armorm gate`: what it reads and writes, and its settings."""

    features: list[Location] = field(metadata={"help": "Pairs features folder(s) of `armorm extract` (training)."})
    regression: Location = field(metadata={"help": "`regression.safetensors` of `armorm fit` (W)."})
    transform: Location = field(metadata={"help": "`transform.safetensors` of `armorm decorrelate` (T)."})
    out: Location = field(metadata={"help": "The `gating.safetensors` to write (`gate.json` beside it)."})

    def __post_init__(self):
        normalize_locations(self)


ARGUMENTS = (GateConfig,)


def bradley_terry_loss(gating: ArmoRMGatingNetwork, prompt_embeddings: torch.Tensor, rewards: torch.Tensor):
    """Mean of −log σ(s_chosen − s_rejected) over the pairs (index 0 chosen, 1 rejected)."""
    scores = pair_scores(gating, prompt_embeddings, rewards)
    return -F.logsigmoid(scores[:, 0] - scores[:, 1]).mean()


@torch.no_grad()
def evaluate(
    gating: ArmoRMGatingNetwork, prompt_embeddings: torch.Tensor, rewards: torch.Tensor, batch_size: int = 8192
) -> dict[str, float]:
    """Pairwise accuracy (a tie counts as wrong) and Bradley-Terry loss over every pair."""
    correct, loss = 0, 0.0
    for start in range(0, len(rewards), batch_size):
        scores = pair_scores(
            gating, prompt_embeddings[start : start + batch_size], rewards[start : start + batch_size]
        )
        margin = scores[:, 0] - scores[:, 1]
        correct += int((margin > 0).sum())
        loss += float(-F.logsigmoid(margin).sum())
    n = len(rewards)
    return {"accuracy": correct / n, "loss": loss / n} if n else {"accuracy": float("nan"), "loss": float("nan")}


def _split(n: int, val_fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0 <= val_fraction < 1:
        raise ValueError(f"`val_fraction` must be in [0, 1), got {val_fraction}.")
    order = torch.randperm(n, generator=generator)
    n_val = int(n * val_fraction)
    if n - n_val < 1:
        raise ValueError(f"{n} pairs leave nothing to train on with `val_fraction` = {val_fraction}.")
    return order[n_val:], order[:n_val]


def _check_shapes(prompt_embeddings: torch.Tensor, rewards: torch.Tensor, settings: GateSettings) -> None:
    n = prompt_embeddings.shape[0]
    if rewards.ndim != 3 or rewards.shape[:2] != (n, 2):
        raise ValueError(f"`rewards` must be (N, 2, k) with N = {n} pairs, got shape {tuple(rewards.shape)}.")
    if settings.steps < 1 or settings.batch_size < 1 or settings.eval_every < 1:
        raise ValueError(
            f"`steps`, `batch_size` and `eval_every` must be >= 1, got {settings.steps}, {settings.batch_size}, "
            f"{settings.eval_every}."
        )


def new_gating(d: int, k: int, settings: GateSettings) -> ArmoRMGatingNetwork:
    """An untrained gating network, seeded, with β = `gating_logit_scale_init`."""
    torch.manual_seed(settings.seed)
    gating = ArmoRMGatingNetwork(
        d, k, hidden_dim=settings.gating_hidden_dim, n_hidden=settings.gating_n_hidden,
        temperature=settings.gating_temperature,
    )  # fmt: skip
    with torch.no_grad():
        gating.logit_scale.fill_(settings.gating_logit_scale_init)  # β, learnable
    return gating


def train_gating(
    prompt_embeddings: torch.Tensor, rewards: torch.Tensor, settings: GateSettings
) -> tuple[ArmoRMGatingNetwork, dict]:
    """Fit g on pairs: prompt_embeddings (N, d) = h_x, rewards (N, 2, k) = r' (0 chosen, 1 rejected).

    Returns the trained network (on CPU) and its metrics: the validation history and the final accuracies.
    """
    _check_shapes(prompt_embeddings, rewards, settings)
    n, d = prompt_embeddings.shape
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # One seed fixes the split, the initialisation and the batches; the generator stays on CPU so a seed gives the
    # same split and batches on every device.
    generator = torch.Generator().manual_seed(settings.seed)
    train_rows, val_rows = _split(n, settings.val_fraction, generator)
    gating = new_gating(d, rewards.shape[-1], settings).to(device)
    train = (prompt_embeddings[train_rows].float().to(device), rewards[train_rows].float().to(device))
    val = (prompt_embeddings[val_rows].float().to(device), rewards[val_rows].float().to(device))
    history = _optimize(gating, train, val, settings, generator)

    gating.eval()
    final = {f"train_{key}": value for key, value in evaluate(gating, *train).items()}
    if len(val_rows):
        final.update({f"val_{key}": value for key, value in evaluate(gating, *val).items()})
    final["beta"] = float(gating.logit_scale.detach())
    metrics = {"pairs": n, "train_pairs": len(train_rows), "val_pairs": len(val_rows), "history": history}
    return gating.cpu(), {**metrics, "final": final}


def _optimize(gating, train: tuple, val: tuple, settings: GateSettings, generator: torch.Generator) -> list[dict]:
    """AdamW with a cosine decay on the Bradley-Terry loss; the validation history every `eval_every` steps."""
    (x_train, r_train), (x_val, r_val) = train, val
    optimizer = torch.optim.AdamW(gating.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.steps)
    batch = min(settings.batch_size, len(x_train))
    history, running, seen = [], 0.0, 0
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
            entry["beta"] = float(gating.logit_scale.detach())
            history.append(entry)
            progress.set_postfix({key: round(value, 4) for key, value in entry.items() if key != "step"})
            logger.debug("gate step %d: %s", step, entry)
            running, seen = 0.0, 0
    return history


def _check_objectives(regression_objectives: list[str], transform_metadata: dict, regression: str, transform: str):
    names = transform_metadata.get("objectives")
    if names is not None and list(names) != list(regression_objectives):
        raise ValueError(
            f"The objectives of {transform} ({names}) differ from those of {regression} ({regression_objectives}); "
            "re-run `armorm decorrelate` with this regression."
        )


def _load_pairs(config: GateConfig, weight: torch.Tensor) -> dict[str, torch.Tensor]:
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
    return tensors


def null_column_shares(gating, prompt_embeddings: torch.Tensor, matrix: torch.Tensor, objectives: list[str]):
    """Each objective's mean share g_i / β of the gating, and a warning when most of it sits on objectives whose
    column of T is zero (r'_j = 0 for every answer: weight there switches the score off)."""
    with torch.no_grad():
        shares = (gating(prompt_embeddings.float()) / gating.logit_scale).mean(0)  # (k,)
    null = (matrix == 0).all(0)
    off = float(shares[null].sum())
    warnings = []
    # Some weight there is normal (it is also how the gating scales the score down); most of it means the other
    # objectives' rewards do not separate the pairs, and the score is near a tie everywhere.
    if off > 0.9:
        names = [objectives[j] for j in null.nonzero().flatten().tolist()]
        warnings.append(
            f"The gating puts {off:.0%} of its weight on {names}, whose decorrelated reward r' is 0 by construction: "
            "the score is nearly switched off. The other objectives' rewards barely separate these pairs; check "
            "the stage-1 metrics and the features, or decorrelate less (`--threshold`)."
        )
        logger.warning(warnings[-1])
    return dict(zip(objectives, shares.tolist())), warnings


def main(config: GateConfig | None = None, /, **kwargs) -> dict:
    """Load → compute → save `config.out` (the gating state dict) and its report `gate.json`, which it returns.
    Pass a `GateConfig`, or its fields as keywords."""
    config = config or GateConfig(**kwargs)
    weight, _, objectives = load_regression(config.regression)
    matrix, _, transform_metadata = load_transform(config.transform)
    _check_objectives(objectives, transform_metadata, config.regression, config.transform)
    if matrix.shape != (weight.shape[0],) * 2:
        raise ValueError(
            f"T of {config.transform} is {tuple(matrix.shape)} but W of {config.regression} has {weight.shape[0]} rows."
        )
    tensors = _load_pairs(config, weight)
    rewards = transformed_rewards(tensors["embeddings"], weight, matrix)  # (N, 2, k), frozen: computed once
    gating, metrics = train_gating(tensors["prompt_embeddings"], rewards, config)
    shares, warnings = null_column_shares(gating, tensors["prompt_embeddings"], matrix, objectives)
    metrics = {"warnings": warnings, "mean_gating_share": shares, "objectives": objectives, **metrics}

    final = metrics["final"]
    settings = asdict(config)
    extra = {key: settings[key] for key in ("steps", "batch_size", "lr", "weight_decay", "val_fraction", "seed")}
    extra.update(objectives=objectives, val_accuracy=final.get("val_accuracy"), train_accuracy=final["train_accuracy"])
    extra["logit_scale_init"] = config.gating_logit_scale_init
    save_gating(
        config.out, gating.state_dict(), config.gating_temperature, config.gating_hidden_dim, config.gating_n_hidden,
        extra_metadata=extra,
    )  # fmt: skip
    report = write_report(
        report_path("gate", config.out),
        "gate",
        config,
        inputs={
            "features": [folder_fingerprint(folder) for folder in config.features],
            "regression": head_fingerprint(config.regression),
            "transform": head_fingerprint(config.transform),
        },
        outputs={"gating": head_fingerprint(config.out)},
        metrics=metrics,
    )
    if final.get("val_accuracy") is not None:
        logger.info(
            "Validation accuracy %.4f over %d pairs; wrote %s", final["val_accuracy"], metrics["val_pairs"], config.out
        )
    return report
