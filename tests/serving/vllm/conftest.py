"""Fixtures of the vLLM tests, which run in vLLM's own environment (`make test-vllm`: .venv-vllm).

The references come from the main environment: `ARMORM_REFERENCE_PYTHON` (the Makefile passes `.venv/bin/python`)
runs `tests/serving/vllm/make_reference.py`, which builds the checkpoints and scores them with `ArmoRMForRewardModeling`
through `modeling_armorm.scoring` on the transformers release the package is developed with. Each side is real: the
checkpoint files and the expected outputs cross between the two environments, nothing else does.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[3]
# vLLM writes compilation caches under VLLM_CACHE_ROOT (default ~/.cache/vllm): keep them in the work folder.
os.environ.setdefault("VLLM_CACHE_ROOT", str(REPO / ".venv-vllm" / "cache"))

# The engine settings every test engine shares: float32 (the exactness bar is float32's), no compilation (minutes on
# two CPU cores), a small KV cache (vLLM sizes it from free memory otherwise), 32-token blocks (the CPU backend's
# smallest) and 64-token prefill chunks, so that a long conversation is split over several steps.
ENGINE = dict(
    runner="pooling",
    dtype="float32",
    enforce_eager=True,
    kv_cache_memory_bytes=64 << 20,
    max_model_len=512,
    block_size=32,
    enable_prefix_caching=True,
    enable_chunked_prefill=True,
    max_num_batched_tokens=64,
    max_num_seqs=16,
)


def reference_python() -> str:
    given = os.environ.get("ARMORM_REFERENCE_PYTHON")
    if given:
        return given
    main_venv = REPO / ".venv" / "bin" / "python"
    return str(main_venv) if main_venv.exists() else sys.executable


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
    """A folder with the `armorm` and `rlhflow` checkpoints and `cases.json` (see `make_reference.py`)."""
    out = tmp_path_factory.mktemp("armorm-reference")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [reference_python(), str(REPO / "tests" / "serving" / "vllm" / "make_reference.py"), str(out)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def cases(reference) -> dict:
    return json.loads((reference / "cases.json").read_text())
