"""One report per stage, `<stage>.json`, in one shape, beside what the stage wrote.

    {
      "stage": "fit",
      "command": "armorm fit --features ratings --out regression.safetensors",
      "settings": {"features": ["ratings"], "out": "regression.safetensors", "alphas": [...], ...},
      "inputs": {"features": [{"path": "ratings", "sha256": "…"}]},
      "outputs": {"regression": {"path": "regression.safetensors", "sha256": "…"}},
      "metrics": {...},
      "versions": {"armorm": "0.1.0", "torch": "…", "transformers": "…"}
    }

Local paths are written relative to the report's folder, so a work folder can be moved and its reports still name
their files; the command reruns the stage from that folder. `sha256` is a content hash (see `armorm_io.files`):
a later stage, `armorm build` or `armorm assemble` compares it with the file it is given, so a report is never read
for a file it was not written for.
"""

import dataclasses
import importlib.metadata
import json
import logging
import os
import shlex
import typing
from pathlib import Path

from armorm_io.artifacts import head_fingerprint
from armorm_io.files import Fingerprint, atomic_write_json
from modeling_armorm.settings import fields_in_order, location_fields


__all__ = [
    "REPORT_KEYS",
    "command_line",
    "read_report",
    "report_for",
    "report_path",
    "settings_dict",
    "write_report",
]

logger = logging.getLogger(__name__)

REPORT_KEYS = ("stage", "command", "settings", "inputs", "outputs", "metrics", "versions")
_PACKAGES = ("armorm", "torch", "transformers", "safetensors", "datasets")


# ---------------------------------------------------------------- settings as the report writes them


def settings_dict(config, paths: typing.Callable[[str], str] | None = None) -> dict:
    """`dataclasses.asdict(config)`, with `paths` applied to its `Location` values (e.g. to make them relative)."""
    locations = location_fields(type(config))
    settings = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            value = settings_dict(value, paths)
        elif paths is not None and field.name in locations and value is not None:
            value = [paths(v) for v in value] if isinstance(value, list) else paths(value)
        elif isinstance(value, tuple):
            value = list(value)
        settings[field.name] = value
    return settings


def _is_default(field: dataclasses.Field, value) -> bool:
    if field.default is not dataclasses.MISSING:
        return value == field.default
    if field.default_factory is not dataclasses.MISSING:
        return value == field.default_factory()
    return False


def command_line(command: str, *configs, paths: typing.Callable[[str], str] | None = None) -> str:
    """The `armorm` command that runs `command` with these settings: one flag per field that differs from its default
    (a nested settings dataclass, as `armorm build` holds, gives flags prefixed with its field's name). `paths` is
    applied to the local paths (e.g. to write them relative to the folder the command runs from).
    """
    parts = ["armorm", command]

    def add(config, prefix: str) -> None:
        settings = settings_dict(config, paths)
        for field in fields_in_order(type(config)):
            value = getattr(config, field.name)
            if dataclasses.is_dataclass(value):
                add(value, f"{prefix}{field.name}-")
                continue
            if value is None or _is_default(field, value):
                continue
            value, flag = settings[field.name], "--" + (prefix + field.name).replace("_", "-")
            if isinstance(value, bool):
                parts.extend([flag] if value else ["--no-" + flag[2:]])
            elif isinstance(value, list):
                parts.extend([flag, *map(str, value)])
            else:
                parts.extend([flag, str(value)])

    for config in configs:
        add(config, "")
    return shlex.join(parts)


# ---------------------------------------------------------------- reports


def report_path(stage: str, out: str | os.PathLike) -> Path:
    """Where `stage` writes its report: inside `out` when it is a folder (extract, assemble), else beside it."""
    out = Path(out)
    return (out if out.is_dir() else out.parent) / f"{stage}.json"


def relative_path(value: str, folder: Path) -> str:
    """`value` relative to `folder` when it is an existing local path, else unchanged (a Hub id, a name)."""
    if not isinstance(value, str) or not value or not os.path.exists(value):
        return value
    return os.path.relpath(os.path.abspath(value), os.path.abspath(folder))


def file_name(value: str) -> str:
    """An existing local path reduced to its file or folder name (what may leave the machine), else unchanged."""
    if not isinstance(value, str) or not value or not os.path.exists(value):
        return value
    return Path(os.path.abspath(value)).name


def versions() -> dict[str, str]:
    found = {}
    for package in _PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _fingerprints(entries: dict, paths) -> dict:
    def one(entry):
        if isinstance(entry, (list, tuple)):
            return [one(item) for item in entry]
        return entry.as_dict(paths) if isinstance(entry, Fingerprint) else entry

    return {name: one(entry) for name, entry in entries.items()}


def write_report(
    path: str | os.PathLike,
    stage: str,
    config,
    inputs: dict,
    outputs: dict,
    metrics: dict,
    public: bool = False,
    extra: dict | None = None,
) -> dict:
    """Write `<stage>.json` at `path` (see `report_path`) for a stage run with `config` (its settings dataclass);
    `inputs` / `outputs` map a name to a `Fingerprint` (or a list of them). Returns the report as written.

    Local paths are written relative to the report's folder; with `public` (a report that is published, inside a
    checkpoint) as their file names only, so no local folder layout leaves the machine. `extra` adds top-level fields
    (a stage whose output is its report, `armorm evaluate`'s results file).
    """
    path = Path(path)
    paths = file_name if public else (lambda value: relative_path(value, path.parent))
    report = {
        "stage": stage,
        "command": command_line(stage, config, paths=paths),
        "settings": settings_dict(config, paths),
        "inputs": _fingerprints(inputs, paths),
        "outputs": _fingerprints(outputs, paths),
        "metrics": metrics,
        "versions": versions(),
    }
    clash = set(report) & set(extra or {})
    if clash:
        raise ValueError(f"`extra` fields {sorted(clash)} would replace the report's own.")
    report.update(extra or {})
    # JSON has no NaN: a metric that is undefined (a correlation over constant values) is written as null.
    atomic_write_json(path, _finite(report))
    return report


def _finite(value):
    if isinstance(value, float) and value != value:  # NaN
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def read_report(path: str | os.PathLike) -> dict | None:
    """A stage report, or None when there is none; a file that is not a report in this shape is an error."""
    path = Path(path)
    if not path.is_file():
        return None
    report = json.loads(path.read_text(encoding="utf-8"))
    missing = [key for key in REPORT_KEYS if key not in report]
    if missing:
        raise ValueError(
            f"{path} is not a stage report of this package (it lacks {missing}); delete it and rerun the stage."
        )
    return report


def output_sha256(report: dict | None, name: str) -> str | None:
    """The content hash a report records for its output `name`."""
    if report is None:
        return None
    entry = report["outputs"].get(name)
    return entry.get("sha256") if isinstance(entry, dict) else None


def report_for(stage: str, path: str | os.PathLike, output: str) -> dict | None:
    """The report `stage` wrote beside `path`, if it was written for this very file (the content hash it records
    for its output `output` is the file's); None when there is none or it belongs to another file."""
    report = read_report(report_path(stage, path))
    if report is None:
        return None
    if output_sha256(report, output) != head_fingerprint(path).sha256:
        logger.warning(
            "%s is not the report of %s (it was written for another %s file); it is not used.",
            report_path(stage, path),
            path,
            output,
        )
        return None
    return report
