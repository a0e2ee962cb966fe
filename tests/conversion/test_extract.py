"""`armorm extract`: features equal to a per-row forward, data order, resume, skipped rows, truncation, 2 ranks.

Every expected feature is computed here independently: the conversation tokenized by `apply_chat_template(...,
tokenize=True)`, one unpadded forward per response, h at the last token and h_x at the last occurrence of the
gating pattern found by a plain Python scan.
"""

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, LlamaModel

from armorm_cli.cli import main as cli_main
from armorm_io.backbone import load_backbone, load_tokenizer
from armorm_io.data import load_pairs
from armorm_io.features import load_features, read_meta
from armorm_io.files import file_sha256
from conversion import extract as extract_module
from conversion.extract import main as extract
from tests.armorm_io.test_pair_keys import independent_key
from tests.utils import (
    SHARED_DATA,
    SMOLLM2_GGUF,
    BackboneForwards,
    requires_shared_data,
    requires_smollm2,
    smollm2_dir,
    tiny_llama_config,
)


pytestmark = [requires_shared_data, pytest.mark.usefixtures("one_thread")]
REPO = Path(__file__).resolve().parents[2]
ATOL = 1e-5
OBJECTIVES = ["helpsteer-helpfulness", "topicalchat-overall", "ultrafeedback-overall_score"]


@pytest.fixture(scope="module")
def backbone(smollm2_tokenizer_dir, tmp_path_factory) -> str:
    """A tiny random Llama with SmolLM2's vocabulary, saved with SmolLM2's real ChatML tokenizer."""
    folder = tmp_path_factory.mktemp("backbone")
    torch.manual_seed(0)
    LlamaModel(tiny_llama_config(vocab_size=49152, pad_token_id=2)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_tokenizer_dir).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def reference(backbone):
    return Reference(backbone)


