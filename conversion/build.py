"""Every stage in one command: [bt →] extract → fit → decorrelate → gate → assemble [→ evaluate], in a reusable work
folder.

    armorm build --backbone B --ratings R1 [R2 ...] --pairs P1 [P2 ...] [--reference P ...] --out CKPT [--work DIR] \\
        [--bt-pairs P ...] [--eval PAIRS] [--extract-batch-size 16 --gate-steps 2000 --bt-epochs 1 ...]

Each stage writes into `--work` (default `<out>.work`) with its report (`<stage>.json`). A rerun reuses a stage when
its report records the same settings and the same content hashes of its inputs, and its outputs are still the files
it wrote; otherwise the stage runs again (an interrupted extraction continues from its last shard). Reuse follows
content, not paths: data edited in place, a stage that produced another file, a deleted output all make the stages
that depend on them run again. The settings of each stage are its own dataclass, composed here: every field `<name>`
of stage `<stage>` is the flag `--<stage>-<name>` (`--gate-steps`, `--extract-batch-size`, …), with that stage's
default and help. With `--eval`, `armorm evaluate` scores the assembled checkpoint on that data (`<work>/evaluate.json`)
and the card gets its results (tables and `model-index`), as `armorm assemble --eval-results` would give them.

With `--bt-pairs`, a first stage fine-tunes a Bradley-Terry reward model from `--backbone` on those pairs (`armorm bt`,
settings `--bt-<name>`) into `<work>/bt`, and every later stage stands on it, as the paper builds ArmoRM on a
Bradley-Terry RM: the features are its last hidden states and the checkpoint's backbone is it, its score head dropped.
The gate's validation pairs stay out of its training data: both stages hold out a pair when `held_out(prompt_key,
val_fraction, seed)`, and settings that would let the Bradley-Terry stage train on the gate's validation prompts
(`--bt-seed` other than `--gate-seed`, or `--bt-val-fraction` below `--gate-val-fraction`, with prompts in common)
are refused.
"""

import dataclasses
import json
import logging
import shutil
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from armorm_io.artifacts import head_fingerprint
from armorm_io.backbone import backbone_fingerprint
from armorm_io.data import data_fingerprint, load_pairs
from armorm_io.features import folder_fingerprint
from armorm_io.files import Fingerprint, file_sha256
from armorm_io.pair_keys import held_out, prompt_key
from armorm_io.reports import file_name, read_report, relative_path, report_path, settings_dict
from conversion import assemble, bt, decorrelate, extract, fit, gate
from conversion.assemble import AssembleSettings, checkpoint_fingerprint
from conversion.bt import BTSettings
from conversion.decorrelate import DecorrelateSettings
from conversion.extract import ExtractSettings
from conversion.fit import FitSettings
from conversion.gate import GateSettings
from conversion.support import find_support
from evaluation import evaluate
from evaluation.evaluate import EvaluateSettings, model_fingerprint
from modeling_armorm.settings import Location, fields_in_order, normalize_locations


logger = logging.getLogger(__name__)

__all__ = ["ARGUMENTS", "BuildConfig", "BuildInputs", "RENAMED_FLAGS", "main", "stage_flags"]

# The settings dataclass of every stage `build` runs, in order.
STAGES = {
    "bt": BTSettings,
    "extract": ExtractSettings,
    "fit": FitSettings,
    "decorrelate": DecorrelateSettings,
    "gate": GateSettings,
    "assemble": AssembleSettings,
    "evaluate": EvaluateSettings,
}


@dataclass(kw_only=True)
class BuildInputs:
    """What `armorm build` reads and writes."""

    backbone: Location = field(metadata={"help": "Hub id, folder or `.gguf` file of the decoder backbone."})
    ratings: list[Location] = field(metadata={"help": "Rating datasets (messages + objective columns)."})
    pairs: list[Location] = field(metadata={"help": "Preference pair datasets for the gating network."})
    bt_pairs: list[Location] | None = field(
        default=None,
        metadata={
            "help": "Preference pairs for a Bradley-Terry backbone (`armorm bt`, settings `--bt-<name>`): the stages "
            "after it use it as the backbone (default: none, `--backbone` as it is)."
        },
    )
    reference: list[Location] | None = field(
        default=None, metadata={"help": "Pair datasets for the verbosity decorrelation (default: `--pairs`)."}
    )
    out: Location = field(metadata={"help": "The checkpoint folder to write."})
    work: Location | None = field(default=None, metadata={"help": "The work folder (default: `<out>.work`)."})
    eval: Location | None = field(
        default=None,
        metadata={"help": "Pairs to evaluate the checkpoint on (`armorm evaluate`); results go in the card."},
    )

    def __post_init__(self):
        normalize_locations(self)


