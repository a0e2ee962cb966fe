"""The knobs several commands share (dtype, device, batch size, max length, the length policy, the score's scale,
the backend): one declaration in `modeling_armorm.settings`, one help text, one default and one flag name in every
command, `armorm build`'s prefixed flags included, and no default of their own in the library functions of the
scoring path."""

import ast
import dataclasses
import typing
from pathlib import Path

import pytest

from armorm_cli.cli import COMMANDS, build_parser
from conversion import build
from conversion.assemble import AssembleSettings
from conversion.bt import BTSettings
from conversion.extract import ExtractSettings
from conversion.gate import GateSettings
from evaluation.evaluate import EvaluateSettings
from modeling_armorm.settings import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_LENGTH,
    BackendSettings,
    BatchSettings,
    DeviceSettings,
    DtypeSettings,
    LengthSettings,
    ScaleSettings,
)
from serving.serve import ServeSettings


ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("modeling_armorm", "armorm_io", "evaluation", "conversion", "serving", "armorm_cli")
# Each shared knob and the group that declares it.
SHARED = {
    "dtype": DtypeSettings,
    "device": DeviceSettings,
    "batch_size": BatchSettings,
    "max_batch_tokens": BatchSettings,
    "max_length": LengthSettings,
    "truncate_prompt": LengthSettings,
    "normalize": ScaleSettings,
    "backend": BackendSettings,
    "vllm_engine_args": BackendSettings,
}
BACKEND = {"backend", "vllm_engine_args"}
# A field that has a shared knob's name but is another knob, and why.
OTHER_KNOBS = {
    (GateSettings, "batch_size"): "pairs per optimizer step on stored features, not conversations per forward pass",
    (BTSettings, "batch_size"): "pairs per training step and device (two forwards each), as TRL counts a batch",
    (ServeSettings, "max_batch_tokens"): "the budget beside the server's `max_batch_rows`, not `batch_size`",
}
# The shared knobs each command has (`build`: through its stages' prefixed flags).
EXPECTED = {
    "extract": set(SHARED) - {"normalize"} - BACKEND,
    "evaluate": set(SHARED) - {"normalize"} - BACKEND,
    "score": set(SHARED) - BACKEND,
    "explain": set(SHARED) - BACKEND,
    "serve": {"dtype", "device", "normalize"} | BACKEND,
    "assemble": {"dtype"},
    "gate": {"device"},
    "bt": {"dtype", "max_length", "truncate_prompt"},
    "build": set(SHARED) - {"normalize"} - BACKEND,
    "annotate": set(SHARED),
}


def settings_classes(module) -> list[tuple[str, type]]:
    """(flag prefix, settings dataclass) of a command: its `ARGUMENTS`, or for `build` each stage's, whose field
    `<name>` is the flag `--<stage>-<name>` (`build.ARGUMENTS` hold the prefixed copies)."""
    if module is build:
        return [(f"{stage}_", config_class) for stage, config_class in build.STAGES.items()]
    return [("", config_class) for config_class in module.ARGUMENTS]


def declaring_class(config_class: type, name: str) -> type:
    """The class whose own `__annotations__` declare the field `name`."""
    return next(klass for klass in config_class.__mro__ if name in klass.__dict__.get("__annotations__", {}))


def shared_fields(config_class: type):
    for f in dataclasses.fields(config_class):
        if f.name in SHARED and (declaring_class(config_class, f.name), f.name) not in OTHER_KNOBS:
            yield f


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_shared_knob_is_declared_once_in_settings(command):
    found = set()
    for _, config_class in settings_classes(COMMANDS[command]):
        for f in shared_fields(config_class):
            owner = declaring_class(config_class, f.name)
            assert owner is SHARED[f.name], (
                f"`{config_class.__name__}.{f.name}` is declared in {owner.__module__}.{owner.__qualname__}: inherit "
                f"`modeling_armorm.settings.{SHARED[f.name].__name__}` instead of declaring it again."
            )
            found.add(f.name)
    assert found == EXPECTED.get(command, set())


def flag_actions(parser, name: str) -> list:
    """The actions of `parser` whose flag is `--<name>` (dashes or underscores)."""
    flag = "--" + name.replace("_", "-")
    return [action for action in parser._actions if flag in action.option_strings]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_shared_flag_has_the_groups_name_help_and_default(command):
    """`--dtype` (or `--extract-dtype` in `armorm build`) everywhere: the group's help text and default."""
    parser = build_parser().stage_parsers[command]
    for prefix, config_class in settings_classes(COMMANDS[command]):
        for f in shared_fields(config_class):
            group = SHARED[f.name].__dataclass_fields__[f.name]
            (action,) = flag_actions(parser, prefix + f.name)
            flag = "--" + (prefix + f.name).replace("_", "-")
            assert action.help == group.metadata["help"], flag
            assert action.default == group.default, flag


