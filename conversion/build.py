"""Every stage in one command: extract → fit → decorrelate → gate → assemble, in a work folder that a rerun reuses.

    armorm build --backbone B --ratings R1 [R2 ...] --pairs P1 [P2 ...] [--reference P ...] --out CKPT [--work DIR]

Each stage writes into `--work` (default `<out>.work`) and, once finished, a stamp `<stage>.done.json` with the
settings it ran with. A rerun skips every stage whose stamp matches and resumes the others (extraction continues
from its last complete shard), so an interrupted build loses at most the stage it was in. Options are passed to the
stage that owns them; an option not given keeps that stage's default.
"""

import json
import logging
from functools import partial
from pathlib import Path

import torch

from conversion import assemble, decorrelate, extract, fit, gate
from conversion.artifacts import load_regression, save_transform


logger = logging.getLogger(__name__)

# build option -> (stage, that stage's parameter): the stage functions keep the defaults.
STAGE_OPTIONS = {
    "split": ("extract", "split"),
    "max_length": ("extract", "max_length"),
    "batch_size": ("extract", "batch_size"),
    "dtype": ("extract", "dtype"),
    "truncate_prompt": ("extract", "truncate_prompt"),
    "device": ("extract", "device"),
    "alphas": ("fit", "alphas"),
    "threshold": ("decorrelate", "threshold"),
    "steps": ("gate", "steps"),
    "gate_batch_size": ("gate", "batch_size"),
    "lr": ("gate", "lr"),
    "hidden_dim": ("gate", "hidden_dim"),
    "n_hidden": ("gate", "n_hidden"),
    "temperature": ("gate", "temperature"),
    "beta_init": ("gate", "beta_init"),
    "eval_every": ("gate", "eval_every"),
    "seed": ("gate", "seed"),
    "checkpoint_dtype": ("assemble", "dtype"),
    "model_id": ("assemble", "model_id"),
    "eval_results": ("assemble", "eval_results"),
}


def add_arguments(parser):
    parser.add_argument("--backbone", required=True, help="Hub id, folder or .gguf file of the decoder backbone.")
    parser.add_argument("--ratings", required=True, nargs="+", help="Rating datasets (messages + objective columns).")
    parser.add_argument("--pairs", required=True, nargs="+", help="Preference pair datasets for the gating network.")
    parser.add_argument(
        "--reference", nargs="+", help="Pair datasets for the verbosity decorrelation (default: --pairs)."
    )
    parser.add_argument("--verbosity", help="The verbosity objective (default: the one objective named *verbosity*).")
    parser.add_argument("--objectives", type=lambda s: s.split(","), help="Rating columns to use, comma-separated.")
    parser.add_argument("--out", required=True, help="The checkpoint folder to write.")
    parser.add_argument("--work", help="The work folder (default: <out>.work).")
    parser.add_argument("--split", help="Dataset split of every input (extract).")
    parser.add_argument("--max-length", type=int, help="Longest conversation in tokens (extract).")
    parser.add_argument("--batch-size", type=int, help="Responses per forward pass (extract).")
    parser.add_argument("--dtype", help="Backbone dtype for extraction: auto, float32, bfloat16, float16.")
    parser.add_argument(
        "--truncate-prompt", action="store_true", help="Drop early prompt turns of long rows (extract)."
    )
    parser.add_argument("--device", help="Device for extraction and gating (default: cuda when available).")
    parser.add_argument("--alphas", type=float, nargs="+", help="Ridge penalties to choose from (fit).")
    parser.add_argument("--threshold", type=float, help="Spearman threshold τ (decorrelate).")
    parser.add_argument("--steps", type=int, help="Training steps (gate).")
    parser.add_argument("--gate-batch-size", type=int, help="Pairs per step (gate).")
    parser.add_argument("--lr", type=float, help="Learning rate (gate).")
    parser.add_argument("--hidden-dim", type=int, help="Gating MLP width (gate).")
    parser.add_argument("--n-hidden", type=int, help="Gating MLP hidden layers (gate).")
    parser.add_argument("--temperature", type=float, help="Gating softmax temperature (gate).")
    parser.add_argument("--beta-init", type=float, help="Initial β (gate).")
    parser.add_argument("--eval-every", type=int, help="Validation interval in steps (gate).")
    parser.add_argument("--seed", type=int, help="Seed of the gating training (gate).")
    parser.add_argument("--checkpoint-dtype", help="dtype of the saved backbone (assemble).")
    parser.add_argument("--model-id", help="Hub id the model card's snippet loads (assemble).")
    parser.add_argument("--eval-results", help="JSON of evaluation results for the model card (assemble).")


