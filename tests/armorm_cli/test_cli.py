"""The `armorm` console script: what the dispatcher relies on in every command module, the help of every command,
the entry point, the reference page, and a finished command exits with status 0."""

import configparser
import dataclasses
import inspect
import os
import re
import subprocess
import sys
import typing
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import pytest
import torch

from armorm_cli.cli import COMMANDS, console_main, main
from armorm_io.features import write_features


REPO = Path(__file__).resolve().parents[2]


def test_every_command_module_has_settings_dataclasses_and_a_main_that_takes_them():
    """The dispatcher parses a command line into `module.ARGUMENTS` (dataclasses, the one home of every flag) and
    calls `module.main(*configs)`: each module must have both, `main` taking one instance of each, in order."""
    for name, module in COMMANDS.items():
        arguments = getattr(module, "ARGUMENTS", None)
        assert isinstance(arguments, tuple) and arguments, f"`{module.__name__}.ARGUMENTS` is {arguments!r}"
        for config_class in arguments:
            assert isinstance(config_class, type) and dataclasses.is_dataclass(config_class), (name, config_class)
        assert callable(getattr(module, "main", None)), f"`armorm {name}`: {module.__name__} has no `main`"
        signature = inspect.signature(module.main)
        signature.bind(*arguments)  # a TypeError when `main` cannot take one config per dataclass
        hints = typing.get_type_hints(module.main)
        positional = [
            p for p in signature.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        for config_class, parameter in zip(arguments, positional):
            accepted = typing.get_args(hints[parameter.name]) or (hints[parameter.name],)
            assert config_class in accepted, (
                f"{module.__name__}.main({parameter.name}: {hints[parameter.name]}) gets a {config_class.__name__}"
            )
        assert module.__doc__ and module.__doc__.strip(), f"{module.__name__} has no docstring for `armorm --help`"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_shows_the_usage_and_every_flag(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    printed = capsys.readouterr().out
    assert exit_info.value.code == 0 and printed.startswith(f"usage: armorm {name} ")
    assert COMMANDS[name].__doc__.strip().splitlines()[0] in printed
    for config_class in COMMANDS[name].ARGUMENTS:
        for field in dataclasses.fields(config_class):
            assert f"--{field.name.replace('_', '-')}" in printed, f"`armorm {name} --help` lacks `{field.name}`"


def test_console_script_is_the_dispatcher():
    """The `armorm` script that setup.cfg declares resolves to `console_main`, and the installed package declares the
    same (else reinstall it: `pip install -e .`)."""
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    lines = setup["options.entry_points"]["console_scripts"].strip().splitlines()
    scripts = {name.strip(): value.strip() for name, _, value in (line.partition("=") for line in lines)}
    entry_point = EntryPoint(name="armorm", value=scripts["armorm"], group="console_scripts")
    assert entry_point.load() is console_main
    installed = [e.value for e in entry_points(group="console_scripts") if e.name == "armorm"]
    assert installed == [entry_point.value]


def test_every_command_has_a_section_in_the_cli_reference():
    page = REPO / "docs" / "cli.md"
    if not page.is_file():
        pytest.skip("docs/cli.md is not written yet")
    sections = re.findall(r"^## `armorm ([\w-]+)`$", page.read_text(), flags=re.MULTILINE)
    assert sorted(sections) == sorted(COMMANDS)


def test_console_script_exits_zero_after_a_stage(tmp_path):
    torch.manual_seed(0)
    write_features(tmp_path / "f", "ratings", {"embeddings": torch.randn(40, 4), "labels": torch.rand(40, 2)})
    script = os.path.join(os.path.dirname(sys.executable), "armorm")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "armorm_cli"]
    result = subprocess.run(
        [*command, "fit", "--features", str(tmp_path / "f"), "--out", str(tmp_path / "r.safetensors")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "r.safetensors").is_file()