@dataclass(kw_only=True)
class BuildConfig(BuildInputs):
    """`armorm build`: its inputs and each stage's settings (`BuildConfig(..., gate=GateSettings(steps=100))`)."""

    bt: BTSettings = field(default_factory=BTSettings)
    extract: ExtractSettings = field(default_factory=ExtractSettings)
    fit: FitSettings = field(default_factory=FitSettings)
    decorrelate: DecorrelateSettings = field(default_factory=DecorrelateSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    assemble: AssembleSettings = field(default_factory=AssembleSettings)
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)


def stage_flags(stage: str, settings_class: type) -> type:
    """`settings_class` with every field renamed `<stage>_<name>` (the flag `--<stage>-<name>`): the same types,
    defaults and help, so that `HfArgumentParser` gives `armorm build` every stage's flags without a copy. The
    stage's own fields come first, then the shared groups' (`--extract-max-length`, `--extract-dtype`, …)."""
    hints = typing.get_type_hints(settings_class)
    fields = []
    for f in fields_in_order(settings_class):
        default = (
            {"default": f.default} if f.default is not dataclasses.MISSING else {"default_factory": f.default_factory}
        )
        fields.append((f"{stage}_{f.name}", hints[f.name], dataclasses.field(metadata=f.metadata, **default)))
    flags = dataclasses.make_dataclass(f"{settings_class.__name__}Flags", fields, kw_only=True)
    flags._argument_group_name = f"`armorm {stage}` settings"
    return flags


STAGE_FLAGS = {stage: stage_flags(stage, settings) for stage, settings in STAGES.items()}
ARGUMENTS = (BuildInputs, *STAGE_FLAGS.values())
# A stage's renamed flags keep working here too, with the stage's prefix (`--decorrelate-min-verbosity-rows`).
RENAMED_FLAGS = {f"decorrelate-{old}": f"decorrelate-{new}" for old, new in decorrelate.RENAMED_FLAGS.items()}


def _from_flags(inputs: BuildInputs, flags) -> BuildConfig:
    """The `BuildConfig` of a command line: the inputs, and each stage's settings from its prefixed flags."""
    by_stage = {type(f): f for f in flags}
    settings = {}
    for stage, settings_class in STAGES.items():
        given = by_stage[STAGE_FLAGS[stage]]
        values = {f.name: getattr(given, f"{stage}_{f.name}") for f in dataclasses.fields(settings_class)}
        settings[stage] = settings_class(**values)
    fields = {f.name: getattr(inputs, f.name) for f in dataclasses.fields(BuildInputs)}
    return BuildConfig(**fields, **settings)


# ---------------------------------------------------------------- reuse


def _as_written(entries: dict, paths) -> dict:
    """`inputs` as a report records them (see `armorm_io.reports.write_report`)."""

    def one(entry):
        return [one(item) for item in entry] if isinstance(entry, list) else entry.as_dict(paths)

    return {name: one(entry) for name, entry in entries.items()}


def _reusable(report_file: Path, config, inputs: dict, outputs: dict, public: bool = False) -> bool:
    """Whether the report at `report_file` was written by a run with these settings on inputs of this content, and
    its outputs are still what it wrote (`outputs`: name → the function that fingerprints that output now)."""
    report = read_report(report_file)
    if report is None:
        return False
    paths = file_name if public else (lambda value: relative_path(value, report_file.parent))
    if report["settings"] != json.loads(json.dumps(settings_dict(config, paths))):
        return False
    if report["inputs"] != _as_written(inputs, paths):
        return False
    return all(
        report["outputs"].get(name, {}).get("sha256") == fingerprint().sha256 for name, fingerprint in outputs.items()
    )


