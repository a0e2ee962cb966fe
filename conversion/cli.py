"""`armorm`: one console script, one sub-command per pipeline stage. It only parses and dispatches.

Each stage module defines its settings as dataclasses (`ARGUMENTS`: the fields, their defaults and help, the one home
of every knob) and `main(*configs)`, the importable function that does the work and that tests call directly. The
flags are generated from the dataclasses by transformers' `HfArgumentParser`: a field `max_length` is the flag
`--max-length` (or `--max_length`), and a boolean field `truncate_prompt` the flag `--truncate-prompt`.
"""

import argparse
import dataclasses
import importlib
import logging
import os
import shlex
import sys
import typing
from typing import NewType

from transformers import HfArgumentParser


__all__ = [
    "COMMANDS",
    "Location",
    "normalize_locations",
    "build_parser",
    "command_line",
    "flags_table",
    "console_main",
    "location_fields",
    "main",
    "settings_dict",
]

COMMANDS = {
    "assemble": "conversion.assemble",
    "build": "conversion.build",
    "convert-rlhflow": "conversion.convert_rlhflow",
    "decorrelate": "conversion.decorrelate",
    "evaluate": "conversion.evaluate",
    "explain": "conversion.explain",
    "extract": "conversion.extract",
    "fit": "conversion.fit",
    "gate": "conversion.gate",
    "push": "conversion.push",
    "rewardbench-score": "conversion.rewardbench_score",
    "score": "conversion.score",
    "serve": "conversion.serve",
}

# The type of a setting that names a file, a folder or a Hub id: reports write it relative to their folder.
Location = NewType("Location", str)


def build_parser() -> argparse.ArgumentParser:
    """The `armorm` parser; `parser.stage_parsers[name]` is each sub-command's `HfArgumentParser`."""
    parser = argparse.ArgumentParser(prog="armorm", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=HfArgumentParser)
    parser.stage_parsers = {}
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        parser.stage_parsers[name] = subparsers.add_parser(
            name,
            dataclass_types=list(module.ARGUMENTS),
            help=module.__doc__.splitlines()[0],
            description=module.__doc__,
        )
        # The help shows each default, and the module docstring keeps its line breaks.
        parser.stage_parsers[name].formatter_class = _HelpFormatter
    return parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def main(argv: list[str] | None = None) -> None:
    """Parse `argv` and run the stage. Returns nothing: the console script passes the return value to `sys.exit`,
    where anything but None fails."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints the usage, the help or the error, and exits
    command, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[command])
    # A stage may name one list field (`POSITIONAL`) whose values can lead the arguments without their flag.
    positional = getattr(module, "POSITIONAL", None)
    if positional and rest and not rest[0].startswith("-"):
        rest = [f"--{positional}", *rest]
    configs = parser.stage_parsers[command].parse_args_into_dataclasses(rest)
    module.main(*configs)


# The errors a user meets with a wrong path, layout or option: one line, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


def console_main() -> None:
    """The `armorm` entry point: progress and results logged to stderr, a user error printed as one line."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    try:
        main()
    except USER_ERRORS as error:
        if os.environ.get("ARMORM_TRACEBACK"):
            raise
        print(f"armorm {command}: error: {error}", file=sys.stderr)
        sys.exit(2)


def normalize_locations(config) -> None:
    """Called by each settings dataclass's `__post_init__`: `Location` values as `str` (a `pathlib.Path` is
    accepted), and a list-valued one given as a single value (`features="folder"`) as a one-item list."""
    for name, hint in typing.get_type_hints(type(config)).items():
        if name not in location_fields(type(config)) or (value := getattr(config, name)) is None:
            continue
        if _is_list(hint) and isinstance(value, (str, os.PathLike)):
            value = [value]
        setattr(config, name, [os.fspath(v) for v in value] if _is_list(hint) else os.fspath(value))


def _is_list(hint) -> bool:
    return typing.get_origin(hint) is list or any(typing.get_origin(arg) is list for arg in typing.get_args(hint))


def location_fields(config_class) -> set[str]:
    """The fields of a settings dataclass typed `Location` (or a list / optional of it)."""
    names = set()
    for name, hint in typing.get_type_hints(config_class).items():
        args = typing.get_args(hint)
        if hint is Location or Location in args or any(Location in typing.get_args(arg) for arg in args):
            names.add(name)
    return names


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


def _io_first(config) -> list[dataclasses.Field]:
    """The fields of `config`, those of its own class (what a stage reads and writes) before the inherited settings."""
    return _io_first_of(type(config))


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
        for field in _io_first(config):
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


def flags_table(command: str) -> str:
    """The markdown table of `command`'s flags (flag, default, meaning), from its settings dataclasses: the README's
    tables are these, and a test keeps them equal. `armorm build` lists its own flags; each stage's settings follow
    it as `--<stage>-<name>`."""
    module = importlib.import_module(COMMANDS[command])
    lines = ["| flag | default | meaning |", "|---|---|---|"]
    for config_class in module.ARGUMENTS[:1] if command == "build" else module.ARGUMENTS:
        hints = typing.get_type_hints(config_class)
        for field in _io_first_of(config_class):
            if field.default is not dataclasses.MISSING:
                default = "—" if field.default is None else f"`{_flag_value(field.default)}`"
            elif field.default_factory is not dataclasses.MISSING:
                default = f"`{_flag_value(field.default_factory())}`"
            else:
                default = "required"
            flag = f"`--{field.name.replace('_', '-')}`"
            if _is_list(hints[field.name]):
                flag += " …"
            lines.append(f"| {flag} | {default} | {field.metadata.get('help', '')} |")
    return "\n".join(lines)


def _io_first_of(config_class) -> list[dataclasses.Field]:
    own = set(config_class.__dict__.get("__annotations__", {}))
    fields = dataclasses.fields(config_class)
    return [f for f in fields if f.name in own] + [f for f in fields if f.name not in own]


def _flag_value(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    console_main()
