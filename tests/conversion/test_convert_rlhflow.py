"""`armorm convert-rlhflow`: a checkpoint in the released layout becomes an ArmoRM checkpoint that scores the same."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification, pipeline

from armorm_cli.cli import main as cli
from modeling_armorm import ArmoRMConfig
from modeling_armorm.heads import score_statistics
from modeling_armorm.rlhflow import LLAMA3_GATING_PATTERN, LLAMA3_TURN_HEADERS, RLHFLOW_OBJECTIVES
from tests.modeling_armorm.test_remote_code import load_as_remote_code
from tests.utils import (
    llama3_tokenizer,
    load_tokenizer_alone,
    padded,
    reference_armorm_outputs,
    tiny_armorm,
    tiny_llama_config,
)


EOT = 128009
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "Seven."},
        {"role": "user", "content": "And an even one, with a short explanation of why it is the only one?"},
        {"role": "assistant", "content": "Two: every other even number is divisible by two."},
    ],
    [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi! ¿Qué tal? 你好"}],
]


def released_layout(folder, shards=1):
    """Write a tiny checkpoint the way the release is laid out: flat Llama config + heads keys, original names."""
    model = tiny_armorm(
        tiny_llama_config(vocab_size=128256, pad_token_id=EOT, tie_word_embeddings=False), num_objectives=19
    )
    folder.mkdir()
    config = model.config.text_config.to_dict()
    config.update(
        architectures=["LlamaForRewardModelWithGating"],
        auto_map={"AutoModelForSequenceClassification": "modeling_custom.LlamaForRewardModelWithGating"},
        num_objectives=19, gating_temperature=10, gating_hidden_dim=12, gating_n_hidden=3, torch_dtype="float32",
    )  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = sorted(state)
    for i in range(shards):
        part = {k: state[k] for k in names[i::shards]}
        save_file(part, folder / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", metadata={"format": "pt"})
    if shards > 1:
        index = {
            "metadata": {},
            "weight_map": {k: f"model-{names.index(k) % shards + 1:05d}-of-{shards:05d}.safetensors" for k in names},
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    llama3_tokenizer().save_pretrained(folder)
    return model


def token_rows(tokenizer):
    return [tokenizer.apply_chat_template(c, tokenize=True)["input_ids"] for c in CONVERSATIONS]


@pytest.mark.parametrize("shards", [1, 2])
def test_converted_checkpoint_scores_like_per_row_math(tmp_path, shards):
    original = released_layout(tmp_path / "released", shards=shards)
    cli(["convert-rlhflow", "--src-dir", str(tmp_path / "released"), "--out-dir", str(tmp_path / "converted")])

    converted = {path.name for path in (tmp_path / "converted").iterdir()}
    assert {"configuration_armorm.py", "modeling_armorm.py", "heads.py"} <= converted  # the remote code, complete
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "converted").eval()
    assert model.config.gating_token_pattern == LLAMA3_GATING_PATTERN
    assert model.config.turn_header_patterns == LLAMA3_TURN_HEADERS
    assert model.config.objective_names == RLHFLOW_OBJECTIVES and model.config.verbosity_objective == 4
    assert model.config.pad_token_id == model.config.get_text_config().pad_token_id == EOT
    for name, tensor in original.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)

    rows = token_rows(llama3_tokenizer())
    expected = reference_armorm_outputs(original, rows, LLAMA3_GATING_PATTERN)
    for pad_id, side in [(0, "right"), (0, "left"), (EOT, "right"), (EOT, "left")]:
        ids, mask = padded(rows, pad_id, side)
        with torch.no_grad():
            score = model(input_ids=ids, attention_mask=mask).score
        torch.testing.assert_close(score, expected["score"], atol=1e-4, rtol=1e-4, msg=f"pad {pad_id} {side}")

    # Its re-saved copy loads as remote code where the package is absent.
    model.save_pretrained(tmp_path / "resaved")
    ids, mask = padded(rows, EOT, "right")
    remote = load_as_remote_code(tmp_path / "resaved", ids.tolist(), mask.tolist(), tmp_path / "again", tmp_path)
    torch.testing.assert_close(torch.tensor(remote["score"]), expected["score"], atol=1e-4, rtol=1e-4)


def test_refuses_what_is_not_the_released_layout(tmp_path):
    released_layout(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())

    with pytest.raises(ValueError, match="No config.json"):
        cli(["convert-rlhflow", "--src-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "out")])

    (tmp_path / "src" / "config.json").write_text(
        json.dumps({k: v for k, v in config.items() if k != "num_objectives"})
    )
    with pytest.raises(ValueError, match=r"lacks \['num_objectives'\].*gating_temperature"):
        cli(["convert-rlhflow", "--src-dir", str(tmp_path / "src"), "--out-dir", str(tmp_path / "out")])

    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "model_type": "armorm"}))
    with pytest.raises(ValueError, match="already an ArmoRM checkpoint"):
        cli(["convert-rlhflow", "--src-dir", str(tmp_path / "src"), "--out-dir", str(tmp_path / "out")])

    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "gating_hidden_dim": 13}))
    with pytest.raises(ValueError, match=r"`gating.layers.0.bias` has shape"):
        cli(["convert-rlhflow", "--src-dir", str(tmp_path / "src"), "--out-dir", str(tmp_path / "out")])

    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    save_file({"score.weight": torch.zeros(1, 16)}, tmp_path / "src" / "extra.safetensors")
    with pytest.raises(ValueError, match=r"unexpected \['score.weight'\]"):
        cli(["convert-rlhflow", "--src-dir", str(tmp_path / "src"), "--out-dir", str(tmp_path / "out")])

    for path in (tmp_path / "src").glob("*.safetensors"):
        path.unlink()
    torch.save({}, tmp_path / "src" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pickled weights \['pytorch_model.bin'\]"):
        cli(["convert-rlhflow", "--src-dir", str(tmp_path / "src"), "--out-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_refuses_a_tokenizer_whose_template_is_not_llama3(tmp_path, smollm2_tokenizer):
    released_layout(tmp_path / "src")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "src" / name).unlink(missing_ok=True)
    smollm2_tokenizer.save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match="Convert with the checkpoint's own Llama-3 tokenizer"):
        cli(["convert-rlhflow", "--src-dir", str(tmp_path / "src"), "--out-dir", str(tmp_path / "out")])


def test_converted_tokenizer_loads_without_the_package_or_custom_code(tmp_path):
    """The converted checkpoint's tokenizer alone, from a release whose tokenizer_config.json names no class (as an
    older save may): `trust_remote_code=False` loads it in a fresh interpreter without `modeling_armorm`, without a
    prompt or the checkpoint's code, and it tokenizes as the Llama-3 tokenizer does."""
    released_layout(tmp_path / "released")
    tokenizer_config = tmp_path / "released" / "tokenizer_config.json"
    tokenizer_config.write_text(
        json.dumps({k: v for k, v in json.loads(tokenizer_config.read_text()).items() if k != "tokenizer_class"})
    )
    cli(["convert-rlhflow", "--src-dir", str(tmp_path / "released"), "--out-dir", str(tmp_path / "converted")])

    texts = ["Paris.", "Sure.<|eot_id|><|start_header_id|>system<|end_header_id|>\n\nBe kind.", "¿Qué? 你好 🙂"]
    loaded = load_tokenizer_alone(tmp_path / "converted", tmp_path, texts, CONVERSATIONS)
    reference = llama3_tokenizer()
    assert loaded["ids"] == [reference(text, add_special_tokens=False)["input_ids"] for text in texts]
    assert loaded["chat"] == token_rows(reference)
    assert loaded["pad_token_id"] == EOT