def _run(stage: str, label: str, reusable: bool, run) -> None:
    if reusable:
        logger.info("[build] %s: done earlier, reused", label)
        return
    logger.info("[build] %s ...", label)
    run()


# ---------------------------------------------------------------- the stages


def _bradley_terry(config: BuildConfig, work: Path) -> str:
    """The `bt` stage: a Bradley-Terry reward model fine-tuned from `--backbone` on `--bt-pairs` into `<work>/bt`
    (`armorm bt`), the backbone of every later stage. Returns that folder."""
    _check_bt_held_out(config)
    out = work / "bt"
    stage = bt.BTConfig(**dataclasses.asdict(config.bt), backbone=config.backbone, pairs=config.bt_pairs, out=str(out))
    inputs = {
        "backbone": backbone_fingerprint(config.backbone),
        "pairs": [data_fingerprint(data) for data in config.bt_pairs],
    }
    trained_pairs = out / bt.TRAINED_PAIRS_NAME
    outputs = {
        "model": lambda: Fingerprint(str(out / "model.safetensors"), bt.weights_sha256(out)),
        "trained_pairs": lambda: Fingerprint(
            str(trained_pairs), file_sha256(trained_pairs) if trained_pairs.is_file() else None
        ),
    }
    reusable = _reusable(out / bt.REPORT_NAME, stage, inputs, outputs)
    if not reusable and (out / bt.REPORT_NAME).is_file():
        # A finished run of other settings or inputs, or files changed since: the folder is build's own. (A run
        # interrupted before its report resumes, or `armorm bt` refuses with the fix.)
        logger.info("[build] %s holds a Bradley-Terry model of other pairs or settings: training again.", out)
        shutil.rmtree(out)
    _run("bt", "bt", reusable, lambda: bt.main(stage))
    return str(out)


def _check_bt_held_out(config: BuildConfig) -> None:
    """Refuse `--bt-*` settings that let the Bradley-Terry stage train on the gate's validation pairs.

    Both stages hold a pair out when `held_out(prompt_key, val_fraction, seed)`, a seeded uniform draw per prompt
    below the fraction: with the same seed and a Bradley-Terry fraction at least the gate's, every prompt the gate
    validates on is held out of the Bradley-Terry training by construction. Other settings are refused when the
    prompts of `--pairs` the gate validates on are among those of `--bt-pairs` it would train on."""
    bt_settings, gate_settings = config.bt, config.gate
    nested = bt_settings.seed == gate_settings.seed and bt_settings.val_fraction >= gate_settings.val_fraction
    if nested or gate_settings.val_fraction == 0:
        return

    def prompt_keys(locations: list[str], **kwargs) -> torch.Tensor:
        rows = [load_pairs(data, **kwargs) for data in locations]
        return torch.tensor([prompt_key(chosen) for r in rows for chosen in r.chosen], dtype=torch.int64)

    # The gate's pairs as `armorm extract` reads them; the Bradley-Terry pairs as `armorm bt` reads them.
    gate_keys = prompt_keys(config.pairs, split=config.extract.split, name=config.extract.name)
    bt_keys = prompt_keys(config.bt_pairs)
    validation = gate_keys[held_out(gate_keys, gate_settings.val_fraction, gate_settings.seed)].unique()
    trained = bt_keys[~held_out(bt_keys, bt_settings.val_fraction, bt_settings.seed)]
    seen = int(torch.isin(validation, trained).sum())
    if seen:
        raise ValueError(
            f"With `--bt-val-fraction {bt_settings.val_fraction} --bt-seed {bt_settings.seed}`, the Bradley-Terry "
            f"stage would train on {seen} of the {len(validation)} prompts the gate validates on "
            f"(`--gate-val-fraction {gate_settings.val_fraction} --gate-seed {gate_settings.seed}`). Give both "
            "stages the same seed and `--bt-val-fraction` at least `--gate-val-fraction` (the defaults do), or "
            "`--bt-pairs` that share no prompt with `--pairs`."
        )


