"""Fine-tune a Bradley-Terry reward model on preference pairs: the backbone ArmoRM is built on, as the paper does.

    armorm bt --backbone HuggingFaceTB/SmolLM2-135M-Instruct --pairs pairs.jsonl --out bt/
    armorm extract --backbone bt/ --data ratings.jsonl --kind ratings --out feats/    # then fit, decorrelate, gate

ArmoRM-Llama3-8B starts from a Bradley-Terry reward model of its size (arXiv 2406.12845 §4: FsfairX-LLaMA3-RM), drops
its score head and fits the objectives and the gate on its last hidden state. This stage makes that starting point
for any backbone with TRL's `RewardTrainer`:

    s(x, y) = wᵀ h,   h = f(x ⊕ y)[last real token]      the feature `armorm extract` reads
    loss    = −log σ(s(x, y_chosen) − s(x, y_rejected))

Conversations are encoded as the scoring path encodes them (`modeling_armorm.length_policy.ConversationEncoder`: the
chat template, answer markup never read as special tokens, the same last token), and handed to the trainer as token
ids, so the score the trainer learns is the score head applied to the very feature `armorm extract` reads. A pair
longer than `max_length` is skipped with its reason (or loses earlier prompt turns with `truncate_prompt`), never cut.

The held-out rule: a pair is left out of training when `held_out(prompt_key, val_fraction, seed)` (see
`armorm_io.pair_keys`), the rule `armorm gate` draws its validation split with; with the same `val_fraction` and
`seed` (the defaults of both), the gate is validated on pairs whose prompts this backbone never trained on. The
held-out pairs are the trainer's eval set; their pairwise accuracy goes in the report.

`--out` becomes a transformers sequence-classification checkpoint (`AutoModelForSequenceClassification`; with LoRA,
the adapter merged) with its tokenizer, a model card, the stage report `bt.json` and `trained_pairs.safetensors`
(`pair_keys`, `prompt_keys` of every pair trained on, so a later report can say which evaluation pairs it has seen).
As `--backbone` of `extract`/`build`, `AutoModel` loads it without its score head. Trainer checkpoints are written to
`out/checkpoints/` every `save_steps` steps: the same command resumes from the last one, and they are removed once the
model is saved. A finished folder made from the same inputs and settings is reused; a folder made from others is
refused (`--overwrite` starts again there).
"""

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import datasets
import torch
from huggingface_hub import ModelCard, ModelCardData
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, PreTrainedModel
from transformers.trainer_utils import get_last_checkpoint

from armorm_io.backbone import backbone_fingerprint, load_backbone, load_tokenizer, split_gguf
from armorm_io.data import data_fingerprint, load_pairs
from armorm_io.features import read_meta
from armorm_io.files import Fingerprint, atomic_write_json, file_sha256
from armorm_io.pair_keys import held_out, pair_key, prompt_key
from armorm_io.reports import read_report, settings_dict, write_report
from modeling_armorm.length_policy import ConversationEncoder, EncodedRow
from modeling_armorm.scoring import EncodedConversation, conversation_features, pad_token_id
from modeling_armorm.settings import (
    DtypeSettings,
    LengthSettings,
    Location,
    fit_dtype,
    normalize_locations,
    resolve_device,
)


logger = logging.getLogger(__name__)

REPORT_NAME = "bt.json"
TRAINED_PAIRS_NAME = "trained_pairs.safetensors"
CHECKPOINTS_NAME = "checkpoints"
RUN_NAME = "run.json"  # inside `checkpoints/`: what the checkpoints were trained from, checked before resuming
# Settings that only say where things are, how often to save and log, or how to treat the folder: not part of what a
# run is (the inputs count by their content hashes), so a rerun may change them and still resume.
NOT_IDENTITY = ("backbone", "pairs", "out", "overwrite", "save_steps", "logging_steps")
CARD_TAGS = ["reward-model", "bradley-terry", "armorm"]

__all__ = ["ARGUMENTS", "BTConfig", "BTSettings", "bt_scores", "main", "trained_pairs_by_backbone", "weights_sha256"]