def _run_once(work: Path, stage: str, settings: dict, run, upstream_ran: bool) -> bool:
    """Run `run()` unless `<stage>.done.json` records the same settings and no earlier stage ran again (its outputs
    would be stale); then write that stamp. Returns whether the stage ran."""
    stamp = work / f"{stage}.done.json"
    settings = json.loads(json.dumps(settings, default=str))
    if not upstream_ran and stamp.is_file() and json.loads(stamp.read_text()) == settings:
        logger.info("build: %s already done, reusing it (%s)", stage, stamp)
        print(f"[build] {stage}: done earlier, reused")
        return False
    print(f"[build] {stage} ...")
    stamp.unlink(missing_ok=True)
    run()
    stamp.write_text(json.dumps(settings, indent=2) + "\n")
    return True


def _verbosity(regression: Path, verbosity: str | None) -> str | None:
    _, _, objectives = load_regression(regression)
    if verbosity is not None:
        return verbosity
    named = [name for name in objectives if "verbosity" in name.lower()]
    if len(named) > 1:
        raise ValueError(f"Several objectives name verbosity ({named}): choose one with `--verbosity`.")
    return named[0] if named else None


def main(
    backbone: str,
    ratings: list[str],
    pairs: list[str],
    out: str,
    reference: list[str] | None = None,
    verbosity: str | None = None,
    objectives: list[str] | None = None,
    work: str | None = None,
    **options,
) -> str:
    unknown = sorted(set(options) - set(STAGE_OPTIONS))
    if unknown:
        raise TypeError(f"`armorm build` has no option {unknown}; its options: {sorted(STAGE_OPTIONS)}.")
    per_stage = {stage: {} for stage in ("extract", "fit", "decorrelate", "gate", "assemble")}
    for name, value in options.items():
        stage, parameter = STAGE_OPTIONS[name]
        per_stage[stage][parameter] = value
    if "device" in per_stage["extract"]:
        per_stage["gate"]["device"] = per_stage["extract"]["device"]
    work = Path(work or f"{out}.work")
    work.mkdir(parents=True, exist_ok=True)

    # Features: one folder per dataset; extraction resumes inside a folder by itself.
    folders = {"ratings": [], "pairs": [], "reference": []}
    ran = False  # once a stage runs, every later one runs too
    jobs = (
        [("ratings", d) for d in ratings] + [("pairs", d) for d in pairs] + [("reference", d) for d in reference or []]
    )
    for role, data in jobs:
        folder = work / "features" / f"{role}-{len(folders[role])}"
        folders[role].append(str(folder))
        kind = "ratings" if role == "ratings" else "pairs"
        kwargs = {**per_stage["extract"], **({"objectives": objectives} if objectives and kind == "ratings" else {})}
        settings = {"backbone": backbone, "data": data, "kind": kind, **kwargs}
        extract_rows = partial(extract.main, backbone, data, str(folder), kind, **kwargs)
        ran |= _run_once(work, f"extract-{folder.name}", settings, extract_rows, upstream_ran=False)

    regression, transform, gating = (work / f"{name}.safetensors" for name in ("regression", "transform", "gating"))
    settings = {"features": folders["ratings"], **per_stage["fit"]}
    ran |= _run_once(
        work, "fit", settings, lambda: fit.main(folders["ratings"], str(regression), **per_stage["fit"]), ran
    )

    reference_folders = folders["reference"] or folders["pairs"]
    verbosity = _verbosity(regression, verbosity)
    settings = {"reference": reference_folders, "verbosity": verbosity, **per_stage["decorrelate"]}

    def run_decorrelate():
        if verbosity is None:
            # Nothing to decorrelate from: T = I, said loudly and recorded in the file.
            _, _, names = load_regression(regression)
            logger.warning("No verbosity objective among %s: T = I (no decorrelation).", names)
            save_transform(
                transform,
                torch.eye(len(names)),
                torch.zeros(len(names)),
                names,
                extra_metadata={"note": "no verbosity objective"},
            )
        else:
            decorrelate.main(str(regression), reference_folders, verbosity, str(transform), **per_stage["decorrelate"])

    ran |= _run_once(work, "decorrelate", settings, run_decorrelate, ran)

    settings = {"features": folders["pairs"], **per_stage["gate"]}
    ran |= _run_once(
        work, "gate", settings,
        lambda: gate.main(folders["pairs"], str(regression), str(transform), str(gating), **per_stage["gate"]), ran,
    )  # fmt: skip

    datasets = [d for d in [*ratings, *pairs] if not Path(d).exists()]  # Hub ids go to the card's metadata
    settings = {"backbone": backbone, "out": out, **per_stage["assemble"]}
    _run_once(
        work, "assemble", settings,
        lambda: assemble.main(
            backbone, str(regression), str(transform), str(gating), out, datasets=datasets or None,
            **per_stage["assemble"],
        ),
        ran,
    )  # fmt: skip
    print(f"[build] checkpoint: {out}")
    return out