def _extract_all(config: BuildConfig, work: Path, backbone: str) -> dict[str, list[str]]:
    """One features folder per dataset, extracted with `backbone`; extraction resumes inside a folder by itself."""
    folders = {"ratings": [], "pairs": [], "reference": []}
    jobs = [("ratings", d) for d in config.ratings] + [("pairs", d) for d in config.pairs]
    jobs += [("reference", d) for d in config.reference or []]
    settings = dataclasses.asdict(config.extract)
    for role, data in jobs:
        folder = work / "features" / f"{role}-{len(folders[role])}"
        folders[role].append(str(folder))
        kind = "ratings" if role == "ratings" else "pairs"
        stage = extract.ExtractConfig(
            **{**settings, "objectives": settings["objectives"] if kind == "ratings" else None},
            backbone=backbone, data=data, kind=kind, out=str(folder),
        )  # fmt: skip
        inputs = {"backbone": backbone_fingerprint(backbone), "data": data_fingerprint(data)}
        reusable = _reusable(
            folder / "extract.json", stage, inputs, {"features": lambda f=folder: folder_fingerprint(f)}
        )
        if not reusable and not extract.can_resume(stage):
            # The folder is build's own: data edited in place or other settings mean extracting it again.
            logger.info("[build] %s holds an extraction of other data or settings: extracting again.", folder)
            extract.clear(folder)
        _run("extract", f"extract-{folder.name}", reusable, lambda s=stage: extract.main(s))
    return folders


def main(config: BuildConfig | BuildInputs | None = None, /, *flags, **kwargs) -> str:
    """Run (or reuse) every stage and return the checkpoint folder. Pass a `BuildConfig`, or its fields as keywords
    (`gate=GateSettings(steps=100)`); the command line gives `BuildInputs` and each stage's flags."""
    if config is None:
        config = BuildConfig(**kwargs)
    elif not isinstance(config, BuildConfig):
        config = _from_flags(config, flags)
    work = Path(config.work or f"{config.out}.work")
    work.mkdir(parents=True, exist_ok=True)
    # The paper's backbone is a Bradley-Terry RM: with `--bt-pairs` it is made first, and every later stage reads it.
    backbone = _bradley_terry(config, work) if config.bt_pairs else config.backbone
    folders = _extract_all(config, work, backbone)
    heads = {name: str(work / f"{name}.safetensors") for name in ("regression", "transform", "gating")}

    # The `preference` objective is learned from the gate's own pairs, cross-fitted so the gate never sees a pair
    # scored by a head fitted on it (`conversion.preference`).
    preference_pairs = folders["pairs"] if config.fit.preference else None
    fit_config = fit.FitConfig(
        **dataclasses.asdict(config.fit), features=folders["ratings"], out=heads["regression"],
        preference_pairs=preference_pairs,
    )  # fmt: skip
    inputs = {"features": [folder_fingerprint(f) for f in folders["ratings"]]}
    if preference_pairs:
        inputs["preference_pairs"] = [folder_fingerprint(f) for f in preference_pairs]
    reusable = _reusable(report_path("fit", heads["regression"]), fit_config, inputs, _head("regression", heads))
    _run("fit", "fit", reusable, lambda: fit.main(fit_config))

    reference = folders["reference"] or folders["pairs"]
    decorrelate_config = decorrelate.DecorrelateConfig(
        **dataclasses.asdict(config.decorrelate), regression=heads["regression"], reference=reference,
        out=heads["transform"],
    )  # fmt: skip
    # A regression file of armorm 0.1 has its support metrics in the `fit.json` beside it: that file is an input too.
    support_inputs = find_support(heads["regression"]).inputs
    inputs = {
        "regression": head_fingerprint(heads["regression"]),
        "reference": [folder_fingerprint(f) for f in reference],
        **support_inputs,
    }
    reusable = _reusable(
        report_path("decorrelate", heads["transform"]), decorrelate_config, inputs, _head("transform", heads)
    )
    _run("decorrelate", "decorrelate", reusable, lambda: decorrelate.main(decorrelate_config))

    gate_config = gate.GateConfig(
        **dataclasses.asdict(config.gate), features=folders["pairs"], regression=heads["regression"],
        transform=heads["transform"], out=heads["gating"],
    )  # fmt: skip
    inputs = {
        "features": [folder_fingerprint(f) for f in folders["pairs"]],
        "regression": head_fingerprint(heads["regression"]),
        "transform": head_fingerprint(heads["transform"]),
        **support_inputs,
    }
    reusable = _reusable(report_path("gate", heads["gating"]), gate_config, inputs, _head("gating", heads))
    _run("gate", "gate", reusable, lambda: gate.main(gate_config))

    settings = dataclasses.asdict(config.assemble)
    # Hub ids among the inputs go to the card's metadata, unless `--assemble-datasets` names them.
    data = [*(config.bt_pairs or []), *config.ratings, *config.pairs]
    datasets = settings.pop("datasets") or [d for d in data if not Path(d).exists()]
    if settings["base_model"] is None and backbone != config.backbone and not Path(config.backbone).exists():
        settings["base_model"] = config.backbone  # the Hub model the Bradley-Terry backbone was fine-tuned from
    assemble_config = assemble.AssembleConfig(
        **settings, datasets=datasets or None, backbone=backbone, out=config.out, **heads
    )
    inputs = {"backbone": backbone_fingerprint(backbone)}
    inputs.update({name: head_fingerprint(path) for name, path in heads.items()})
    if config.eval is None:
        if config.evaluate != EvaluateSettings():
            logger.warning("[build] `--evaluate-*` settings are given but no `--eval` data: nothing is evaluated.")
        checkpoint = {"checkpoint": lambda: checkpoint_fingerprint(config.out)}
        reusable = _reusable(report_path("assemble", config.out), assemble_config, inputs, checkpoint, public=True)
        _run("assemble", "assemble", reusable, lambda: assemble.main(assemble_config))
    else:
        _assemble_and_evaluate(config, work, assemble_config, inputs)
    logger.info("[build] checkpoint: %s", config.out)
    return config.out


