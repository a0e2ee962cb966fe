"""The `armorm` console script: every stage is registered, and a finished command exits with status 0."""

import os
import subprocess
import sys

import pytest
import torch

from armorm_cli.cli import COMMANDS, build_parser
from armorm_io.features import write_features


def test_every_stage_is_registered_with_help(capsys):
    assert set(COMMANDS) == {
        "extract", "fit", "decorrelate", "gate", "assemble", "push", "build", "convert-rlhflow", "evaluate",
        "rewardbench-score", "serve", "score", "explain",
    }  # fmt: skip
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([name, "--help"])
        assert exit_info.value.code == 0 and f"usage: armorm {name}" in capsys.readouterr().out


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
