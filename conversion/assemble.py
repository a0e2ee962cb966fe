"""Assemble an ArmoRM checkpoint from a backbone and the three head files, with its tokenizer and model card.

    armorm assemble --backbone HuggingFaceTB/SmolLM2-135M-Instruct --regression regression.safetensors \\
        --transform transform.safetensors --gating gating.safetensors --out armorm-smollm2 \\
        [--tokenizer PATH] [--dtype auto|float32|bfloat16|float16] [--datasets ID ...] [--eval-results JSON] \\
        [--base-model ID] [--model-id ID]

`--backbone` is a folder, a Hub id or a `.gguf` file (dequantized on load). The weights are loaded loudly: every
tensor of the checkpoint comes from exactly one input (backbone → `model.*`, W → `regression_layer.weight`,
T → `reward_transform_matrix`, the gating state dict → `gating.*`), and the key sets and shapes are asserted equal
before anything is saved. The checkpoint loads with `import modeling_armorm` and with `trust_remote_code=True`.
"""

import json
import logging
import math
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import PreTrainedModel

from conversion.artifacts import load_gating, load_regression, load_transform
from conversion.backbone import DTYPES, load_backbone, load_tokenizer, split_gguf
from conversion.model_card import CardInfo, build_model_card
from modeling_armorm import ArmoRMConfig, ArmoRMForRewardModeling, gating_pattern_from_tokenizer


logger = logging.getLogger(__name__)

__all__ = [
    "Heads",
    "add_arguments",
    "assemble_model",
    "build_config",
    "main",
    "read_heads",
]

# Report entries that are not per-objective validation metrics (the table shows λ and α from the tensors).
_NOT_METRICS = {"penalties", "alpha", "alphas", "verbosity", "unreachable", "label_group", "train_rows", "val_rows"}


def add_arguments(parser):
    parser.add_argument(
        "--backbone", required=True, help="The backbone: a folder, a Hub id, or a `.gguf` file (dequantized)."
    )
    parser.add_argument(
        "--regression", required=True, help="`regression.safetensors` of `armorm fit` (W, α, objective names)."
    )
    parser.add_argument(
        "--transform", required=True, help="`transform.safetensors` of `armorm decorrelate` (T, λ, verbosity)."
    )
    parser.add_argument("--gating", required=True, help="`gating.safetensors` of `armorm gate` (the gating network).")
    parser.add_argument("--out", required=True, help="Folder of the checkpoint to write.")
    parser.add_argument("--tokenizer", help="Tokenizer with the chat template (default: the backbone's).")
    parser.add_argument("--dtype", choices=list(DTYPES), help="Backbone dtype (default: the backbone's own).")
    parser.add_argument("--datasets", nargs="+", help="Hub ids of the training data, for the model card.")
    parser.add_argument("--eval-results", help="JSON of `armorm evaluate`, shown in the model card.")
    parser.add_argument("--base-model", help="Hub id of the backbone for the card (default: `--backbone` if an id).")
    parser.add_argument("--model-id", help="Hub id the card's usage snippet loads (default: the `--out` name).")


# ---------------------------------------------------------------- load


@dataclass
class Heads:
    """The three head files, read and cross-checked: r = W h, r' = r T, g = β softmax(MLP(h_x) / temperature)."""

    objectives: list[str]
    weight: torch.Tensor  # W (k, d)
    alpha: torch.Tensor  # (k,)
    matrix: torch.Tensor  # T (k, k)
    penalties: torch.Tensor  # λ (k,)
    verbosity_objective: int | None
    gating_state: dict[str, torch.Tensor]
    gating_temperature: float
    gating_hidden_dim: int
    gating_n_hidden: int
    objective_metrics: dict[str, dict[str, float]]
    gating_metrics: dict[str, float]


