"""The README's snippets run as written (with the checkpoint path pointed at a tiny checkpoint)."""

import os
import re
from pathlib import Path

import pytest

from armorm_cli.cli import COMMANDS, build_parser
from armorm_cli.reference import flags_table
from armorm_io.reports import command_line
from tests.utils import run_snippet_without_prompt, tiny_armorm, tiny_llama_config


README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


# Snippets that need more than a checkpoint folder (a server, vLLM, a trainer and its data, the metric module).
NEEDS_MORE = ("vllm", "urllib", "Trainer(", "evaluate.load")
CHECKPOINT_PATHS = ("/abs/path/to/checkpoint", "runs/demo/armorm-smollm2-demo")


def checkpoint_snippets() -> list[str]:
    return [
        block
        for block in python_blocks()
        if any(path in block for path in CHECKPOINT_PATHS) and not any(word in block for word in NEEDS_MORE)
    ]


def test_every_snippet_that_loads_a_checkpoint_never_asks_to_run_custom_code():
    """Each README snippet that loads a model or tokenizer imports the package (which registers ArmoRM) or passes
    `trust_remote_code=True` to every `from_pretrained`: none stops at `Do you wish to run the custom code? [y/N]`."""
    for block in python_blocks():
        loads = block.count("from_pretrained(") + block.count("pipeline(")
        if loads and "import modeling_armorm" not in block and "from modeling_armorm" not in block:
            assert block.count("trust_remote_code=True") >= block.count("from_pretrained("), block


def test_checkpoint_snippets_run_with_stdin_closed(tmp_path, smollm2_tokenizer):
    """Every README snippet that needs only a checkpoint runs as written (its path pointed at a tiny checkpoint), in
    a fresh interpreter with stdin closed, so a `trust_remote_code` prompt would fail it."""
    model = tiny_armorm(tiny_llama_config(vocab_size=len(smollm2_tokenizer)), tokenizer=smollm2_tokenizer)
    model.config.pad_token_id = smollm2_tokenizer.pad_token_id
    model.save_pretrained(tmp_path / "ckpt")
    smollm2_tokenizer.save_pretrained(tmp_path / "ckpt")
    snippets = checkpoint_snippets()
    assert len(snippets) >= 2  # the pipeline's and the model's own
    for i, snippet in enumerate(snippets):
        for path in CHECKPOINT_PATHS:
            snippet = snippet.replace(path, str(tmp_path / "ckpt"))
        (tmp_path / f"snippet{i}.py").write_text(snippet)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
        printed = run_snippet_without_prompt([f"snippet{i}.py"], tmp_path, env, what=snippet)
        assert printed.strip(), snippet  # it printed its result


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_flag_tables_are_the_settings_dataclasses(command):
    """Each command's flags table in the README is the one its settings dataclasses generate (same flags, defaults
    and help): regenerate with `armorm_cli.cli.flags_table(command)` when a setting changes."""
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