def test_gate_batch_size_is_its_own_knob():
    (action,) = flag_actions(build_parser().stage_parsers["gate"], "batch_size")
    assert action.default == 1024 and "Pairs per optimizer step" in action.help
    assert action.help != BatchSettings.__dataclass_fields__["batch_size"].metadata["help"]


def required_values(config_class: type) -> dict:
    """Placeholder values for the fields without a default (paths, a `Literal`'s first choice)."""
    hints = typing.get_type_hints(config_class)
    values = {}
    for f in dataclasses.fields(config_class):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            hint = hints[f.name]
            if typing.get_origin(hint) is typing.Literal:
                values[f.name] = typing.get_args(hint)[0]
            else:
                values[f.name] = ["x"] if typing.get_origin(hint) is list else "x"
    return values


BAD = {"dtype": "float64", "batch_size": 0, "max_batch_tokens": 0, "max_length": 0}


@pytest.mark.parametrize("command", sorted(set(COMMANDS) - {"build"}))
def test_each_config_runs_the_checks_of_its_groups(command):
    """Every `__post_init__` calls `super().__post_init__()`, so a group's check runs in every config built on it
    (before the command's own checks, which placeholder paths might fail)."""
    for _, config_class in settings_classes(COMMANDS[command]):
        for f in shared_fields(config_class):
            if f.name in BAD:
                with pytest.raises(ValueError, match=f"`{f.name}` must be"):
                    config_class(**required_values(config_class), **{f.name: BAD[f.name]})


def test_build_stage_flags_parse_into_the_nested_settings():
    argv = ["--backbone", "B", "--ratings", "r.jsonl", "--pairs", "p.jsonl", "--out", "ckpt"]
    argv += ["--extract-dtype", "float32", "--extract-max-length", "512", "--extract-truncate-prompt"]
    argv += ["--evaluate-batch-size", "2", "--evaluate-device", "cpu", "--assemble-dtype", "bfloat16"]
    argv += ["--gate-batch-size", "64", "--gate-device", "cpu"]
    parser = build_parser().stage_parsers["build"]
    inputs, *flags = parser.parse_args_into_dataclasses(argv)
    config = build._from_flags(inputs, flags)
    assert config.extract == ExtractSettings(dtype="float32", max_length=512, truncate_prompt=True)
    assert config.evaluate == EvaluateSettings(batch_size=2, device="cpu")
    assert config.assemble == AssembleSettings(dtype="bfloat16")
    assert (config.gate.batch_size, config.gate.device) == (64, "cpu")
    assert config.extract.batch_size == DEFAULT_BATCH_SIZE and config.evaluate.max_length == DEFAULT_MAX_LENGTH
    # The group's check runs on the nested settings too.
    inputs, *flags = parser.parse_args_into_dataclasses([*argv, "--extract-batch-size", "0"])
    with pytest.raises(ValueError, match="`batch_size` must be at least 1"):
        build._from_flags(inputs, flags)
    with pytest.raises(SystemExit):  # not a choice of `--dtype`
        parser.parse_args_into_dataclasses([*argv, "--evaluate-dtype", "float64"])


# A parameter with a shared knob's name whose number is another knob, and why.
OTHER_DEFAULTS = {
    ("conversion/gate.py", "evaluate", "batch_size"): "pairs per evaluation chunk of stored features",
}


def test_library_functions_take_the_shared_defaults():
    """`batch_size` / `max_length` parameters default to None or to `DEFAULT_BATCH_SIZE` / `DEFAULT_MAX_LENGTH`,
    never to a number of their own (`score_encoded`, `ArmoRMReward`, the pipeline, `evaluate.score_rows`, ...)."""
    own = []
    for path in (p for package in PACKAGES for p in sorted((ROOT / package).glob("**/*.py"))):
        where = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), where)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            positional = node.args.posonlyargs + node.args.args
            defaults = [None] * (len(positional) - len(node.args.defaults)) + node.args.defaults
            for arg, default in [*zip(positional, defaults), *zip(node.args.kwonlyargs, node.args.kw_defaults)]:
                if arg.arg not in ("batch_size", "max_batch_tokens", "max_length"):
                    continue
                if (where, node.name, arg.arg) in OTHER_DEFAULTS:
                    continue
                if isinstance(default, ast.Constant) and default.value is not None:
                    own.append(f"{where}: {node.name}({arg.arg}={default.value})")
    assert not own, own