def _report(path: str | os.PathLike) -> dict:
    """A head file's safetensors metadata merged with the JSON report its stage writes next to it, if any
    (`regression.metrics.json` of `armorm fit`, `transform.json` of `armorm decorrelate`, `gating.json`)."""
    with safe_open(str(path), framework="pt") as f:
        report = {}
        for key, value in (f.metadata() or {}).items():
            try:
                report[key] = json.loads(value)
            except json.JSONDecodeError:
                report[key] = value
    stem = Path(path).with_suffix("")
    for sidecar in (stem.with_suffix(".json"), stem.with_suffix(".metrics.json")):
        if sidecar.is_file():
            report.update(json.loads(sidecar.read_text(encoding="utf-8")))
    return report


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(entry: dict) -> dict[str, float]:
    return {key: float(value) for key, value in entry.items() if key not in _NOT_METRICS and _is_number(value)}


def _per_objective(report: dict, objectives: list[str]) -> dict[str, dict[str, float]]:
    """Metrics keyed by objective, in the shapes the stages write: `{metric: {objective: x}}` (decorrelate),
    `{"objectives": {objective: {metric: x}}}` (fit), or a list of `{"objective": name, metric: x}` rows."""
    names, metrics = set(objectives), {}
    for key, value in report.items():
        if key in _NOT_METRICS or not value:
            continue
        if isinstance(value, dict) and set(value) <= names:
            for objective, entry in value.items():
                if _is_number(entry):
                    metrics.setdefault(objective, {})[key] = float(entry)
                elif isinstance(entry, dict):
                    metrics.setdefault(objective, {}).update(_numbers(entry))
        elif isinstance(value, list) and all(isinstance(row, dict) for row in value):
            for row in value:
                objective = row.get("objective", row.get("name"))
                if objective in names:
                    metrics.setdefault(objective, {}).update(_numbers(row))
    return metrics


def _verbosity_index(value, objectives: list[str], path) -> int | None:
    if value is None:
        return None
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        return int(value)
    if value in objectives:
        return objectives.index(value)
    raise ValueError(f"{path}: the verbosity objective `{value}` is not one of the objectives {objectives}.")


def _same_objectives(path, found, objectives: list[str], stage: str) -> None:
    if found is not None and list(found) != objectives:
        raise ValueError(
            f"{path} was made for the objectives {list(found)}, but the regression file has {objectives}. "
            f"Re-run `armorm {stage}` with this regression file."
        )


def read_heads(regression: str | os.PathLike, transform: str | os.PathLike, gating: str | os.PathLike) -> Heads:
    weight, alpha, objectives = load_regression(regression)
    matrix, penalties, transform_meta = load_transform(transform)
    gating_state, gating_meta = load_gating(gating)
    _same_objectives(transform, transform_meta.get("objectives"), objectives, "decorrelate")
    _same_objectives(gating, gating_meta.get("objectives"), objectives, "gate")

    verbosity = _verbosity_index(transform_meta.get("verbosity"), objectives, transform)
    if verbosity is None:
        # r'_v = 0 is the one zero on T's diagonal (T[v, v] = 0): recover v from the matrix when the metadata lacks it.
        zeros = (matrix.diagonal() == 0).nonzero().flatten().tolist()
        verbosity = zeros[0] if len(zeros) == 1 else None

    objective_metrics = _per_objective(_report(regression), objectives)
    for objective, entries in _per_objective(_report(transform), objectives).items():
        objective_metrics.setdefault(objective, {}).update(entries)
    gating_report = _report(gating)
    gating_metrics = {
        key: float(gating_report[key])
        for key in ("val_accuracy", "train_accuracy")
        if _is_number(gating_report.get(key))
    }
    return Heads(
        objectives=objectives,
        weight=weight,
        alpha=alpha,
        matrix=matrix.float(),
        penalties=penalties.float(),
        verbosity_objective=verbosity,
        gating_state={key: value.float() for key, value in gating_state.items()},
        gating_temperature=gating_meta["temperature"],
        gating_hidden_dim=gating_meta["hidden_dim"],
        gating_n_hidden=gating_meta["n_hidden"],
        objective_metrics=objective_metrics,
        gating_metrics=gating_metrics,
    )


