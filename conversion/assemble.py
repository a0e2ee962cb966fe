"""Assemble an ArmoRM checkpoint from a backbone and the three head files, with its tokenizer and model card.

    armorm assemble --backbone HuggingFaceTB/SmolLM2-135M-Instruct --regression regression.safetensors \\
        --transform transform.safetensors --gating gating.safetensors --out armorm-smollm2 \\
        [--tokenizer PATH] [--dtype auto|float32|bfloat16|float16] [--datasets ID ...] [--eval-results JSON] \\
        [--base-model ID] [--model-id ID]

`--backbone` is a folder, a Hub id or a `.gguf` file (dequantized on load). The weights are loaded loudly: every
tensor of the checkpoint comes from exactly one input (backbone → `model.*`, W → `regression_layer.weight`,
T → `reward_transform_matrix`, the gating state dict → `gating.*`), and the key sets and shapes are checked before
anything is saved. The stage reports beside the head files (`fit.json`, `decorrelate.json`, `gate.json`, and each
features folder's `extract.json`) give the card its metrics and the whole build's commands; a report is used only
when the content hash it records for its output is the head file's. The checkpoint loads with
`import modeling_armorm` and with `trust_remote_code=True`.

The config and the card record the score's scale (`ArmoRMConfig.score_statistics`): the distribution of the
assembled heads' scores on the build's reference pairs, both answers of every pair the gate was trained and validated
on (the features folders `gate.json` names, when they are still the ones it read), computed from the stored features
with no backbone forward. Without them (a gating file without its report, features moved or changed) a warning says
so and nothing is recorded.
"""

import hashlib
import json
import logging
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel

from armorm_io.artifacts import head_fingerprint, load_gating, load_regression, load_transform
from armorm_io.backbone import backbone_fingerprint, load_backbone, load_tokenizer, split_gguf
from armorm_io.features import folder_fingerprint, load_pair_features
from armorm_io.files import Fingerprint, file_sha256, make_readable
from armorm_io.reports import (
    command_line,
    file_name,
    read_report,
    report_for,
    report_path,
    settings_dict,
    write_report,
)
from conversion.model_card import CardInfo, build_model_card
from conversion.state_dict import check_state_dict, expected_shapes
from evaluation.rewardbench import rewardbench_scores
from evaluation.rewardbench_score import read_accuracies
from modeling_armorm import (
    ArmoRMConfig,
    ArmoRMForRewardModeling,
    ArmoRMGatingNetwork,
    gating_pattern_from_tokenizer,
    turn_header_patterns_from_tokenizer,
)
from modeling_armorm.heads import (
    CHUNK_ROWS,
    chunked_rewards,
    score_statistics,
    scores,
    set_length_objective,
    transform,
)
from modeling_armorm.scoring import pad_token_id
from modeling_armorm.settings import DtypeSettings, Location, normalize_locations, torch_dtype


logger = logging.getLogger(__name__)

__all__ = [
    "ARGUMENTS",
    "AssembleConfig",
    "AssembleSettings",
    "Heads",
    "assemble_model",
    "build_config",
    "load_eval_results",
    "main",
    "read_heads",
    "read_score_statistics",
    "reference_features",
    "reference_scores",
    "update_card",
    "write_card",
]


@dataclass(kw_only=True)
class AssembleSettings(DtypeSettings):
    """The knobs of `armorm assemble` (the ones `armorm build` passes on as `--assemble-<name>`), with the shared
    dtype: the one the backbone is loaded and saved in."""

    tokenizer: Location | None = field(
        default=None, metadata={"help": "Tokenizer with the chat template (default: the backbone's)."}
    )
    datasets: list[str] | None = field(default=None, metadata={"help": "Hub ids of the training data, for the card."})
    eval_results: Location | None = field(
        default=None,
        metadata={"help": "Results JSON of `armorm evaluate` (or RewardBench's), in the card and its `model-index`."},
    )
    base_model: str | None = field(
        default=None, metadata={"help": "Hub id of the backbone for the card (default: `--backbone` if an id)."}
    )
    model_id: str | None = field(
        default=None, metadata={"help": "Hub id the card's usage snippet loads (default: the `--out` folder's name)."}
    )