class Reference:
    """Per-row, unpadded forwards: the ground truth the batched extraction must reproduce."""

    def __init__(self, folder: str):
        self.model = AutoModel.from_pretrained(folder).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        # ChatML: the prompt's `<|im_end|>` right before the last `\n<|im_start|>assistant\n`.
        self.pattern = self.tokenizer("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]

    def ids(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]

    def gating_position(self, ids: list[int]) -> int:
        n = len(self.pattern)
        for start in range(len(ids) - n, -1, -1):
            if ids[start : start + n] == self.pattern:
                return start
        raise AssertionError("no gating pattern")

    @torch.no_grad()
    def features(self, messages: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """(h at the last token, h_x at the gating position) of one conversation."""
        ids = self.ids(messages)
        hidden = self.model(input_ids=torch.tensor([ids])).last_hidden_state[0]  # (seq, d)
        return hidden[-1], hidden[self.gating_position(ids)]


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


@pytest.fixture(scope="module")
def mixed_ratings(tmp_path_factory) -> tuple[str, list[dict]]:
    """Real rated rows of three sources in one file: multi-turn, system turns, objectives only some rows carry."""
    rows = (
        read_jsonl(SHARED_DATA / "ratings" / "topical_chat.jsonl")[:14]
        + read_jsonl(SHARED_DATA / "ratings" / "helpsteer2_sample.jsonl")
        + read_jsonl(SHARED_DATA / "ratings" / "ultrafeedback_sample_scores.jsonl")[:10]
    )
    rows = [rows[i] for i in torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()]
    return write_jsonl(tmp_path_factory.mktemp("ratings") / "mixed.jsonl", rows), rows


def test_ratings_equal_per_row_forward_with_labels_in_data_order(backbone, reference, mixed_ratings, tmp_path):
    data, rows = mixed_ratings
    meta = extract(
        backbone=backbone,
        data=data,
        out=str(tmp_path),
        kind="ratings",
        objectives=OBJECTIVES,
        batch_size=5,
        shard_rows=8,
    )
    tensors, read_back = load_features(tmp_path)

    assert meta == read_back
    assert meta["kind"] == "ratings" and meta["objectives"] == OBJECTIVES and meta["hidden_size"] == 16
    assert meta["counts"]["rows"] == len(rows) and meta["skipped"] == []
    assert len(meta["shards"]) == math.ceil(len(rows) / 8)
    assert tensors["index"].tolist() == list(range(len(rows)))
    expected_labels = torch.tensor([[row.get(name, math.nan) for name in OBJECTIVES] for row in rows])
    torch.testing.assert_close(tensors["labels"], expected_labels, equal_nan=True, rtol=0, atol=0)
    assert tensors["labels"].isnan().any(), "the data must hold missing labels"
    expected = torch.stack([reference.features(row["messages"])[0] for row in rows])
    torch.testing.assert_close(tensors["embeddings"], expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    "path, split",
    [
        ("raw/hh_rlhf_harmless_base_test.jsonl.gz", "train[:16]"),  # Anthropic HH transcripts
        ("raw/ultrafeedback_sample_train.jsonl", "train[:12]"),  # prompt + chosen + rejected strings
        ("pairs/llama_factory_dpo_demo.jsonl", "train[:10]"),  # multi-turn message lists
    ],
)
def test_pairs_equal_per_row_forward(backbone, reference, path, split, tmp_path):
    data = str(SHARED_DATA / path)
    meta = extract(
        backbone=backbone, data=data, out=str(tmp_path), kind="pairs", split=split, batch_size=3, shard_rows=5
    )
    tensors, _ = load_features(tmp_path)
    pairs = load_pairs(data, split)

    assert meta["kind"] == "pairs" and meta["skipped"] == pairs.skipped and meta["counts"]["rows"] == len(pairs)
    assert tensors["index"].tolist() == pairs.index
    assert tensors["embeddings"].shape == (len(pairs), 2, 16)
    for row, (chosen, rejected) in enumerate(zip(pairs.chosen, pairs.rejected)):
        h_chosen, h_x = reference.features(chosen)
        h_rejected, h_x_rejected = reference.features(rejected)
        torch.testing.assert_close(tensors["embeddings"][row, 0], h_chosen, rtol=0, atol=ATOL)
        torch.testing.assert_close(tensors["embeddings"][row, 1], h_rejected, rtol=0, atol=ATOL)
        torch.testing.assert_close(tensors["prompt_embeddings"][row], h_x, rtol=0, atol=ATOL)
        # Causal attention: the rejected side's pass gives the same prompt feature, so storing one loses nothing.
        torch.testing.assert_close(h_x_rejected, h_x, rtol=0, atol=ATOL)
        assert int(tensors["prompt_keys"][row]) == independent_key(chosen[:-1])
        assert int(tensors["pair_keys"][row]) == independent_key([*chosen, rejected[-1]])


@pytest.mark.parametrize("interruption", ["raise mid-run", "delete the last shard"])
def test_resume_gives_identical_files(backbone, mixed_ratings, tmp_path, monkeypatch, interruption):
    data, _ = mixed_ratings
    kwargs = dict(objectives=OBJECTIVES, batch_size=4, shard_rows=6)
    extract(backbone=backbone, data=data, out=str(tmp_path / "whole"), kind="ratings", **kwargs)
    expected = folder_bytes(tmp_path / "whole")
    n_shards = len(read_meta(tmp_path / "whole")["shards"])

    out = tmp_path / "resumed"
    calls, interrupt_at = [], [3] if interruption == "raise mid-run" else []
    forward = extract_module.forward_features

    def spy(*args, **spy_kwargs):
        calls.append(len(args[1]))
        if interrupt_at and len(calls) == interrupt_at[0]:
            interrupt_at.clear()  # interrupt once; the rerun goes through
            raise RuntimeError("simulated interruption")
        return forward(*args, **spy_kwargs)

    monkeypatch.setattr(extract_module, "forward_features", spy)
    if interruption == "raise mid-run":
        with pytest.raises(RuntimeError, match="simulated"):
            extract(backbone=backbone, data=data, out=str(out), kind="ratings", **kwargs)
        assert not (out / "meta.json").exists()
        calls.clear()
        extract(backbone=backbone, data=data, out=str(out), kind="ratings", **kwargs)
        assert len(calls) == n_shards - 2, "only the chunks without a shard run again"
    else:
        extract(backbone=backbone, data=data, out=str(out), kind="ratings", **kwargs)
        (out / read_meta(out)["shards"][-1]).unlink()
        calls.clear()
        extract(backbone=backbone, data=data, out=str(out), kind="ratings", **kwargs)
        assert len(calls) == 1
    assert folder_bytes(out) == expected

    with pytest.raises(ValueError, match="max_length"):
        extract(backbone=backbone, data=data, out=str(out), kind="ratings", **{**kwargs, "max_length": 100})


def test_bad_rows_are_skipped_and_recorded(backbone, reference, tmp_path):
    rows = read_jsonl(SHARED_DATA / "ratings" / "ultrafeedback_sample_scores.jsonl")[:6]
    rows[1] = {"messages": rows[1]["messages"][:1], "ultrafeedback-overall_score": 0.5}  # no answer: data skips it
    lengths = [len(reference.ids(row["messages"])) for row in rows]
    max_length = sorted(lengths)[-2]  # exactly one row is too long
    too_long = lengths.index(max(lengths))
    data = write_jsonl(tmp_path / "bad.jsonl", rows)

    meta = extract(
        backbone=backbone, data=data, out=str(tmp_path / "out"), kind="ratings", max_length=max_length, shard_rows=4
    )
    tensors, _ = load_features(tmp_path / "out")

    skipped = {record["index"]: record["reason"] for record in meta["skipped"]}
    assert sorted(skipped) == sorted({1, too_long}) and "too long" in skipped[too_long]
    assert str(max(lengths)) in skipped[too_long]
    kept = [i for i in range(len(rows)) if i not in skipped]
    assert tensors["index"].tolist() == kept
    assert meta["counts"] == {
        "rows": len(kept),
        "skipped": len(skipped),
        "source_rows": len(rows),
        "tokens": sum(lengths[i] for i in kept),
        "truncated": 0,
    }
    expected = torch.stack([reference.features(rows[i]["messages"])[0] for i in kept])
    torch.testing.assert_close(tensors["embeddings"], expected, rtol=0, atol=ATOL)


def test_truncate_prompt_drops_earlier_turns_only(backbone, reference, tmp_path):
    """system, u1, a1, u2, a2, u3 + answer: dropping (u1, a1) must fit; dropping (u1 … a2) is the last resort."""
    turn = "a rather long earlier turn about many things " * 12
    system = {"role": "system", "content": "You are terse."}
    prompt = [system] + [{"role": role, "content": f"{turn} {i}"} for i, role in enumerate(["user", "assistant"] * 2)]
    prompt.append({"role": "user", "content": "And finally: what is two plus two?"})
    pairs = [
        {"chosen": prompt + [{"role": "assistant", "content": "Four."}], "rejected": prompt + [{"role": "assistant", "content": "Five, I think."}]},
        {"chosen": prompt + [{"role": "assistant", "content": "word " * 400}], "rejected": prompt + [{"role": "assistant", "content": "Four."}]},
    ]  # fmt: skip
    one_dropped = [system] + prompt[3:]
    max_length = max(len(reference.ids(one_dropped + [pairs[0][side][-1]])) for side in ("chosen", "rejected"))
    assert max_length < len(reference.ids(pairs[0]["chosen"]))
    data = write_jsonl(tmp_path / "long.jsonl", pairs)

    meta = extract(backbone=backbone, data=data, out=str(tmp_path / "skip"), kind="pairs", max_length=max_length)
    assert [record["index"] for record in meta["skipped"]] == [0, 1]

    meta = extract(
        backbone=backbone,
        data=data,
        out=str(tmp_path / "cut"),
        kind="pairs",
        max_length=max_length,
        truncate_prompt=True,
    )
    tensors, _ = load_features(tmp_path / "cut")
    assert meta["truncated"] == [{"index": 0, "dropped_turns": 2}]
    assert [record["index"] for record in meta["skipped"]] == [1]  # a response is never cut
    assert "responses are never cut" in meta["skipped"][0]["reason"]
    h_chosen, h_x = reference.features(one_dropped + [pairs[0]["chosen"][-1]])
    h_rejected, _ = reference.features(one_dropped + [pairs[0]["rejected"][-1]])
    torch.testing.assert_close(tensors["embeddings"][0], torch.stack([h_chosen, h_rejected]), rtol=0, atol=ATOL)
    torch.testing.assert_close(tensors["prompt_embeddings"][0], h_x, rtol=0, atol=ATOL)


def test_max_batch_tokens_bounds_every_forward(backbone, reference, mixed_ratings, tmp_path, monkeypatch):
    """`--max-batch-tokens` reaches the feature batches: every forward of several rows holds at most that many padded
    tokens, more forwards of fewer rows run than by rows alone, and every feature still equals the row run alone."""
    data, rows = mixed_ratings
    load_backbone, forwards = extract_module.load_backbone, []

    def load_and_watch(*args, **kwargs):  # the forwards of the backbone `armorm extract` loads
        model = load_backbone(*args, **kwargs)
        forwards.append(BackboneForwards(model).__enter__())
        return model

    monkeypatch.setattr(extract_module, "load_backbone", load_and_watch)
    budget = 2 * max(len(reference.ids(row["messages"])) for row in rows)  # two rows of the longest conversation
    for name, max_batch_tokens in (("rows", 10**9), ("tokens", budget)):  # 10**9: rows only (a CPU has a default)
        extract(
            backbone=backbone,
            data=data,
            out=str(tmp_path / name),
            kind="ratings",
            objectives=OBJECTIVES,
            batch_size=8,
            max_batch_tokens=max_batch_tokens,
        )
    by_rows, by_tokens = forwards
    assert by_rows.over(budget) and by_tokens and not by_tokens.over(budget) and len(by_tokens) > len(by_rows)
    tensors, _ = load_features(tmp_path / "tokens")
    expected = [reference.features(row["messages"]) for row in rows]
    torch.testing.assert_close(tensors["embeddings"], torch.stack([h for h, _ in expected]), rtol=0, atol=ATOL)


def test_two_processes_equal_one(backbone, tmp_path):
    data = str(SHARED_DATA / "pairs" / "pandalm_test.jsonl")
    args = ["--backbone", backbone, "--data", data, "--split", "train[:14]", "--kind", "pairs", "--shard-rows", "4"]
    args += ["--batch-size", "3"]
    cli_main(["extract", *args, "--out", str(tmp_path / "one")])

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "armorm_cli", "extract", *args, "--out", str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]

    one, meta_one = load_features(tmp_path / "one")
    two, meta_two = load_features(tmp_path / "two")
    assert meta_two["shards"] == [f"shard-{c % 2:03d}-{c:05d}.safetensors" for c in range(4)]
    assert all(meta_one[key] == meta_two[key] for key in ("counts", "skipped", "objectives", "pattern", "kind"))
    assert one.keys() == two.keys() and torch.equal(one["index"], two["index"])
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=ATOL)