# ---------------------------------------------------------------- build


def build_config(backbone_config, heads: Heads, tokenizer, dtype: torch.dtype | None = None) -> ArmoRMConfig:
    """`ArmoRMConfig`: the backbone's config nested, the heads' sizes, the tokenizer's gating pattern and pad id."""
    text_config = backbone_config.to_dict()
    # A GGUF backbone is dequantized: the checkpoint holds plain tensors, so no quantization config goes with it.
    text_config.pop("quantization_config", None)
    if dtype is not None:
        text_config["dtype"] = str(dtype).removeprefix("torch.")
    if len(tokenizer) > backbone_config.vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the backbone embeds only {backbone_config.vocab_size}. "
            "Pass the backbone's own tokenizer with `--tokenizer`."
        )
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("The tokenizer has neither a pad nor an eos token; give it a `pad_token` first.")
        # Padding is masked out (the last real token comes from the attention mask), so eos is a safe pad.
        logger.warning("The tokenizer has no pad token: using its eos token %r as pad.", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    config = ArmoRMConfig(
        text_config=text_config,
        num_objectives=len(heads.objectives),
        objective_names=heads.objectives,
        verbosity_objective=heads.verbosity_objective,
        gating_hidden_dim=heads.gating_hidden_dim,
        gating_n_hidden=heads.gating_n_hidden,
        gating_temperature=heads.gating_temperature,
        **gating_pattern_from_tokenizer(tokenizer).config_kwargs(),
    )
    config.pad_token_id = tokenizer.pad_token_id
    return config


_HINTS = {
    "model.": "The backbone does not match the config built from it; pass the same `--backbone` as for extraction.",
    "regression_layer.": "W must be (k, d) with d the backbone's hidden size: fit it (`armorm fit`) on features "
    "extracted with this backbone.",
    "reward_transform_matrix": "T must be (k, k): decorrelate (`armorm decorrelate`) this regression file.",
    "gating.": "The gating network maps the prompt feature (d) to k weights: train it (`armorm gate`) on this "
    "backbone's features with this regression and transform.",
}


def _check_tensors(source: str, prefix: str, expected: dict[str, tuple], found: dict[str, torch.Tensor]) -> None:
    expected = {key: shape for key, shape in expected.items() if key.startswith(prefix)}
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    mismatched = [
        f"`{key}` has shape {tuple(found[key].shape)}, the model expects {expected[key]}"
        for key in sorted(set(expected) & set(found))
        if tuple(found[key].shape) != expected[key]
    ]
    problems = [f"missing {missing}"] * bool(missing) + [f"unexpected {unexpected}"] * bool(unexpected) + mismatched
    if problems:
        raise ValueError(f"{source} does not fit the model: " + "; ".join(problems) + ". " + _HINTS[prefix])


def assemble_model(
    config: ArmoRMConfig, backbone: PreTrainedModel, heads: Heads, dtype: torch.dtype | None = None
) -> ArmoRMForRewardModeling:
    """Instantiate `ArmoRMForRewardModeling` and load every tensor from the backbone and the heads, asserting the
    key sets and shapes match: nothing is left at its random initialisation."""
    # Built on the meta device, then the loaded tensors are assigned: no second copy of an 8B backbone in memory.
    with torch.device("meta"):
        model = ArmoRMForRewardModeling(config)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    backbone_state = {f"model.{key}": value.to(dtype or value.dtype) for key, value in backbone.state_dict().items()}
    sources = {
        "model.": ("The backbone", backbone_state),
        "regression_layer.": ("The regression file (W)", {"regression_layer.weight": heads.weight}),
        "reward_transform_matrix": ("The transform file (T)", {"reward_transform_matrix": heads.matrix}),
        "gating.": ("The gating file", {f"gating.{key}": value for key, value in heads.gating_state.items()}),
    }
    state = {}
    for prefix, (source, tensors) in sources.items():
        _check_tensors(source, prefix, expected, tensors)
        state.update(tensors)
    # Every model key belongs to one source: a new module in the model class would fail here, not load randomly.
    assert set(state) == set(expected), sorted(set(expected) ^ set(state))
    model.load_state_dict(state, strict=True, assign=True)

    # Non-persistent buffers (RoPE inverse frequencies) are computed in `__init__`, never saved: take the backbone's.
    saved = set(backbone.state_dict())
    for name, buffer in backbone.named_buffers():
        if name not in saved:
            module_name, _, buffer_name = name.rpartition(".")
            model.model.get_submodule(module_name).register_buffer(buffer_name, buffer.clone(), persistent=False)
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise RuntimeError(f"Tensors {left} were not loaded; the backbone {type(backbone).__name__} is not supported.")
    return model.eval()


# ---------------------------------------------------------------- save


def _command(**kwargs) -> str:
    """The `armorm assemble` command line that reproduces this call (the card records how the model was made)."""
    parts = ["armorm", "assemble"]
    for key, value in kwargs.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        parts += [flag, *map(str, value)] if isinstance(value, (list, tuple)) else [flag, str(value)]
    return shlex.join(parts)


def main(
    backbone: str,
    regression: str,
    transform: str,
    gating: str,
    out: str,
    tokenizer: str | None = None,
    dtype: str = "auto",
    datasets: list[str] | None = None,
    eval_results: str | None = None,
    base_model: str | None = None,
    model_id: str | None = None,
) -> ArmoRMForRewardModeling:
    """Assemble the checkpoint folder `out`: weights (safetensors), config with `auto_map`, remote-code files,
    tokenizer with its chat template, and README.md. Returns the assembled model."""
    if dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {list(DTYPES)}, got {dtype!r}.")
    command = _command(
        backbone=backbone,
        regression=regression,
        transform=transform,
        gating=gating,
        out=out,
        tokenizer=tokenizer,
        dtype=dtype,
        datasets=datasets,
        eval_results=eval_results,
        base_model=base_model,
        model_id=model_id,
    )
    # load
    heads = read_heads(regression, transform, gating)
    results = None
    if eval_results is not None:
        results = json.loads(Path(eval_results).read_text(encoding="utf-8"))
        if not isinstance(results, dict):
            raise ValueError(f"{eval_results} must hold a JSON object (the output of `armorm evaluate`).")
    backbone_model = load_backbone(backbone, dtype)
    tok = load_tokenizer(tokenizer or backbone)

    # build
    torch_dtype = backbone_model.dtype if dtype == "auto" else DTYPES[dtype]
    config = build_config(backbone_model.config, heads, tok, dtype=torch_dtype)
    model = assemble_model(config, backbone_model, heads, dtype=torch_dtype)
    del backbone_model

    # save
    if base_model is None and not os.path.exists(split_gguf(backbone)[0]):
        base_model = split_gguf(backbone)[0]  # a Hub id
    if base_model is None:
        logger.warning("The backbone is a local path: pass `--base-model` (its Hub id) to name it in the card.")
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = CardInfo(
        objectives=heads.objectives,
        alphas=heads.alpha.tolist(),
        penalties=heads.penalties.tolist(),
        verbosity_objective=heads.verbosity_objective,
        hidden_size=config.get_text_config().hidden_size,
        gating_hidden_dim=heads.gating_hidden_dim,
        gating_n_hidden=heads.gating_n_hidden,
        gating_temperature=heads.gating_temperature,
        logit_scale=float(heads.gating_state["logit_scale"].item()),
        gating_pattern_text=config.gating_token_pattern_text,
        model_id=model_id or out.name,
        command=command,
        base_model=base_model,
        datasets=list(datasets or []),
        objective_metrics=heads.objective_metrics,
        gating_metrics=heads.gating_metrics,
        eval_results=results,
        sources={"backbone": backbone, "regression": regression, "transform": transform, "gating": gating},
    )
    build_model_card(info).save(out / "README.md")
    logger.info("Wrote the ArmoRM checkpoint %s (%d objectives).", out, len(heads.objectives))
    return model