@dataclass(kw_only=True)
class AssembleConfig(AssembleSettings):
    """`armorm assemble`: what it reads and writes, and its settings."""

    backbone: Location = field(metadata={"help": "The backbone: a folder, a Hub id, or a `.gguf` file."})
    regression: Location = field(metadata={"help": "`regression.safetensors` of `armorm fit` (W, α, objectives)."})
    transform: Location = field(metadata={"help": "`transform.safetensors` of `armorm decorrelate` (T, λ)."})
    gating: Location = field(metadata={"help": "`gating.safetensors` of `armorm gate` (the gating network)."})
    out: Location = field(metadata={"help": "Folder of the checkpoint to write."})

    def __post_init__(self):
        super().__post_init__()
        normalize_locations(self)


ARGUMENTS = (AssembleConfig,)


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
    gated_objectives: list[int] | None  # the objectives the gating softmax runs over (None: all)
    length_objective: int | None  # the objective whose reward is the answer's length, computed in the forward
    gating_state: dict[str, torch.Tensor]
    gating_temperature: float
    gating_hidden_dim: int
    gating_n_hidden: int
    objective_metrics: dict[str, dict[str, float]]
    gating_metrics: dict[str, float]
    reports: dict[str, tuple[Path, dict]] = field(default_factory=dict)  # stage → (its folder, its report)


# Per-objective metrics each stage's report holds, as the card's table shows them.
_FIT_METRICS = ("rows", "val_mse", "pearson", "spearman", "pairwise_accuracy")
_DECORRELATE_METRICS = ("spearman_before", "spearman_after")


def _objective_metrics(reports: dict[str, tuple[Path, dict]], objectives: list[str]) -> dict[str, dict[str, float]]:
    metrics = {name: {} for name in objectives}
    if "fit" in reports:
        for name, entry in reports["fit"][1]["metrics"]["objectives"].items():
            if name in metrics:
                metrics[name].update({key: entry[key] for key in _FIT_METRICS if entry.get(key) is not None})
    if "decorrelate" in reports:
        for key in _DECORRELATE_METRICS:
            for name, value in (reports["decorrelate"][1]["metrics"].get(key) or {}).items():
                if name in metrics and value is not None:
                    metrics[name][key] = value
    return {name: entry for name, entry in metrics.items() if entry}


def _same_objectives(path, found, objectives: list[str], stage: str) -> None:
    if found is not None and list(found) != objectives:
        raise ValueError(
            f"{path} was made for the objectives {list(found)}, but the regression file has {objectives}. "
            f"Re-run `armorm {stage}` with this regression file."
        )


