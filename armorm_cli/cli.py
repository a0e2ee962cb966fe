"""`armorm`: one console script, one sub-command per stage. It only parses and dispatches.

Each command module defines its settings as dataclasses (`ARGUMENTS`: the fields, their defaults and help, the one
home of every knob) and `main(*configs)`, the importable function that does the work and that tests call directly.
The flags are generated from the dataclasses by transformers' `HfArgumentParser`: a field `max_length` is the flag
`--max-length` (or `--max_length`), and a boolean field `truncate_prompt` the flag `--truncate-prompt`.

The commands come from five packages, and this module stands above all of them (nothing imports it):
`conversion` builds and publishes checkpoints, `evaluation` scores them on preference data, `annotation` scores data
sets with them (`armorm annotate`), `serving` serves them, and `armorm_cli.score` / `armorm_cli.explain` are the
command-line face of the `reward-scoring` pipeline.
"""

import argparse
import logging
import os
import sys

from transformers import HfArgumentParser

from annotation import annotate
from armorm_cli import explain, score
from conversion import assemble, bt, build, convert_rlhflow, decorrelate, extract, fit, gate, push
from evaluation import evaluate, rewardbench_score
from serving import serve


__all__ = ["COMMANDS", "build_parser", "console_main", "main"]

COMMANDS = {
    "annotate": annotate,
    "assemble": assemble,
    "bt": bt,
    "build": build,
    "convert-rlhflow": convert_rlhflow,
    "decorrelate": decorrelate,
    "evaluate": evaluate,
    "explain": explain,
    "extract": extract,
    "fit": fit,
    "gate": gate,
    "push": push,
    "rewardbench-score": rewardbench_score,
    "score": score,
    "serve": serve,
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    """The `armorm` parser; `parser.stage_parsers[name]` is each sub-command's `HfArgumentParser`."""
    parser = argparse.ArgumentParser(prog="armorm", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=HfArgumentParser)
    parser.stage_parsers = {}
    for name, module in COMMANDS.items():
        parser.stage_parsers[name] = subparsers.add_parser(
            name,
            dataclass_types=list(module.ARGUMENTS),
            help=module.__doc__.splitlines()[0],
            description=module.__doc__,
        )
        # The help shows each default, and the module docstring keeps its line breaks.
        parser.stage_parsers[name].formatter_class = _HelpFormatter
        for old, new in getattr(module, "RENAMED_FLAGS", {}).items():
            _add_renamed_flag(parser.stage_parsers[name], old, new)
    return parser


def _add_renamed_flag(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Accept `--<old>` for `--<new>` (a renamed flag keeps working), with a deprecation message when it is used."""
    action = next(a for a in parser._actions if f"--{new}" in a.option_strings)

    class Renamed(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            logging.getLogger("armorm").warning(
                "`%s` is deprecated and will be removed; use `--%s` (the same setting).", option_string, new
            )
            setattr(namespace, action.dest, values)

    parser.add_argument(
        f"--{old}", f"--{old.replace('-', '_')}", dest=action.dest, type=action.type, action=Renamed,
        default=argparse.SUPPRESS, help=f"Deprecated: use `--{new}`.",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Parse `argv` and run the command. Returns nothing: the console script passes the return value to `sys.exit`,
    where anything but None fails."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints the usage, the help or the error, and exits
    command, rest = argv[0], argv[1:]
    module = COMMANDS[command]
    # A command may name one list field (`POSITIONAL`) whose values can lead the arguments without their flag.
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