def test_bfloat16_backbone_stores_float32_features(backbone, reference, tmp_path):
    data = str(SHARED_DATA / "ratings" / "helpsteer2_sample.jsonl")
    meta = extract(backbone=backbone, data=data, out=str(tmp_path), kind="ratings", dtype="bfloat16", max_length=8192)
    tensors, _ = load_features(tmp_path)
    assert meta["backbone_dtype"] == "bfloat16" and meta["dtype"] == "bfloat16"
    assert tensors["embeddings"].dtype == torch.float32
    expected = torch.stack([reference.features(row["messages"])[0] for row in read_jsonl(Path(data))])
    torch.testing.assert_close(tensors["embeddings"], expected, rtol=0, atol=0.1)  # bf16 keeps ~3 digits


@pytest.mark.slow
@requires_smollm2
def test_gguf_backbone_equals_per_row_forward(tmp_path):
    """SmolLM2-135M-Instruct from its GGUF file (what `--backbone file.gguf` loads), on real UltraFeedback pairs."""
    model, tokenizer = (
        load_backbone(os.path.join(smollm2_dir(), SMOLLM2_GGUF), "float32"),
        load_tokenizer(os.path.join(smollm2_dir(), SMOLLM2_GGUF)),
    )
    pairs = load_pairs(str(SHARED_DATA / "raw" / "ultrafeedback_sample_eval.jsonl"), "train[:3]")
    settings = dict.fromkeys(extract_module.RESUME_KEYS) | {"kind": "pairs"}
    options = dict(max_length=1024, truncate_prompt=False, batch_size=2, shard_rows=2, settings=settings)
    meta = extract_module.extract(model, tokenizer, pairs, tmp_path, **options)
    tensors, _ = load_features(tmp_path)
    skipped = {record["index"] for record in meta["skipped"]}
    kept = [i for i, index in enumerate(pairs.index) if index not in skipped]
    assert meta["hidden_size"] == 576 and tensors["index"].tolist() == [pairs.index[i] for i in kept] and kept

    pattern = tokenizer("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for row, i in enumerate(kept):
        for side, messages in enumerate((pairs.chosen[i], pairs.rejected[i])):
            ids = tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
            gating = max(s for s in range(len(ids)) if ids[s : s + len(pattern)] == pattern)
            with torch.no_grad():
                hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0]  # (seq, d)
            torch.testing.assert_close(tensors["embeddings"][row, side], hidden[-1], rtol=1e-4, atol=1e-4)
            if side == 0:
                torch.testing.assert_close(tensors["prompt_embeddings"][row], hidden[gating], rtol=1e-4, atol=1e-4)