@dataclass(kw_only=True)
class BTSettings(LengthSettings, DtypeSettings):
    """The knobs of `armorm bt`: how the Bradley-Terry reward model is fine-tuned, and which pairs it never sees."""

    finetune: Literal["lora", "full"] = field(
        default="lora",
        metadata={"help": "`lora`: train LoRA adapters and the score head, merged on save; `full`: every weight."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (every linear layer of the backbone)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling α (the update is scaled by α / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA adapters' input."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the training pairs."})
    lr: float = field(
        default=1e-4,
        metadata={"help": "Peak learning rate, linear decay (LoRA: 1e-4; full fine-tuning wants about 1e-5)."},
    )
    batch_size: int = field(default=8, metadata={"help": "Pairs per step and device (each pair is two forwards)."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Steps whose gradients are summed before an update."}
    )
    val_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Share of the prompts held out of training (`held_out` of the prompt key, as `armorm gate` "
            "splits): their pairs are the eval set."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the split, the score head's initialisation and batches."})
    save_steps: int = field(default=100, metadata={"help": "Steps between the checkpoints a rerun resumes from."})
    logging_steps: int = field(default=10, metadata={"help": "Steps between logged training losses."})
    overwrite: bool = field(
        default=False, metadata={"help": "Start again in an `--out` folder that holds another `armorm bt` run."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.finetune not in ("lora", "full"):
            raise ValueError(f"`finetune` must be `lora` or `full`, got {self.finetune!r}.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"`val_fraction` must be in [0, 1), got {self.val_fraction}.")
        for name in ("lora_r", "batch_size", "gradient_accumulation_steps", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        if self.epochs <= 0 or self.lr <= 0:
            raise ValueError(f"`epochs` and `lr` must be positive, got {self.epochs} and {self.lr}.")


@dataclass(kw_only=True)
class BTConfig(BTSettings):
    """`armorm bt`: the backbone it starts from, the pairs it trains on, the folder it writes, and its settings."""

    backbone: Location = field(metadata={"help": "Hub id, local model folder, or a `.gguf` file."})
    pairs: list[Location] = field(metadata={"help": "Preference pairs: Hub dataset ids or local files (one or more)."})
    out: Location = field(metadata={"help": "The checkpoint folder to write (or to resume)."})

    def __post_init__(self):
        super().__post_init__()
        normalize_locations(self)


ARGUMENTS = (BTConfig,)


def main(config: BTConfig | None = None, /, **kwargs) -> dict:
    """Fine-tune a Bradley-Terry reward model on `config.pairs` from `config.backbone` into `config.out`; returns the
    stage report (also written as `bt.json` there). Pass a `BTConfig`, or its fields as keywords."""
    config = config or BTConfig(**kwargs)
    started = time.perf_counter()
    out = Path(config.out)
    backbone = backbone_fingerprint(config.backbone)
    pairs = [data_fingerprint(path) for path in config.pairs]
    identity = _identity(config, backbone, pairs)
    if config.overwrite:
        _clear(out)
    finished = _check_folder(out, identity)  # before the slow loads: a stale folder fails at once
    if finished is not None:
        shutil.rmtree(out / CHECKPOINTS_NAME, ignore_errors=True)
        logger.info("armorm bt: `%s` already holds this run; reusing it.", out)
        return finished

    # Load: the pairs, encoded as the scoring path encodes them.
    tokenizer = load_tokenizer(config.backbone)
    model = _classifier(config, tokenizer)
    encoder = ConversationEncoder(
        tokenizer, config.max_length, config.truncate_prompt, getattr(model.config, "max_position_embeddings", None)
    )
    data = _encode_pairs(config, pairs, encoder)
    pad_id = _pad_id(tokenizer, data["train"] + data["held_out"])
    model.config.pad_token_id = pad_id  # the classifier pools at the last token that is not `pad_id`

    # Compute: RewardTrainer steps, resumed from the last checkpoint of an interrupted run.
    trainer = _trainer(config, model, tokenizer, data, pad_id)
    checkpoints = out / CHECKPOINTS_NAME
    checkpoints.mkdir(parents=True, exist_ok=True)
    atomic_write_json(checkpoints / RUN_NAME, identity)
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if last is not None:
        logger.info("armorm bt: resuming from %s.", last)
    trainer.train(resume_from_checkpoint=last)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    model = trainer.model.merge_and_unload() if config.finetune == "lora" else trainer.model
    model.eval()
    device = next(model.parameters()).device
    scores = bt_scores(model, [side for row in data["held_out"] for side in row.sides], config.batch_size, pad_id)
    chosen, rejected = scores[0::2], scores[1::2]
    accuracy = float((chosen > rejected).float().mean()) if len(chosen) else float("nan")

    # Save: the merged classifier, its tokenizer, the pairs it trained on, its card and the report.
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    keys = {name: torch.tensor(data[name], dtype=torch.int64) for name in ("pair_keys", "prompt_keys")}
    save_file(keys, out / TRAINED_PAIRS_NAME)
    metrics = {
        "counts": {
            "read": data["read"],
            "skipped": len(data["skipped"]),
            "trained": len(data["train"]),
            "held_out": len(data["held_out"]),
        },
        "skipped": data["skipped"],
        "steps": trainer.state.global_step,
        "losses": losses,  # every `logging_steps` steps
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "held_out_accuracy": accuracy,
        "pad_token_id": pad_id,
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": str(device),
        "wall_seconds": time.perf_counter() - started,  # this run's, a resumed run counts from its restart
        "resumed_from_step": int(Path(last).name.rpartition("-")[2]) if last is not None else 0,
    }
    _model_card(config, backbone, pairs, metrics).save(out / "README.md")
    report = write_report(
        out / REPORT_NAME,
        "bt",
        config,
        inputs={"backbone": backbone, "pairs": pairs},
        outputs={
            "model": Fingerprint(str(out / "model.safetensors"), weights_sha256(out)),
            "trained_pairs": Fingerprint(str(out / TRAINED_PAIRS_NAME), file_sha256(out / TRAINED_PAIRS_NAME)),
        },
        metrics=metrics,
        extra={"identity": identity},
    )
    shutil.rmtree(checkpoints, ignore_errors=True)  # after the report: a run stopped in between is reused, not refused
    logger.info(
        "armorm bt: %d pairs trained, %d held out (accuracy %.3f), %d skipped -> %s",
        len(data["train"]),
        len(data["held_out"]),
        accuracy,
        len(data["skipped"]),
        out,
    )
    return report


# ----------------------------------------------------------------------------------------------------------------
# The folder: reuse, resume or refuse


def _identity(config: BTConfig, backbone: Fingerprint, pairs: list[Fingerprint]) -> dict:
    """What a run is made of: its settings and the content hashes of its inputs (a Hub id by its name when it
    cannot be hashed here); a moved file is the same input, an edited one is not."""
    settings = {key: value for key, value in settings_dict(config).items() if key not in NOT_IDENTITY}
    return {
        "settings": settings,
        "backbone_sha256": backbone.sha256 or f"hub id {config.backbone}",
        "pairs_sha256": [p.sha256 or f"hub id {p.path}" for p in pairs],
    }


def _differences(previous: dict, identity: dict) -> str:
    flat = lambda d: {**d.get("settings", {}), **{k: v for k, v in d.items() if k != "settings"}}  # noqa: E731
    old, new = flat(previous), flat(identity)
    return ", ".join(f"{key}: {old.get(key)!r} there, {new[key]!r} now" for key in new if old.get(key) != new[key])


def _check_folder(out: Path, identity: dict) -> dict | None:
    """The report of a finished run of this very identity in `out` (reuse it), or None when `out` is empty or holds
    an interrupted one (resume it); a folder that holds anything else is refused with the fix."""
    report = read_report(out / REPORT_NAME)
    run = out / CHECKPOINTS_NAME / RUN_NAME
    previous = report.get("identity", {}) if report is not None else _read_json(run) if run.is_file() else None
    if previous is not None:
        differ = _differences(previous, identity)
        if differ:
            raise ValueError(
                f"`{out}` holds an `armorm bt` run made from other inputs or settings ({differ}), so it cannot be "
                "resumed or reused. Pass `--overwrite` to train again there, or give a new `--out`."
            )
        return report
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(
            f"`{out}` is not empty and holds no `armorm bt` run. Give an empty or new `--out` folder."
        )
    return None


def _clear(out: Path) -> None:
    """`--overwrite`: empty a folder that holds an `armorm bt` run (only such a folder: nothing else is removed)."""
    if not ((out / REPORT_NAME).is_file() or (out / CHECKPOINTS_NAME / RUN_NAME).is_file()):
        return
    for path in out.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def weights_sha256(out: Path) -> str:
    """One hash over the weight files of a saved model (sharded or not): what `armorm build` checks it reuses."""
    names = sorted(p.name for p in out.glob("model*.safetensors*"))
    return hashlib.sha256("".join(f"{name}:{file_sha256(out / name)}\n" for name in names).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# The pairs


def _encode_pairs(config: BTConfig, fingerprints: list[Fingerprint], encoder: ConversationEncoder) -> dict:
    """Every pair of every file encoded, split into trained and held-out pairs by their prompt key; a pair that
    states no preference or cannot be encoded is skipped with its file, row and reason."""
    train, held, skipped, read = [], [], [], 0
    keys = {"pair_keys": [], "prompt_keys": []}
    for fingerprint in fingerprints:
        rows = load_pairs(fingerprint.path, sha256=fingerprint.sha256)
        read += len(rows) + len(rows.skipped)
        skipped += [{"data": fingerprint.path, **entry} for entry in rows.skipped]
        encoded = encoder.encode([[chosen, rejected] for chosen, rejected in zip(rows.chosen, rows.rejected)])
        prompts = torch.tensor([prompt_key(chosen) for chosen in rows.chosen], dtype=torch.int64)
        mask = held_out(prompts, config.val_fraction, config.seed).tolist()
        for i, row in enumerate(encoded):
            if isinstance(row, str):
                skipped.append({"data": fingerprint.path, "index": int(rows.index[i]), "reason": row})
            elif mask[i]:
                held.append(row)
            else:
                train.append(row)
                keys["pair_keys"].append(pair_key(rows.chosen[i], rows.rejected[i]))
                keys["prompt_keys"].append(int(prompts[i]))
    if not train:
        raise ValueError(
            f"No pair is left to train on ({read} read, {len(skipped)} skipped, {len(held)} held out): check "
            "`--pairs`, or lower `--val-fraction`."
        )
    return {"train": train, "held_out": held, "skipped": skipped, "read": read, **keys}


def _pad_id(tokenizer, rows: list[EncodedRow]) -> int:
    """The pad id the classifier is trained and saved with: the tokenizer's (its pad, else eos), unless some
    conversation ends with that token (a template that closes a turn with eos), where the classifier would pool one
    token early; then the first of bos, unk, 0, 1, … that ends none."""
    last = {side.input_ids[-1] for row in rows for side in row.sides}
    candidates = [pad_token_id(tokenizer), tokenizer.bos_token_id, tokenizer.unk_token_id, *range(len(tokenizer))]
    return next(i for i in candidates if i is not None and i not in last)


# ----------------------------------------------------------------------------------------------------------------
# The model and the trainer


def _classifier(config: BTConfig, tokenizer) -> PreTrainedModel:
    """The backbone under a fresh one-output score head: `AutoModelForSequenceClassification` built from its config,
    its body loaded strictly from the backbone (a folder, a Hub id or a dequantized GGUF alike), in the dtype the
    device runs."""
    device = resolve_device(None)
    backbone = fit_dtype(load_backbone(config.backbone, config.dtype), config.dtype, device)
    model_config = backbone.config
    model_config.num_labels = 1
    model_config.pad_token_id = pad_token_id(tokenizer)
    torch.manual_seed(config.seed)  # the score head's initialisation
    model = AutoModelForSequenceClassification.from_config(model_config, dtype=backbone.dtype)
    model.base_model.load_state_dict(backbone.state_dict(), strict=True)  # raises on any missing or unexpected key
    return model


def _trainer(config: BTConfig, model: PreTrainedModel, tokenizer, data: dict, pad_id: int):
    try:
        from peft import LoraConfig
        from trl import RewardConfig, RewardTrainer
    except ImportError as error:
        raise ImportError(f"`armorm bt` trains with TRL and peft: `pip install 'armorm[trl]'` ({error}).") from error

    def dataset(rows: list[EncodedRow]) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {
                "chosen_ids": [row.sides[0].input_ids for row in rows],
                "rejected_ids": [row.sides[1].input_ids for row in rows],
            }
        )

    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)  # the trainer pads with it and saves it
    on_cpu = not torch.cuda.is_available()
    args = RewardConfig(
        output_dir=os.fspath(Path(config.out) / CHECKPOINTS_NAME),
        num_train_epochs=config.epochs,
        learning_rate=config.lr,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        seed=config.seed,
        data_seed=config.seed,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        logging_steps=config.logging_steps,
        eval_strategy="no",  # the held-out accuracy is measured once, on the merged model (`bt_scores`)
        max_length=None,  # the length policy ran already: nothing is dropped here
        disable_dropout=False,  # the LoRA dropout is a setting of its own
        report_to=[],
        use_cpu=on_cpu,
        bf16=False,
        fp16=False,
    )
    peft_config = None
    if config.finetune == "lora":
        # SEQ_CLS trains the score head in full too (peft adds it to `modules_to_save`).
        peft_config = LoraConfig(
            task_type="SEQ_CLS",
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules="all-linear",
            modules_to_save=["score"],
        )
    return RewardTrainer(
        model=model,
        args=args,
        train_dataset=dataset(data["train"]),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


@torch.no_grad()
def bt_scores(model: PreTrainedModel, sequences: list[EncodedConversation], batch_size: int, pad_id: int):
    """s = wᵀ h of each sequence, h the backbone's last hidden state at the last real token (as `armorm extract` reads
    it: `scoring.conversation_features`) and w the classifier's score head; float32 on the CPU, in input order."""
    if not sequences:
        return torch.empty(0)
    h, _ = conversation_features(model.base_model, sequences, batch_size, pad_id)
    weight = model.score.weight  # (1, d)
    return model.score(h.to(weight.device, weight.dtype)).float()[:, 0].cpu()


# ----------------------------------------------------------------------------------------------------------------
# The card


def _model_card(config: BTConfig, backbone: Fingerprint, pairs: list[Fingerprint], metrics: dict) -> ModelCard:
    source, gguf_file = split_gguf(config.backbone)
    hub_id = None if os.path.exists(source) else source
    data = ModelCardData(
        base_model=hub_id,
        library_name="transformers",
        pipeline_tag="text-classification",
        tags=CARD_TAGS,
        datasets=[p.path for p in pairs if not os.path.exists(p.path)] or None,
    )
    counts = metrics["counts"]
    accuracy = metrics["held_out_accuracy"]
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# Bradley-Terry reward model on {os.path.basename(config.backbone.rstrip('/'))}",
        "",
        "A sequence-classification reward model fine-tuned with TRL's `RewardTrainer` on preference pairs by "
        "`armorm bt` (the first stage of an ArmoRM, arXiv 2406.12845): the score is a linear head on the last "
        "real token's hidden state of the chat-templated conversation.",
        "",
        f"- Backbone: `{os.path.basename(config.backbone.rstrip('/'))}` (sha256 `{backbone.sha256}`)"
        + (f", GGUF file `{gguf_file}`" if gguf_file else ""),
        *(f"- Pairs: `{os.path.basename(p.path)}` (sha256 `{p.sha256}`)" for p in pairs),
        f"- Fine-tuning: {config.finetune}"
        + (f" (r {config.lora_r}, α {config.lora_alpha}, merged)" if config.finetune == "lora" else "")
        + f", {config.epochs:g} epoch(s), lr {config.lr:g}, {metrics['steps']} steps",
        f"- Pairs read {counts['read']}, skipped {counts['skipped']}, trained {counts['trained']}, held out "
        f"{counts['held_out']} (prompts with `held_out(prompt_key, {config.val_fraction}, {config.seed})`)",
        f"- Held-out pairwise accuracy: {'n/a' if math.isnan(accuracy) else f'{accuracy:.4f}'}",
        "",
        "`trained_pairs.safetensors` holds the content keys (`armorm_io.pair_keys`) of every pair it trained on; "
        "`bt.json` is the stage report with the command that reruns it.",
    ]
    return ModelCard("\n".join(lines) + "\n")


def trained_pairs_by_backbone(features: list[str]) -> dict[str, torch.Tensor | None]:
    """Each backbone the feature folders were extracted with (from their `meta.json`) → the keys (int64) of the
    pairs it trained on when it is an output of this stage (its folder holds `TRAINED_PAIRS_NAME`), else None."""
    backbones = sorted({str(backbone) for folder in features if (backbone := read_meta(folder).get("backbone"))})
    return {
        backbone: load_file(path)["pair_keys"] if (path := Path(backbone) / TRAINED_PAIRS_NAME).is_file() else None
        for backbone in backbones
    }
