"""Push an assembled ArmoRM checkpoint to the Hub, or list what would go there (`--dry-run`).

    armorm push --checkpoint CKPT --repo-id USER/NAME [--private] [--dry-run] [--token TOKEN] [--commit-message M]

The folder must be what `armorm assemble` writes: `config.json` with `model_type: armorm` and `auto_map`, safetensors
weights, the remote-code files and a README.md model card; anything else is refused before a request is made. The
token comes from `--token`, else `HF_TOKEN`, else the cached `hf auth login`. A dry run checks the same things,
checks the card's metadata offline, lists the files with their sizes, and sends nothing.
"""

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, get_token
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects, validate_repo_id
from transformers.dynamic_module_utils import get_relative_imports

from modeling_armorm.settings import Location, normalize_locations


logger = logging.getLogger(__name__)

__all__ = ["ARGUMENTS", "REMOTE_CODE_FILES", "PushConfig", "check_card", "check_checkpoint", "list_files", "main"]

REMOTE_CODE_FILES = ("configuration_armorm.py", "modeling_armorm.py")
_ASSEMBLE = "Write the checkpoint with `armorm assemble`."


@dataclass(kw_only=True)
class PushConfig:
    """`armorm push`: the checkpoint, where it goes, and how."""

    checkpoint: Location = field(metadata={"help": "Checkpoint folder written by `armorm assemble`."})
    repo_id: str = field(metadata={"help": "Hub repository to create or update, `USER/NAME` or `ORG/NAME`."})
    private: bool = field(default=False, metadata={"help": "Create the repository as private."})
    dry_run: bool = field(default=False, metadata={"help": "Check and list the files; push nothing."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: `HF_TOKEN` or `hf auth login`)."})
    commit_message: str = field(
        default="Upload ArmoRM reward model", metadata={"help": "The upload commit's message."}
    )

    def __post_init__(self):
        normalize_locations(self)


ARGUMENTS = (PushConfig,)


def check_checkpoint(folder: str | os.PathLike) -> dict:
    """Refuse a folder that is not a complete ArmoRM checkpoint; return its config."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder. {_ASSEMBLE}")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder} is not an ArmoRM checkpoint: it has no config.json. {_ASSEMBLE}")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("model_type") != "armorm":
        raise ValueError(
            f"{folder} is not an ArmoRM checkpoint: config.json has model_type {config.get('model_type')!r}, not "
            f"'armorm'. {_ASSEMBLE}"
        )
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        missing = sorted(shard for shard in shards if not (folder / shard).is_file())
        if missing:
            raise ValueError(f"{folder}: weight shards {missing} named in {index.name} are missing. {_ASSEMBLE}")
    elif not (folder / "model.safetensors").is_file():
        raise ValueError(f"{folder} holds no weights (model.safetensors or its index). {_ASSEMBLE}")
    # Without these, `trust_remote_code=True` cannot load the model where the package is not installed.
    missing = _missing_remote_code(folder)
    if missing or "AutoModelForSequenceClassification" not in config.get("auto_map", {}):
        raise ValueError(
            f"{folder} lacks the remote-code files {missing or list(REMOTE_CODE_FILES)} or the `auto_map` entry of "
            f"config.json, so it would not load with `trust_remote_code=True`. {_ASSEMBLE}"
        )
    if not (folder / "tokenizer_config.json").is_file():
        logger.warning("%s has no tokenizer: users will not get the chat template the model was trained with.", folder)
    return config


def _missing_remote_code(folder: Path) -> list[str]:
    """The files of `REMOTE_CODE_FILES` that `folder` lacks, then those that they import (`from .heads import`, as
    transformers copies them on save) and that it lacks too. A checkpoint written before `heads.py` existed does
    not import it."""
    present = [name for name in REMOTE_CODE_FILES if (folder / name).is_file()]
    imported = {f"{module}.py" for name in present for module in get_relative_imports(folder / name)}
    absent = sorted(name for name in imported if not (folder / name).is_file())
    return [name for name in REMOTE_CODE_FILES if name not in present] + absent


def check_card(folder: str | os.PathLike, repo_id: str | None = None) -> ModelCard:
    """The README.md card, checked offline: YAML metadata that parses, `library_name: transformers`, the fields the
    Hub reads typed as it expects. (`ModelCard.validate` asks the Hub, so `push` leaves that to the upload.)"""
    path = Path(folder) / "README.md"
    if not path.is_file():
        raise ValueError(f"{folder} has no model card (README.md). {_ASSEMBLE}")
    card = ModelCard.load(path)  # raises on YAML that does not parse
    data = card.data.to_dict()
    problems = []
    if not data:
        problems.append("the card has no YAML metadata")
    if data.get("library_name") != "transformers":
        problems.append(f"`library_name` is {data.get('library_name')!r}, not 'transformers'")
    for key in ("base_model", "datasets", "tags"):
        value = data.get(key)
        if value is not None and not (isinstance(value, str) or all(isinstance(item, str) for item in value)):
            problems.append(f"`{key}` must be a string or a list of strings, got {value!r}")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems) + ". Re-run `armorm assemble` to rewrite the card.")
    if repo_id is not None and f'"{repo_id}"' not in card.text:
        logger.warning(
            "The card's usage snippet does not load %r; re-run `armorm assemble --model-id %s` so it does.",
            repo_id,
            repo_id,
        )
    return card


def list_files(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """(path in repo, size in bytes) of every file `upload_folder` would send, with its default ignore patterns."""
    folder = Path(folder).resolve()
    paths = sorted(path.relative_to(folder).as_posix() for path in folder.glob("**/*") if path.is_file())
    kept = filter_repo_objects(paths, ignore_patterns=DEFAULT_IGNORE_PATTERNS)
    return [(path, (folder / path).stat().st_size) for path in kept]


def _size(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return ""


def main(config: PushConfig | None = None, /, **kwargs):
    """Create `repo_id` (if needed) and upload the checkpoint folder in one commit; with `dry_run`, only list it.

    Returns the files as (path, size) for a dry run, else the `CommitInfo` of the upload. Pass a `PushConfig`, or
    its fields as keywords."""
    config = config or PushConfig(**kwargs)
    checkpoint, repo_id, private, token = config.checkpoint, config.repo_id, config.private, config.token
    validate_repo_id(repo_id)
    check_checkpoint(checkpoint)
    check_card(checkpoint, repo_id)
    files = list_files(checkpoint)
    if config.dry_run:
        width = max(len(path) for path, _ in files)
        lines = [f"{path:<{width}}  {_size(size):>10}" for path, size in files]
        lines.append(f"{'total':<{width}}  {_size(sum(size for _, size in files)):>10}")
        visibility = "private" if private else "public"
        lines.append(f"Dry run: {len(files)} files would go to the {visibility} repo {repo_id}; nothing was pushed.")
        print("\n".join(lines))  # the command's output (a listing), not a log line: stdout, so it can be piped
        return files

    token = token or get_token()
    if token is None:
        raise ValueError("No Hub token: pass `--token`, set `HF_TOKEN`, or log in with `hf auth login`.")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(repo_id=repo_id, folder_path=checkpoint, commit_message=config.commit_message)
    print(f"Pushed {len(files)} files to {info.commit_url}")
    return info