def read_heads(regression: str, transform: str, gating: str) -> Heads:
    weight, alpha, objectives = load_regression(regression)
    matrix, penalties, transform_meta = load_transform(transform)
    gating_state, gating_meta = load_gating(gating)
    length_objective = transform_meta.get("length_objective")
    if length_objective is not None:
        # Decorrelated from the answer's length: the model computes that reward in its forward, W's row is unused.
        objectives = [*objectives, length_objective]
        weight = torch.cat([weight, weight.new_zeros(1, weight.shape[1])])
        alpha = torch.cat([alpha, alpha.new_zeros(1)])
    _same_objectives(transform, transform_meta.get("objectives"), objectives, "decorrelate")
    _same_objectives(gating, gating_meta.get("objectives"), objectives, "gate")
    gated = gating_meta.get("gated_objectives")  # names; absent in a file of another tool: all objectives
    unknown = [name for name in gated or [] if name not in objectives]
    if unknown:
        raise ValueError(f"{gating}: gated objectives {unknown} are not among {objectives}; re-run `armorm gate`.")
    verbosity = transform_meta.get("verbosity")  # the objective's name, written by `armorm decorrelate`
    if verbosity is not None and verbosity not in objectives:
        raise ValueError(f"{transform}: the verbosity objective `{verbosity}` is not one of {objectives}.")

    reports = {
        stage: (Path(path).parent, report)
        for stage, path, output in (
            ("fit", regression, "regression"),
            ("decorrelate", transform, "transform"),
            ("gate", gating, "gating"),
        )
        if (report := report_for(stage, path, output)) is not None
    }
    final = reports["gate"][1]["metrics"]["final"] if "gate" in reports else gating_meta
    gating_metrics = {
        key: float(final[key]) for key in ("val_accuracy", "train_accuracy") if final.get(key) is not None
    }
    return Heads(
        objectives=objectives,
        weight=weight,
        alpha=alpha,
        matrix=matrix.float(),
        penalties=penalties.float(),
        verbosity_objective=objectives.index(verbosity) if verbosity is not None else None,
        gated_objectives=[objectives.index(name) for name in gated] if gated is not None else None,
        length_objective=objectives.index(length_objective) if length_objective is not None else None,
        gating_state={key: value.float() for key, value in gating_state.items()},
        gating_temperature=gating_meta["temperature"],
        gating_hidden_dim=gating_meta["hidden_dim"],
        gating_n_hidden=gating_meta["n_hidden"],
        objective_metrics=_objective_metrics(reports, objectives),
        gating_metrics=gating_metrics,
        reports=reports,
    )


# ---------------------------------------------------------------- build


def reference_features(heads: Heads) -> list[Path] | None:
    """The pairs features folders the gate was trained and validated on, as its report `gate.json` names them; None
    (with a warning saying why) when there is no report or a folder is gone or holds other features now."""
    if "gate" not in heads.reports:
        logger.warning(
            "The gating file has no `gate.json` of its own beside it, so its reference pairs are unknown: the score "
            "statistics (`config.score_statistics`, for `normalize=True`) are not recorded."
        )
        return None
    folder, report = heads.reports["gate"]
    entries = report["inputs"].get("features") or []
    folders = [(folder / entry["path"]).resolve() for entry in entries]
    for path, entry in zip(folders, entries):
        if not path.is_dir() or folder_fingerprint(path).sha256 != entry["sha256"]:
            logger.warning(
                "%s, a features folder of `gate.json`, is gone or holds other features now: the score statistics "
                "(`config.score_statistics`, for `normalize=True`) are not recorded. Assemble where the gate's "
                "features are to record them.",
                path,
            )
            return None
    return folders or None


