"""The README's snippets run as written (with the checkpoint path pointed at a tiny checkpoint)."""

import re
from pathlib import Path

import pytest

from conversion.cli import COMMANDS, build_parser, command_line, flags_table
from tests.utils import tiny_armorm, tiny_llama_config


README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_score_and_explain_snippet_runs(tmp_path, smollm2_tokenizer, capsys):
    model = tiny_armorm(tiny_llama_config(vocab_size=len(smollm2_tokenizer)), tokenizer=smollm2_tokenizer)
    model.config.pad_token_id = smollm2_tokenizer.pad_token_id
    model.save_pretrained(tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)
    snippet = next(
        block for block in python_blocks() if "Score and explain" in README.read_text() and "contributions" in block
    )
    exec(snippet.replace("/abs/path/to/checkpoint", str(tmp_path)), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("score ") and len(printed) == 5


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_flag_tables_are_the_settings_dataclasses(command):
    """Each command's flags table in the README is the one its settings dataclasses generate (same flags, defaults
    and help): regenerate with `conversion.cli.flags_table(command)` when a setting changes."""
    assert flags_table(command) in README.read_text(), f"the README's `armorm {command}` table is stale"


def test_every_flag_of_a_stage_parses_to_its_dataclass_field():
    """The generated flags are the dataclass fields: every non-default value given on the command line arrives in
    the config, and `command_line` writes back the same command."""
    from conversion.gate import GateConfig

    argv = ["--features", "a", "b", "--regression", "r", "--transform", "t", "--out", "o", "--steps", "7"]
    argv += ["--gating-hidden-dim", "16", "--gating-logit-scale-init", "2.5", "--device", "cpu"]
    (config,) = build_parser().stage_parsers["gate"].parse_args_into_dataclasses(argv)
    assert config == GateConfig(
        features=["a", "b"], regression="r", transform="t", out="o", steps=7, gating_hidden_dim=16,
        gating_logit_scale_init=2.5, device="cpu",
    )  # fmt: skip
    assert command_line("gate", config) == "armorm gate " + " ".join(argv)