def _assemble_and_evaluate(config: BuildConfig, work: Path, assemble_config, inputs: dict) -> None:
    """assemble → evaluate the checkpoint on `config.eval` → the card with the results. A rerun reuses each step: the
    evaluation's model hash leaves out the card (`checkpoints.NOT_SCORED`), so writing the results into the card does
    not make the evaluation stale, and the report the card step leaves is that of `assemble --eval-results`."""
    if assemble_config.eval_results is not None:
        raise ValueError("`--eval` puts its own results in the card: drop `--assemble-eval-results` (or `--eval`).")
    results = work / "evaluate.json"
    evaluated = dataclasses.replace(assemble_config, eval_results=str(results))
    report = report_path("assemble", config.out)
    checkpoint = {"checkpoint": lambda: checkpoint_fingerprint(config.out)}

    def with_results() -> dict:
        if not results.is_file():
            return {**inputs, "eval_results": Fingerprint(str(results), None)}
        return {**inputs, "eval_results": Fingerprint(str(results), file_sha256(results))}

    assembled = _reusable(report, evaluated, with_results(), checkpoint, public=True) or _reusable(
        report, assemble_config, inputs, checkpoint, public=True
    )
    _run("assemble", "assemble", assembled, lambda: assemble.main(assemble_config))

    evaluate_config = evaluate.EvaluateConfig(
        **dataclasses.asdict(config.evaluate), model=config.out, data=config.eval, out=str(results)
    )
    evaluate_inputs = {"model": model_fingerprint(config.out), "data": data_fingerprint(config.eval)}
    reusable = _reusable(results, evaluate_config, evaluate_inputs, {})
    _run("evaluate", "evaluate", reusable, lambda: evaluate.main(evaluate_config))

    reusable = _reusable(report, evaluated, with_results(), checkpoint, public=True)
    _run("assemble", "model card with the evaluation", reusable, lambda: assemble.update_card(evaluated))


def _head(name: str, heads: dict[str, str]) -> dict:
    path = Path(heads[name])
    return {name: lambda: head_fingerprint(path) if path.is_file() else Fingerprint(str(path), None)}
