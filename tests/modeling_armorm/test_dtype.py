"""The dtype a model runs in (`settings.resolve_dtype`): `auto` is the saved dtype, but float32 for a half dtype on a CPU
that only emulates it (bfloat16 runs about 4x slower than float32 there); a half dtype asked for by name is kept with
one warning per process; a GPU is unaffected. Every loader follows it: the pipeline, `armorm score`, `armorm
evaluate`, `armorm serve`, `armorm extract` and `ArmoRMReward`.

The CPU's support is monkeypatched both ways, so the tests mean the same on any machine."""

import json
import logging

import pytest
import torch
from transformers import AutoTokenizer, LlamaModel, pipeline

from armorm_cli import cli
from armorm_cli.score import ScoreConfig, load_pipeline
from conversion.extract import main as extract
from evaluation.evaluate import load_model
from modeling_armorm import ArmoRMForRewardModeling, ArmoRMReward, settings
from modeling_armorm.settings import resolve_dtype
from serving.serve import ServeConfig, build_service
from tests.utils import tiny_armorm, tiny_llama_config


pytestmark = pytest.mark.usefixtures("one_thread")

HALF = (torch.bfloat16, torch.float16)
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, like the sky at noon."}],
    [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes."}],
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, smollm2_tokenizer_dir) -> str:
    """A tiny ArmoRM saved with a bfloat16 backbone (and its float32 heads)."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    text_config = tiny_llama_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model = tiny_armorm(text_config, tokenizer=tokenizer)
    model.model.to(torch.bfloat16)
    folder = tmp_path_factory.mktemp("dtype") / "ckpt"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    return str(folder)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory, smollm2_tokenizer_dir) -> str:
    """A tiny Llama saved in bfloat16, with SmolLM2's chat template."""
    folder = tmp_path_factory.mktemp("bf16_backbone")
    torch.manual_seed(0)
    LlamaModel(tiny_llama_config(vocab_size=49152, pad_token_id=2)).to(torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_tokenizer_dir).save_pretrained(folder)
    return str(folder)


def set_native(monkeypatch, native: bool) -> None:
    """This CPU with (`native`) or without kernels for the half dtypes; the once-per-process warning forgotten."""
    monkeypatch.setattr(settings, "cpu_computes_natively", lambda dtype: native or dtype not in HALF)
    settings._warn_emulated.cache_clear()


@pytest.fixture
def emulating_cpu(monkeypatch):
    set_native(monkeypatch, False)
    yield
    settings._warn_emulated.cache_clear()


@pytest.fixture
def native_cpu(monkeypatch):
    set_native(monkeypatch, True)
    yield
    settings._warn_emulated.cache_clear()


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == settings.__name__ and r.levelno == logging.WARNING]


def scores(rm) -> list[float]:
    return [result["score"] for result in rm.score(CONVERSATIONS)]