def test_new_content_under_the_old_mtime_is_extracted_with_its_own_hash(backbone, tmp_path):
    """`datasets` trusts its cache of a file while path and mtime are unchanged; `cp -p`, `rsync -a` and `tar x`
    keep the mtime of new content. What is extracted must be what the report's hash names."""
    messages = read_jsonl(SHARED_DATA / "ratings" / "helpsteer2_sample.jsonl")[0]["messages"]
    path = tmp_path / "r.jsonl"
    write_jsonl(path, [{"messages": messages, "score": float(i)} for i in range(6)])
    first = extract(backbone=backbone, data=str(path), out=str(tmp_path / "first"), kind="ratings")
    assert load_features(tmp_path / "first")[0]["labels"].ravel().tolist() == [0, 1, 2, 3, 4, 5]
    times = os.stat(path)
    write_jsonl(path, [{"messages": messages, "score": -7.0 * i} for i in range(6)])
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))

    second = extract(backbone=backbone, data=str(path), out=str(tmp_path / "second"), kind="ratings")
    tensors, _ = load_features(tmp_path / "second")
    assert tensors["labels"].ravel().tolist() == [0, -7, -14, -21, -28, -35]
    report = json.loads((tmp_path / "second" / "extract.json").read_text())
    assert report["inputs"]["data"]["sha256"] == file_sha256(path)
    assert (
        report["inputs"]["data"]["sha256"]
        != json.loads((tmp_path / "first" / "extract.json").read_text())["inputs"]["data"]["sha256"]
    )
    assert first["counts"]["rows"] == second["counts"]["rows"] == 6