@torch.no_grad()
def reference_scores(heads: Heads, features: dict[str, torch.Tensor]) -> torch.Tensor:
    """s = g(h_x) · (r T) of both answers of every pair of `features` (`embeddings` (N, 2, d), `prompt_embeddings`
    (N, d), `answer_lengths` (N, 2) with a length objective), with the heads as the checkpoint holds them: the
    model's math on stored features, CHUNK_ROWS pairs at a time. → (N, 2)"""
    k, d = heads.weight.shape
    gating = ArmoRMGatingNetwork(
        d, k, heads.gating_hidden_dim, heads.gating_n_hidden, heads.gating_temperature, heads.gated_objectives
    )
    gating.load_state_dict(heads.gating_state, strict=True)
    gating.eval()
    chunks = []
    for start in range(0, len(features["embeddings"]), CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        r = chunked_rewards(features["embeddings"][rows], heads.weight)  # (n, 2, k), the length row of W is zero
        if heads.length_objective is not None:
            r = set_length_objective(r, features["answer_lengths"][rows], heads.length_objective)
        g = gating(features["prompt_embeddings"][rows].float())  # (n, k): both answers share the prompt
        chunks.append(scores(g[:, None], transform(r, heads.matrix)))  # (n, 2)
    return torch.cat(chunks)


def read_score_statistics(heads: Heads) -> dict[str, float] | None:
    """`score_statistics` of the heads' scores on the gate's reference pairs (`reference_features`), both
    answers of each; None when those pairs are not at hand."""
    folders = reference_features(heads)
    if folders is None:
        return None
    features, _ = load_pair_features(folders)
    statistics = score_statistics(reference_scores(heads, features))
    logger.info(
        "Scores on the %d reference answers: mean %.4g, std %.4g, 1-99 %% from %.4g to %.4g.",
        statistics["count"], statistics["mean"], statistics["std"], statistics["p1"], statistics["p99"],
    )  # fmt: skip
    return statistics


def build_config(
    backbone_config,
    heads: Heads,
    tokenizer,
    dtype: torch.dtype | None = None,
    score_statistics: dict[str, float] | None = None,
) -> ArmoRMConfig:
    """`ArmoRMConfig`: the backbone's config nested, the heads' sizes, the tokenizer's gating pattern, turn headers
    and pad id, and the score's scale (`read_score_statistics`) when given."""
    text_config = backbone_config.to_dict()
    # A GGUF backbone is dequantized: the checkpoint holds plain tensors, so no quantization config goes with it; and
    # the backbone's local path (`_name_or_path`) is not published with the checkpoint.
    text_config.pop("quantization_config", None)
    text_config.pop("_name_or_path", None)
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
        # Padding is masked out (the last real token comes from the attention mask), so eos is a safe pad; the saved
        # tokenizer gets it too, for the tools that pad with the tokenizer (TRL).
        logger.warning("The tokenizer has no pad token: using its eos token %r as pad.", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_token_id(tokenizer))
    config = ArmoRMConfig(
        text_config=text_config,
        num_objectives=len(heads.objectives),
        objective_names=heads.objectives,
        verbosity_objective=heads.verbosity_objective,
        gated_objectives=heads.gated_objectives,
        length_objective=heads.length_objective,
        gating_hidden_dim=heads.gating_hidden_dim,
        gating_n_hidden=heads.gating_n_hidden,
        gating_temperature=heads.gating_temperature,
        **gating_pattern_from_tokenizer(tokenizer).config_kwargs(),
        turn_header_patterns=turn_header_patterns_from_tokenizer(tokenizer),
        score_statistics=score_statistics,
    )
    config.pad_token_id = pad_token_id(tokenizer)
    return config


_HINTS = {
    "model.": "The backbone does not match the config built from it; pass the same `--backbone` as for extraction.",
    "regression_layer.": "W must be (k, d) with d the backbone's hidden size: fit it (`armorm fit`) on features "
    "extracted with this backbone.",
    "reward_transform_matrix": "T must be (k, k): decorrelate (`armorm decorrelate`) this regression file.",
    "gating.": "The gating network maps the prompt feature (d) to k weights: train it (`armorm gate`) on this "
    "backbone's features with this regression and transform.",
}


def assemble_model(
    config: ArmoRMConfig, backbone: PreTrainedModel, heads: Heads, dtype: torch.dtype | None = None
) -> ArmoRMForRewardModeling:
    """Instantiate `ArmoRMForRewardModeling` and load every tensor from the backbone and the heads, checking the key
    sets and shapes first: nothing is left at its random initialisation."""
    expected = expected_shapes(config)
    backbone_state = {f"model.{key}": value.to(dtype or value.dtype) for key, value in backbone.state_dict().items()}
    sources = {
        "model.": ("The backbone", backbone_state),
        "regression_layer.": ("The regression file (W)", {"regression_layer.weight": heads.weight}),
        "reward_transform_matrix": ("The transform file (T)", {"reward_transform_matrix": heads.matrix}),
        "gating.": ("The gating file", {f"gating.{key}": value for key, value in heads.gating_state.items()}),
    }
    state = {}
    for prefix, (source, tensors) in sources.items():
        owned = {key: shape for key, shape in expected.items() if key.startswith(prefix)}
        check_state_dict({key: tuple(t.shape) for key, t in tensors.items()}, owned, source, _HINTS[prefix])
        state.update(tensors)
    # Every model key belongs to one source: a new module in the model class fails here rather than load randomly.
    check_state_dict({key: tuple(t.shape) for key, t in state.items()}, expected, "The assembled state dict", "")
    # Built on the meta device, then the loaded tensors are assigned: no second copy of an 8B backbone in memory.
    with torch.device("meta"):
        model = ArmoRMForRewardModeling(config)
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


def upstream_reports(heads: Heads) -> list[tuple[Path, dict]]:
    """Every stage report of the build with its folder, in pipeline order: each features folder's `extract.json` (as
    the fit, decorrelate and gate reports name their inputs), then fit, decorrelate and gate."""
    extracts, seen = [], set()
    for folder, report in heads.reports.values():
        for role in ("features", "reference"):
            for entry in report["inputs"].get(role) or []:
                features = (folder / entry["path"]).resolve()
                extract = read_report(features / "extract.json")
                if extract is not None and features not in seen:
                    seen.add(features)
                    extracts.append((features, extract))
    stages = [heads.reports[stage] for stage in ("fit", "decorrelate", "gate") if stage in heads.reports]
    return extracts + stages


def public_view(folder: Path, report: dict) -> dict:
    """What the card shows of a stage report: the stage, its command and settings, with every local path (relative
    to the report's folder) reduced to its file name, so no local folder layout leaves the machine."""

    def name(value):
        if isinstance(value, list):
            return [name(item) for item in value]
        if isinstance(value, dict):
            return {key: name(item) for key, item in value.items()}
        if isinstance(value, str) and value and (folder / value).exists():
            return Path(os.path.normpath(folder / value)).name
        return value

    command = shlex.join(name(shlex.split(report["command"])))
    return {"stage": report["stage"], "command": command, "settings": name(report["settings"])}


def _card_info(config: AssembleConfig, heads: Heads, model_config: ArmoRMConfig, results, build) -> CardInfo:
    return CardInfo(
        objectives=heads.objectives,
        alphas=heads.alpha.tolist(),
        penalties=heads.penalties.tolist(),
        verbosity_objective=heads.verbosity_objective,
        hidden_size=model_config.get_text_config().hidden_size,
        gating_hidden_dim=heads.gating_hidden_dim,
        gating_n_hidden=heads.gating_n_hidden,
        gating_temperature=heads.gating_temperature,
        logit_scale=float(heads.gating_state["logit_scale"].item()),
        gating_pattern_text=model_config.gating_token_pattern_text,
        model_id=config.model_id or Path(config.out).name,
        base_model=_base_model(config),
        datasets=list(config.datasets or []),
        objective_metrics=heads.objective_metrics,
        gating_metrics=heads.gating_metrics,
        eval_results=results,
        build=build,
        score_statistics=model_config.score_statistics,
    )


def checkpoint_fingerprint(folder: str | Path) -> Fingerprint:
    """A checkpoint folder's `Fingerprint`: its config and card, and every file's name and size (hashing an 8B
    model's weights on every rerun of `armorm build` would cost minutes)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return Fingerprint(str(folder), None)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "assemble.json")
    listing = [[p.name, p.stat().st_size] for p in files]
    listing += [(folder / name).read_text(encoding="utf-8") for name in ("config.json", "README.md")]
    return Fingerprint(str(folder), hashlib.sha256(json.dumps(listing).encode()).hexdigest())


def _base_model(config: AssembleConfig) -> str | None:
    if config.base_model is not None:
        return config.base_model
    source = split_gguf(config.backbone)[0]
    if not Path(source).exists():
        return source  # a Hub id
    logger.warning("The backbone is a local path: pass `--base-model` (its Hub id) to name it in the card.")
    return None


def load_eval_results(path: str) -> dict:
    """The evaluation the card shows: `armorm evaluate`'s results file, or a RewardBench results file (subset
    accuracies at the top level, as in allenai/reward-bench-results), read into the same shape."""
    results = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(results, dict):
        raise ValueError(f"{path} must hold a JSON object (the results of `armorm evaluate`).")
    if isinstance(results.get("subsets"), dict):
        return results
    accuracies, _ = read_accuracies(path)
    if not accuracies:
        raise ValueError(
            f"{path} is neither the results of `armorm evaluate` (no `subsets`) nor a RewardBench results file (no "
            "subset accuracy such as `alpacaeval-easy`); run `armorm evaluate` to make one."
        )
    subsets = {name: {"accuracy": value} for name, value in accuracies.items()}
    return {"subsets": subsets, "rewardbench": rewardbench_scores(accuracies)}


def write_card(config: AssembleConfig, heads: Heads, model_config: ArmoRMConfig) -> None:
    """Write the checkpoint's model card (README.md) and `assemble.json` beside the saved weights."""
    out = Path(config.out)
    results = load_eval_results(config.eval_results) if config.eval_results is not None else None
    build = [public_view(folder, upstream) for folder, upstream in upstream_reports(heads)]
    this = {"stage": "assemble", "command": command_line("assemble", config, paths=file_name)}
    build.append({**this, "settings": settings_dict(config, file_name)})
    if results is not None and results.get("stage") == "evaluate":
        build.append(public_view(Path(config.eval_results).parent, results))  # it ran on this checkpoint
    card = _card_info(config, heads, model_config, results, build)
    build_model_card(card).save(out / "README.md")
    inputs = {
        "backbone": backbone_fingerprint(config.backbone),
        **{name: head_fingerprint(getattr(config, name)) for name in ("regression", "transform", "gating")},
    }
    if config.eval_results is not None:
        inputs["eval_results"] = Fingerprint(config.eval_results, file_sha256(config.eval_results))
    # Published with the checkpoint: local paths as file names only.
    write_report(
        report_path("assemble", out),
        "assemble",
        config,
        inputs=inputs,
        outputs={"checkpoint": checkpoint_fingerprint(out)},
        metrics={"build": [stage for stage in build if stage["stage"] not in ("assemble", "evaluate")]},
        public=True,
    )
    make_readable(out)