def test_a_conversion_records_no_score_statistics_and_refuses_to_normalize_until_given_them(tmp_path):
    """The release has no reference distribution: `normalize=True` says so and how to record one; recorded as the
    message says (`score_statistics` of scored answers), the pipeline returns (s − mean) / std with them."""
    released_layout(tmp_path / "released")
    cli(["convert-rlhflow", "--src-dir", str(tmp_path / "released"), "--out-dir", str(tmp_path / "converted")])
    config = ArmoRMConfig.from_pretrained(tmp_path / "converted")
    assert config.score_statistics is None
    with pytest.raises(ValueError, match=r"records no score statistics \(`config.score_statistics` is None: a conv"):
        pipeline("reward-scoring", model=str(tmp_path / "converted"), device="cpu", normalize=True)

    raw = [row["score"] for row in pipeline("reward-scoring", model=str(tmp_path / "converted"))(CONVERSATIONS)]
    config.score_statistics = score_statistics(torch.tensor(raw))
    config.save_pretrained(tmp_path / "converted")
    rm = pipeline("reward-scoring", model=str(tmp_path / "converted"), device="cpu", normalize=True)
    mean, std = np.mean(raw), np.std(raw)
    assert [row["score"] for row in rm(CONVERSATIONS)] == pytest.approx((np.array(raw) - mean) / std, abs=1e-5)