def test_data_replaced_after_its_hash_is_refused_and_hashed_at_most_twice(backbone, tmp_path, monkeypatch):
    """The report's hash is the one of the rows read: data replaced between the stage's hash and its read (simulated
    here right after the hash) is refused, naming the file. The file is read for hashing twice, not three times."""
    messages = read_jsonl(SHARED_DATA / "ratings" / "helpsteer2_sample.jsonl")[0]["messages"]
    path = tmp_path / "r.jsonl"
    write_jsonl(path, [{"messages": messages, "score": float(i)} for i in range(3)])
    real = extract_module.data_fingerprint

    def fingerprint_then_replace(data):
        fingerprint = real(data)
        write_jsonl(path, [{"messages": messages, "score": -7.0 * i} for i in range(3)])
        return fingerprint

    monkeypatch.setattr(extract_module, "data_fingerprint", fingerprint_then_replace)
    with pytest.raises(ValueError, match=r"r\.jsonl.* changed "):
        extract(backbone=backbone, data=str(path), out=str(tmp_path / "replaced"), kind="ratings")
    assert not (tmp_path / "replaced" / "extract.json").exists()
    monkeypatch.undo()

    from armorm_io import data as data_module

    hashed = []
    monkeypatch.setattr(data_module, "file_sha256", lambda p, real=file_sha256: hashed.append(str(p)) or real(p))
    extract(backbone=backbone, data=str(path), out=str(tmp_path / "once"), kind="ratings")
    assert hashed == [str(path)] * 2
    report = json.loads((tmp_path / "once" / "extract.json").read_text())
    assert report["inputs"]["data"]["sha256"] == file_sha256(path)
    assert load_features(tmp_path / "once")[0]["labels"].ravel().tolist() == [0, -7, -14]