def update_card(config: AssembleConfig) -> None:
    """Write the card and report of the checkpoint `config.out`, assembled earlier from the same inputs, as
    `main(config)` would (e.g. with new `eval_results`), without loading the backbone or saving the weights again."""
    heads = read_heads(config.regression, config.transform, config.gating)
    write_card(config, heads, ArmoRMConfig.from_pretrained(config.out))


def main(config: AssembleConfig | None = None, /, **kwargs) -> ArmoRMForRewardModeling:
    """Assemble the checkpoint folder `config.out`: weights (safetensors), config with `auto_map`, remote-code files,
    tokenizer with its chat template, README.md (the model card) and the report `assemble.json` with the whole
    build. Returns the assembled model. Pass an `AssembleConfig`, or its fields as keywords."""
    config = config or AssembleConfig(**kwargs)
    # load
    heads = read_heads(config.regression, config.transform, config.gating)
    if config.eval_results is not None:
        load_eval_results(config.eval_results)  # a wrong file fails before the slow part
    statistics = read_score_statistics(heads)  # before the backbone: the features and it need not fit together
    backbone_model = load_backbone(config.backbone, config.dtype)
    tokenizer = load_tokenizer(config.tokenizer or config.backbone)

    # build
    dtype = backbone_model.dtype if config.dtype == "auto" else torch_dtype(config.dtype)
    model_config = build_config(backbone_model.config, heads, tokenizer, dtype=dtype, score_statistics=statistics)
    model = assemble_model(model_config, backbone_model, heads, dtype=dtype)
    del backbone_model

    # save
    out = Path(config.out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_card(config, heads, model_config)
    logger.info("Wrote the ArmoRM checkpoint %s (%d objectives).", out, len(heads.objectives))
    return model