def loaded_dtypes(checkpoint: str, backbone: str, dtype: str, tmp_path) -> dict[str, torch.dtype]:
    """The backbone dtype every loader runs the checkpoint (or, for `armorm extract`, the backbone) in, on the CPU."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No."}) + "\n")
    meta = extract(backbone=backbone, data=str(pairs), out=str(tmp_path / "features"), kind="pairs", dtype=dtype)
    named = {"auto": "auto", "bfloat16": torch.bfloat16}[dtype]
    reward = ArmoRMReward(checkpoint, device="cpu") if dtype == "auto" else None  # it has no dtype argument
    models = {
        "pipeline": pipeline("reward-scoring", model=checkpoint, device="cpu", dtype=named).model,
        "armorm score": load_pipeline(ScoreConfig(model=checkpoint, device="cpu", dtype=dtype)).model,
        "armorm evaluate": load_model(checkpoint, dtype, "cpu"),
        "armorm serve": build_service(ServeConfig(model=checkpoint, device="cpu", dtype=dtype)).backend.model,
        **({"ArmoRMReward": reward._load()[0]} if reward is not None else {}),
    }
    for name, model in models.items():
        assert model.regression_layer.weight.dtype == torch.float32, f"{name}: the heads stay float32"
    return {"armorm extract": getattr(torch, meta["backbone_dtype"])} | {k: m.model.dtype for k, m in models.items()}


@pytest.mark.parametrize(
    "dtype, device, saved, native, expected",
    [
        ("auto", "cpu", torch.bfloat16, False, torch.float32),
        ("auto", "cpu", torch.float16, False, torch.float32),
        ("auto", "cpu", torch.float32, False, torch.float32),
        ("auto", "cpu", torch.bfloat16, True, torch.bfloat16),
        ("auto", "cuda", torch.bfloat16, False, torch.bfloat16),
        ("auto", "cuda:1", torch.float16, False, torch.float16),
        ("bfloat16", "cpu", torch.float32, False, torch.bfloat16),
        ("float32", "cpu", torch.bfloat16, False, torch.float32),
        (torch.float16, "cpu", torch.bfloat16, False, torch.float16),
        ("bfloat16", "cuda", torch.float32, False, torch.bfloat16),
    ],
)
def test_resolve_dtype(monkeypatch, dtype, device, saved, native, expected):
    set_native(monkeypatch, native)
    assert resolve_dtype(dtype, torch.device(device), saved) == expected


def test_only_a_half_dtype_named_on_an_emulating_cpu_warns(emulating_cpu, caplog):
    for device in ("cuda", "cpu"):
        for dtype in ("auto", "float32"):
            resolve_dtype(dtype, device, torch.bfloat16)
        resolve_dtype("bfloat16", "cuda", torch.bfloat16)
    assert warnings_of(caplog) == []
    resolve_dtype("bfloat16", "cpu", torch.bfloat16)
    resolve_dtype(torch.bfloat16, "cpu", torch.float32)
    resolve_dtype("float16", "cpu", torch.float16)
    warnings = warnings_of(caplog)
    assert len(warnings) == 2  # once per dtype and process
    assert (
        "no native bfloat16" in warnings[0] and "about 4x slower" in warnings[0] and "--dtype float32" in warnings[0]
    )
    assert "no native float16" in warnings[1]


def test_auto_runs_a_bfloat16_checkpoint_in_float32_on_a_cpu_without_bfloat16(
    checkpoint, backbone, emulating_cpu, caplog, capsys, tmp_path
):
    dtypes = loaded_dtypes(checkpoint, backbone, "auto", tmp_path)
    assert dtypes == dict.fromkeys(dtypes, torch.float32) and len(dtypes) == 6
    assert warnings_of(caplog) == []
    # The scores are those of the checkpoint loaded in float32 by hand (bfloat16 to float32 is exact), through the
    # pipeline and `armorm score`; in bfloat16 they differ.
    by_hand = ArmoRMForRewardModeling.from_pretrained(checkpoint, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    expected = scores(pipeline("reward-scoring", model=by_hand, tokenizer=tokenizer, device="cpu"))
    assert scores(pipeline("reward-scoring", model=checkpoint, device="cpu")) == expected
    conversations = tmp_path / "conversations.jsonl"
    conversations.write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS))
    capsys.readouterr()
    cli.main(["score", "--model", checkpoint, "--input", str(conversations), "--device", "cpu", "--json"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["score"] for r in printed] == expected
    in_bfloat16 = scores(pipeline("reward-scoring", model=checkpoint, device="cpu", dtype=torch.bfloat16))
    assert all(a != b for a, b in zip(in_bfloat16, expected))


def test_bfloat16_named_on_a_cpu_without_it_is_kept_with_one_warning(
    checkpoint, backbone, emulating_cpu, caplog, tmp_path
):
    dtypes = loaded_dtypes(checkpoint, backbone, "bfloat16", tmp_path)
    assert dtypes == dict.fromkeys(dtypes, torch.bfloat16) and len(dtypes) == 5
    warnings = warnings_of(caplog)
    assert len(warnings) == 1, warnings
    assert "about 4x slower than in float32" in warnings[0] and "SmolLM2-135M" in warnings[0]


def test_auto_keeps_bfloat16_on_a_cpu_with_it(checkpoint, backbone, native_cpu, caplog, tmp_path):
    dtypes = loaded_dtypes(checkpoint, backbone, "auto", tmp_path)
    assert dtypes == dict.fromkeys(dtypes, torch.bfloat16) and len(dtypes) == 6
    assert warnings_of(caplog) == []
