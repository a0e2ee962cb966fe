"""`armorm_io.data`: every layout of docs/building.md#data-layouts, checked against independent reads."""

import csv
import gzip
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from armorm_io import data as data_module
from armorm_io.data import data_fingerprint, load_pairs, load_ratings, parse_hh_transcript
from armorm_io.files import file_sha256
from tests.utils import SHARED_DATA, requires_shared_data


def read_jsonl(path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_rows(rows: list[dict], path) -> str:
    """Write rows as jsonl, parquet or csv (by suffix); csv cells holding lists are JSON-encoded."""
    path = str(path)
    if path.endswith(".jsonl"):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    elif path.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    return path


def hh_turns(text: str) -> list[dict]:
    """An HH transcript's turns found with str.find (independent of the module's regex split)."""
    markers = {"\n\nHuman:": "user", "\n\nAssistant:": "assistant"}
    found = sorted((pos, marker) for marker in markers for pos in _find_all(text, marker))
    turns = []
    for (pos, marker), end in zip(found, [p for p, _ in found[1:]] + [len(text)]):
        turns.append({"role": markers[marker], "content": text[pos + len(marker) : end].strip()})
    return turns


def _find_all(text: str, sub: str) -> list[int]:
    positions, start = [], text.find(sub)
    while start >= 0:
        positions.append(start)
        start = text.find(sub, start + 1)
    return positions


def blank(messages: list[dict]) -> bool:
    return any(not m["content"].strip() for m in messages)


# ---------------------------------------------------------------- real data of ../shared/data


@requires_shared_data
@pytest.mark.parametrize("name", ["pandalm_test", "llama_factory_dpo_demo"])
def test_real_message_pairs(name):
    path = SHARED_DATA / "pairs" / f"{name}.jsonl"
    raw = read_jsonl(path)
    pairs = load_pairs(str(path))
    assert pairs.layout == "implicit prompt"
    assert pairs.skipped == [] and pairs.index == list(range(len(raw)))
    assert pairs.chosen == [row["chosen"] for row in raw]
    assert pairs.rejected == [row["rejected"] for row in raw]
    assert pairs.subset == [row["source"] for row in raw]
    roles = {m["role"] for row in pairs.chosen + pairs.rejected for m in row}
    assert roles <= {"system", "user", "assistant"}
    assert all(
        c[-1]["role"] == r[-1]["role"] == "assistant" and c[:-1] == r[:-1]
        for c, r in zip(pairs.chosen, pairs.rejected)
    )
    if name == "llama_factory_dpo_demo":
        assert max(len(c) for c in pairs.chosen) > 3 and "system" in roles  # multi-turn with system turns


@requires_shared_data
def test_real_hh_transcripts():
    path = SHARED_DATA / "raw" / "hh_rlhf_harmless_base_test.jsonl.gz"
    raw = read_jsonl(path)
    pairs = load_pairs(str(path))
    expected_kept, expected_skipped = [], []
    for i, row in enumerate(raw):
        chosen, rejected = hh_turns(row["chosen"]), hh_turns(row["rejected"])
        bad = blank(chosen) or blank(rejected) or chosen[:-1] != rejected[:-1]
        (expected_skipped if bad else expected_kept).append((i, chosen, rejected))
    assert len(raw) == 2312 and len(pairs) + len(pairs.skipped) == len(raw)
    assert pairs.index == [i for i, _, _ in expected_kept]
    assert pairs.chosen == [c for _, c, _ in expected_kept]
    assert pairs.rejected == [r for _, _, r in expected_kept]
    assert [s["index"] for s in pairs.skipped] == [i for i, _, _ in expected_skipped]
    assert all(("empty content" in s["reason"]) or ("different prompts" in s["reason"]) for s in pairs.skipped)
    assert pairs.subset == [None] * len(pairs)
    # Turns alternate user/assistant as in the transcripts; multi-turn rows exist.
    assert all(c[0]["role"] == "user" and c[-1]["role"] == "assistant" for c in pairs.chosen)
    assert max(len(c) for c in pairs.chosen) >= 6


@requires_shared_data
@pytest.mark.parametrize("name", ["ultrafeedback_sample_train", "ultrafeedback_sample_eval"])
def test_real_ultrafeedback_strings(name):
    path = SHARED_DATA / "raw" / f"{name}.jsonl"
    raw = read_jsonl(path)
    pairs = load_pairs(str(path))
    assert pairs.layout == "explicit prompt"
    # Kept: every answer non-empty, two different answers, and not a tie of the pair's own ratings.
    kept = [
        i
        for i, row in enumerate(raw)
        if all(row[k].strip() for k in ("prompt", "chosen", "rejected"))
        and row["chosen"] != row["rejected"]
        and row["metadata"]["score_chosen"] != row["metadata"]["score_rejected"]
    ]
    assert pairs.index == kept
    assert sorted(s["index"] for s in pairs.skipped) == sorted(set(range(len(raw))) - set(kept))
    for i, chosen, rejected in zip(pairs.index, pairs.chosen, pairs.rejected):
        prompt = {"role": "user", "content": raw[i]["prompt"]}
        assert chosen == [prompt, {"role": "assistant", "content": raw[i]["chosen"]}]
        assert rejected == [prompt, {"role": "assistant", "content": raw[i]["rejected"]}]
    # `source_index` is an id, not a `source` group.
    assert set(pairs.subset) == {None}


def expected_ratings(rows: list[dict]):
    """Objectives = float keys in order of first appearance; labels = the value or NaN when absent."""
    objectives = []
    for row in rows:
        objectives += [k for k, v in row.items() if isinstance(v, float) and k not in objectives]
    kept = [i for i, row in enumerate(rows) if not blank(row["messages"])]
    labels = np.array([[rows[i].get(k, math.nan) for k in objectives] for i in kept], dtype=np.float32)
    return objectives, kept, labels


@requires_shared_data
@pytest.mark.parametrize("name", ["helpsteer2_sample", "topical_chat", "ultrafeedback_sample_scores"])
def test_real_ratings(name):
    path = SHARED_DATA / "ratings" / f"{name}.jsonl"
    raw = read_jsonl(path)
    ratings = load_ratings(str(path))
    objectives, kept, labels = expected_ratings(raw)
    assert ratings.objectives == objectives and "system_id" not in objectives
    assert ratings.index == kept and [s["index"] for s in ratings.skipped] == sorted(set(range(len(raw))) - set(kept))
    assert ratings.messages == [raw[i]["messages"] for i in kept]
    assert ratings.labels.dtype == np.float32 and ratings.labels.shape == (len(kept), len(objectives))
    np.testing.assert_allclose(ratings.labels, labels, rtol=1e-6)


@requires_shared_data
def test_real_ratings_with_partial_objectives(tmp_path):
    """The three ratings files interleaved row by row: each row carries one dataset's objectives, NaN elsewhere."""
    files = [read_jsonl(SHARED_DATA / "ratings" / f"{n}.jsonl") for n in ("topical_chat", "helpsteer2_sample")]
    files.append(read_jsonl(SHARED_DATA / "ratings" / "ultrafeedback_sample_scores.jsonl")[:400])
    rows = [row for group in zip(*[f[:8] for f in files]) for row in group] + files[0][8:] + files[2][8:]
    path = write_rows(rows, tmp_path / "mixed.jsonl")
    ratings = load_ratings(path)
    objectives, kept, labels = expected_ratings(rows)
    assert ratings.objectives == objectives and len(objectives) == 6 + 5 + 1
    assert ratings.index == kept
    np.testing.assert_array_equal(np.isnan(ratings.labels), np.isnan(labels))
    np.testing.assert_allclose(ratings.labels, labels, rtol=1e-6)
    subset = load_ratings(path, objectives=["helpsteer-verbosity", "topicalchat-overall"])
    np.testing.assert_allclose(subset.labels, labels[:, [objectives.index("helpsteer-verbosity"), 5]], rtol=1e-6)


# ---------------------------------------------------------------- every layout, built in tmp_path

SYSTEM = {"role": "system", "content": "Be brief."}
PAIRS = [  # (prompt messages, chosen answer, rejected answer, subset)
    ([{"role": "user", "content": "What is 2+2?"}], "4", "5", "math"),
    ([{"role": "user", "content": "Ça va ? 😀 Réponds en français."}], "Oui, très bien !", "No.", "chat"),
    (
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Name a colour"},
        ],
        "Blue",
        "Seven",
        "chat",
    ),
    ([SYSTEM, {"role": "user", "content": "A long answer please"}], "word " * 2000, "short", "chat"),
]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


def _transcript(messages):
    return "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages)


LAYOUTS = {
    # layout name: (which PAIRS it can express, row encoder)
    "implicit": (
        lambda p: True,
        lambda p, c, r, s: {"chosen": p + _assistant(c), "rejected": p + _assistant(r), "subset": s},
    ),
    "explicit-messages": (
        lambda p: True,
        lambda p, c, r, s: {"prompt": p, "chosen": _assistant(c), "rejected": _assistant(r), "subset": s},
    ),
    "strings": (
        lambda p: len(p) == 1,
        lambda p, c, r, s: {"prompt": p[0]["content"], "chosen": c, "rejected": r, "subset": s},
    ),
    "hh": (
        lambda p: all(m["role"] != "system" for m in p),
        lambda p, c, r, s: {
            "chosen": _transcript(p + _assistant(c)),
            "rejected": _transcript(p + _assistant(r)),
            "subset": s,
        },
    ),
    "hh-prompt": (  # TRL's standard HH form: an HH prompt ending with "\n\nAssistant:" and bare answers
        lambda p: all(m["role"] != "system" for m in p),
        lambda p, c, r, s: {
            "prompt": _transcript(p) + "\n\nAssistant:",
            "chosen": " " + c,
            "rejected": " " + r,
            "subset": s,
        },
    ),
}


@pytest.mark.parametrize("suffix", ["jsonl", "parquet", "csv"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pair_layouts(tmp_path, layout, suffix):
    fits, encode = LAYOUTS[layout]
    examples = [pair for pair in PAIRS if fits(pair[0])]
    path = write_rows([encode(*pair) for pair in examples], tmp_path / f"pairs.{suffix}")
    pairs = load_pairs(path)
    assert pairs.skipped == []
    assert pairs.index == list(range(len(examples)))
    strip = layout.startswith("hh")  # HH transcripts carry no surrounding whitespace
    for (prompt, chosen, rejected, subset), got_c, got_r, got_s in zip(
        examples, pairs.chosen, pairs.rejected, pairs.subset
    ):
        assert got_c == prompt + _assistant(chosen.strip() if strip else chosen)
        assert got_r == prompt + _assistant(rejected.strip() if strip else rejected)
        assert got_s == subset


def test_pair_subset_falls_back_to_source(tmp_path):
    rows = [{"chosen": PAIRS[0][0] + _assistant("4"), "rejected": PAIRS[0][0] + _assistant("5"), "source": "s"}]
    assert load_pairs(write_rows(rows, tmp_path / "a.jsonl")).subset == ["s"]
    rows[0]["subset"] = "sub"
    assert load_pairs(write_rows(rows, tmp_path / "b.jsonl")).subset == ["sub"]


RATING_ROWS = [  # (conversation, labels for "helpfulness" (int 0-4), "safe" (bool), "score" (float or missing))
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], 3, True, 0.25),
    ([SYSTEM, {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}], 0, False, None),
    (
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "ç"},
            {"role": "assistant", "content": "d"},
        ],
        4,
        True,
        1.0,
    ),
]


@pytest.mark.parametrize("suffix", ["jsonl", "parquet", "csv"])
@pytest.mark.parametrize("layout", ["messages", "prompt-completion", "prompt-completion-strings"])
def test_rating_layouts(tmp_path, layout, suffix):
    examples = [row for row in RATING_ROWS if layout != "prompt-completion-strings" or len(row[0]) == 2]
    rows = []
    for j, (messages, helpfulness, safe, score) in enumerate(examples):
        if layout == "messages":
            conversation = {"messages": messages}
        elif layout == "prompt-completion":
            conversation = {"prompt": messages[:-1], "completion": messages[-1:]}
        else:
            conversation = {"prompt": messages[0]["content"], "completion": messages[1]["content"]}
        # `row_id` (an id) and `note` (a string) are not objectives.
        rows.append(
            {"row_id": j, **conversation, "helpfulness": helpfulness, "safe": safe, "score": score, "note": "x"}
        )
    path = write_rows(rows, tmp_path / f"ratings.{suffix}")
    ratings = load_ratings(path)
    assert ratings.layout == layout.removesuffix("-strings")
    assert ratings.objectives == ["helpfulness", "safe", "score"]
    assert ratings.skipped == [] and ratings.index == list(range(len(examples)))
    assert ratings.messages == [messages for messages, *_ in examples]
    expected = [[h, float(s), math.nan if v is None else v] for _, h, s, v in examples]
    np.testing.assert_array_equal(ratings.labels, np.array(expected, dtype=np.float32))
    chosen = load_ratings(path, objectives=["score", "helpfulness"])
    np.testing.assert_array_equal(chosen.labels, np.array(expected, dtype=np.float32)[:, [2, 0]])


def test_local_split_name_and_slice(tmp_path):
    rows = [{"messages": m, "score": 0.5} for m, *_ in RATING_ROWS]
    path = write_rows(rows, tmp_path / "r.jsonl")
    ratings = load_ratings(path, split="test[1:]")
    assert ratings.index == [0, 1] and ratings.messages == [m for m, *_ in RATING_ROWS[1:]]


# ---------------------------------------------------------------- malformed rows and files


def test_malformed_pairs_are_recorded_and_good_rows_kept(tmp_path):
    prompt = [{"role": "user", "content": "Q"}]
    good = {"chosen": prompt + _assistant("yes"), "rejected": prompt + _assistant("no")}
    bad = {
        1: ({"chosen": prompt + _assistant("yes") + prompt, "rejected": good["rejected"]}, "ends with a user turn"),
        2: (
            {"chosen": good["chosen"], "rejected": prompt + _assistant("  ")},
            "`rejected` message 1 (assistant) has empty content",
        ),
        3: (
            {"chosen": prompt + [{"role": "assistant", "content": [{"type": "text"}]}], "rejected": good["rejected"]},
            "list content",
        ),
        4: (
            {"chosen": [{"role": "user", "content": "Other"}] + _assistant("yes"), "rejected": good["rejected"]},
            "different prompts",
        ),
        5: (
            {"chosen": [{"role": "bot", "content": "Q"}] + _assistant("yes"), "rejected": good["rejected"]},
            "role 'bot'",
        ),
        7: ({"chosen": None, "rejected": good["rejected"]}, "`chosen` is null"),
        8: ({"chosen": _assistant("yes"), "rejected": _assistant("no")}, "no system or user turn"),
    }
    rows = [bad[i][0] if i in bad else good for i in range(10)]
    pairs = load_pairs(write_rows(rows, tmp_path / "pairs.jsonl"))
    assert pairs.index == [0, 6, 9] and pairs.chosen == [good["chosen"]] * 3
    assert [s["index"] for s in pairs.skipped] == sorted(bad)
    for entry in pairs.skipped:
        assert bad[entry["index"]][1] in entry["reason"], entry


def test_malformed_hh_and_string_rows(tmp_path):
    rows = [
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away"},
        {"chosen": "Hi there, no markers", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away"},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi"},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Sure", "rejected": "\n\nHuman: Hi\n\nAssistant: No"},
    ]
    pairs = load_pairs(write_rows(rows, tmp_path / "hh.jsonl"))
    assert pairs.index == [0, 3]
    assert [s["index"] for s in pairs.skipped] == [1, 2]
    assert "not an Anthropic HH transcript" in pairs.skipped[0]["reason"]
    assert "ends with a user turn" in pairs.skipped[1]["reason"]


def test_malformed_ratings(tmp_path):
    messages = RATING_ROWS[0][0]
    rows = [
        {"messages": messages, "score": 0.5},
        {"messages": messages, "score": "n/a"},
        {"messages": "just a string", "score": 0.1},
        {"messages": messages[:1], "score": 0.2},
        {"messages": messages, "score": None},
    ]
    ratings = load_ratings(write_rows(rows, tmp_path / "r.jsonl"))
    assert ratings.objectives == ["score"] and ratings.index == [0, 4]
    np.testing.assert_array_equal(ratings.labels, np.array([[0.5], [np.nan]], dtype=np.float32))
    reasons = {s["index"]: s["reason"] for s in ratings.skipped}
    assert set(reasons) == {1, 2, 3}
    assert "'n/a', not a number" in reasons[1]
    assert "not a list of messages" in reasons[2]
    assert "not the assistant's answer" in reasons[3]


def test_unknown_layout_raises_one_clear_error(tmp_path):
    path = write_rows([{"question": "q", "answer": "a"}], tmp_path / "qa.jsonl")
    with pytest.raises(ValueError, match=r"(?s)Columns found: \['question', 'answer'\].*`chosen` \+ `rejected`"):
        load_pairs(path)
    with pytest.raises(ValueError, match=r"(?s)Columns found: \['question', 'answer'\].*`messages`"):
        load_ratings(path)
    with pytest.raises(ValueError, match=r"no objective column \['missing'\]"):
        load_ratings(
            write_rows([{"messages": RATING_ROWS[0][0], "a": 1.0}], tmp_path / "r.jsonl"), objectives=["missing"]
        )
    with pytest.raises(ValueError, match="no numeric objective column"):
        load_ratings(write_rows([{"messages": RATING_ROWS[0][0], "a": "x"}], tmp_path / "s.jsonl"))


def test_bad_paths(tmp_path):
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(ValueError, match="unknown file type"):
        load_pairs(str(tmp_path / "data.txt"))
    with pytest.raises(FileNotFoundError, match="No such data file"):
        load_pairs(str(tmp_path / "absent.jsonl"))


def test_parse_hh_transcript():
    text = "\n\nHuman: Hi there\n\nAssistant:  Hello!\nHow can I help?\n\nHuman: Human: nested\n\nAssistant:"
    assert parse_hh_transcript(text) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!\nHow can I help?"},
        {"role": "user", "content": "Human: nested"},
        {"role": "assistant", "content": ""},
    ]
    assert parse_hh_transcript(text) == hh_turns(text)
    for bad in ("no markers", "preamble\n\nHuman: hi\n\nAssistant: yo", "\n\nAssistant: first"):
        with pytest.raises(ValueError, match="not an Anthropic HH transcript"):
            parse_hh_transcript(bad)


# ---------------------------------------------------------------- what is read is what was hashed


def _rewrite_keeping_times(path, text: str) -> None:
    """New content at the same path with the old modification time, as `cp -p`, `rsync -a` or `tar x` leave it."""
    times = os.stat(path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))


@pytest.mark.parametrize("suffix", ["jsonl", "jsonl.gz", "csv"])
def test_new_content_with_the_old_mtime_is_read_again(tmp_path, suffix):
    messages = RATING_ROWS[0][0]
    path = str(tmp_path / f"r.{suffix}")

    def write(scale: float):
        rows = [{"messages": messages, "score": scale * i} for i in range(6)]
        if suffix == "csv":
            write_rows(rows, path)
        else:
            with gzip.open(path, "wt") if suffix.endswith(".gz") else open(path, "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)

    write(1.0)
    assert load_ratings(path).labels.ravel().tolist() == [0, 1, 2, 3, 4, 5]
    first = data_fingerprint(path).sha256
    times = os.stat(path)
    write(-7.0)
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == times.st_mtime_ns

    assert load_ratings(path).labels.ravel().tolist() == [0, -7, -14, -21, -28, -35]
    fingerprint = data_fingerprint(path)
    assert fingerprint.sha256 == file_sha256(path) != first


def test_new_pairs_with_the_old_mtime_are_read_again(tmp_path):
    prompt = [{"role": "user", "content": "Q"}]
    path = tmp_path / "p.jsonl"

    def pairs(answer: str) -> str:
        row = {"chosen": prompt + _assistant(answer), "rejected": prompt + _assistant("no")}
        return "".join(json.dumps(row) + "\n" for _ in range(3))

    path.write_text(pairs("yes"))
    assert [c[-1]["content"] for c in load_pairs(path).chosen] == ["yes"] * 3
    _rewrite_keeping_times(path, pairs("YES, new"))
    assert [c[-1]["content"] for c in load_pairs(path).chosen] == ["YES, new"] * 3


def test_a_data_folder_rewritten_with_old_mtimes_is_read_again(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = lambda scale: "".join(  # noqa: E731
        json.dumps({"messages": RATING_ROWS[0][0], "score": scale * i}) + "\n" for i in range(4)
    )
    (folder / "train.jsonl").write_text(rows(1.0))
    assert load_ratings(folder).labels.ravel().tolist() == [0, 1, 2, 3]
    _rewrite_keeping_times(folder / "train.jsonl", rows(-7.0))
    assert load_ratings(folder).labels.ravel().tolist() == [0, -7, -14, -21]


def test_a_file_that_changes_while_read_is_refused(tmp_path, monkeypatch):
    path = write_rows([{"messages": RATING_ROWS[0][0], "score": 1.0}], tmp_path / "r.jsonl")
    real = data_module.datasets.load_dataset

    def load_then_change(*args, **kwargs):
        table = real(*args, **kwargs)
        write_rows([{"messages": RATING_ROWS[0][0], "score": 2.0}], path)
        return table

    monkeypatch.setattr(data_module.datasets, "load_dataset", load_then_change)
    with pytest.raises(ValueError, match="changed while it was read"):
        load_ratings(path)
    monkeypatch.undo()
    assert load_ratings(path).labels.ravel().tolist() == [2.0]


# ---------------------------------------------------------------- labels never silently missing, unreadable text


def test_nan_strings_and_lossy_json_numbers_are_listed(tmp_path):
    messages = json.dumps(RATING_ROWS[0][0])
    cells = ["0.5", "NaN", "nan", "", "1.0", "-inf"]  # "" is a missing label (null), the rest are numbers or listed
    lines = ["messages,score"] + [f'"{messages.replace(chr(34), chr(34) * 2)}",{cell}' for cell in cells]
    (tmp_path / "r.csv").write_text("\n".join(lines) + "\n")
    ratings = load_ratings(tmp_path / "r.csv")
    assert ratings.index == [0, 3, 4]
    np.testing.assert_array_equal(ratings.labels.ravel(), np.array([0.5, np.nan, 1.0], dtype=np.float32))
    reasons = {entry["index"]: entry["reason"] for entry in ratings.skipped}
    assert sorted(reasons) == [1, 2, 5] and "NaN" in reasons[1] and "NaN" in reasons[2]

    # A json column of numbers and strings (`datasets` types it `Json`): NaN, ±Infinity and the strings "NaN",
    # "Infinity" are listed; null and an absent key are missing labels.
    values = ["0.5", '"x"', "null", "NaN", "Infinity", "-Infinity", '"NaN"', '"Infinity"', "2"]
    text = "".join(f'{{"messages": {messages}, "score": {value}}}\n' for value in values)
    text += f'{{"messages": {messages}}}\n'
    (tmp_path / "t.jsonl").write_text(text)
    ratings = load_ratings(tmp_path / "t.jsonl", objectives=["score"])
    assert ratings.index == [0, 2, 8, 9]
    np.testing.assert_array_equal(ratings.labels.ravel(), np.array([0.5, np.nan, 2, np.nan], dtype=np.float32))
    reasons = {entry["index"]: entry["reason"] for entry in ratings.skipped}
    assert sorted(reasons) == [1, 3, 4, 5, 6, 7], reasons
    assert "'x', not a number" in reasons[1]
    assert all("NaN" in reasons[i] or "inf" in reasons[i].lower() for i in (3, 4, 5, 6, 7)), reasons
    # A data folder's json files are read again as the single file is.
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "train.jsonl").write_text(text)
    in_folder = load_ratings(tmp_path / "folder", objectives=["score"])
    assert in_folder.index == ratings.index and in_folder.skipped == ratings.skipped


@pytest.mark.parametrize("suffix", ["jsonl", "json"])
def test_text_that_cannot_be_encoded_is_a_listed_skip(tmp_path, suffix):
    prompt = [{"role": "user", "content": "Q"}]
    rows = [
        {"chosen": prompt + _assistant(answer), "rejected": prompt + _assistant("no")}
        for answer in ["yes", "broken \ud83d emoji", "fine", "also fine"]
    ]
    path = tmp_path / f"p.{suffix}"
    # json.dumps writes the lone surrogate as the escape "\ud83d", as scraped data holds it.
    path.write_text(json.dumps(rows) if suffix == "json" else "".join(json.dumps(row) + "\n" for row in rows))
    assert "\\ud83d" in path.read_text()
    pairs = load_pairs(path)
    assert pairs.index == [0, 2, 3]
    assert [c[-1]["content"] for c in pairs.chosen] == ["yes", "fine", "also fine"]
    assert len(pairs.skipped) == 1 and pairs.skipped[0]["index"] == 1
    assert "`chosen`" in pairs.skipped[0]["reason"] and "surrogate" in pairs.skipped[0]["reason"]
    assert load_pairs(path, split="train[1:]").index == [1, 2]


def test_a_corrupt_gz_file_is_one_clear_error(tmp_path):
    rows = [{"messages": RATING_ROWS[0][0], "score": 1.0}] * 200
    whole = gzip.compress("".join(json.dumps(row) + "\n" for row in rows).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"(?s)cut\.jsonl\.gz.*(corrupt|cut short).*gzip -t"):
        load_ratings(tmp_path / "cut.jsonl.gz")


MIXED_LABELS = ["0.5", '"x"', "null", "NaN", "Infinity", "-Infinity", '"NaN"', '"Infinity"', "2"]  # one per row


def _mixed_label_rows(messages: str) -> str:
    """Json lines whose `score` mixes numbers, strings and JSON's NaN/±Infinity (`datasets` types it `Json`)."""
    return "".join(f'{{"messages": {messages}, "score": {value}}}\n' for value in MIXED_LABELS)


def test_nan_labels_in_a_data_folder_are_listed_with_their_rows(tmp_path):
    """A data folder's json files are read again as a single file is: JSON NaN is not a missing label there."""
    messages = json.dumps(RATING_ROWS[0][0])
    folder = tmp_path / "data"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train-0.jsonl").write_text(_mixed_label_rows(messages))
    (folder / "data" / "train-1.jsonl.gz").write_bytes(gzip.compress(_mixed_label_rows(messages).encode()))
    ratings = load_ratings(folder, objectives=["score"])
    n = len(MIXED_LABELS)
    assert ratings.index == [0, 2, 8, n, n + 2, n + 8]
    np.testing.assert_array_equal(ratings.labels.ravel(), np.array([0.5, np.nan, 2] * 2, dtype=np.float32))
    reasons = {entry["index"]: entry["reason"] for entry in ratings.skipped}
    assert sorted(reasons) == [1, 3, 4, 5, 6, 7, n + 1, n + 3, n + 4, n + 5, n + 6, n + 7], reasons
    assert "NaN" in reasons[3] and "NaN" in reasons[n + 3]
    # A slice of the split keeps the rows' own indices.
    assert [entry["index"] for entry in load_ratings(folder, "train[3:5]", ["score"]).skipped] == [0, 1]

    # A csv file in a folder: only an empty cell is missing, as in a single csv file.
    quoted = messages.replace('"', '""')
    (tmp_path / "csv").mkdir()
    cells = ["0.5", "NaN", "nan", "", "NA", "null", "1.0"]
    (tmp_path / "csv" / "train.csv").write_text("messages,score\n" + "".join(f'"{quoted}",{c}\n' for c in cells))
    ratings = load_ratings(tmp_path / "csv")
    assert ratings.index == [0, 3, 6]
    assert sorted(entry["index"] for entry in ratings.skipped) == [1, 2, 4, 5]


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def serve_hub(repos: dict[str, dict[str, bytes]]) -> ThreadingHTTPServer:
    """A Hugging Face Hub on 127.0.0.1 holding `repos` (dataset id -> {path in the repo: content}) at one commit:
    what `datasets` asks to resolve a dataset id, list its data files and download them."""

    class Hub(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send(self, status: int, body: bytes, headers: dict) -> None:
            self.send_response(status)
            for key, value in {**headers, "X-Repo-Commit": HUB_COMMIT, "Content-Length": len(body)}.items():
                self.send_header(key, str(value))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self):
            path = unquote(urlsplit(self.path).path)
            if match := re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path):
                content = repos.get(match[1], {}).get(match[2])
                if content is not None:
                    return self.send(200, content, {"ETag": f'"{hashlib.sha256(content).hexdigest()}"'})
            elif match := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)(/revision/.+)?", path):
                info = {"id": match[1], "sha": HUB_COMMIT, "siblings": [{"rfilename": f} for f in repos[match[1]]]}
                return self.send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
            elif match := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/tree/[^/]+/?(.*)", path):
                folder = match[2].strip("/")
                listing = {}  # the folder's own files and subfolders: `datasets` lists folder by folder
                for name, content in repos[match[1]].items():
                    if folder and not name.startswith(folder + "/"):
                        continue
                    child = name[len(folder) :].lstrip("/").split("/")[0]
                    child = f"{folder}/{child}" if folder else child
                    oid = hashlib.sha1(content).hexdigest()
                    listing[child] = (
                        {"type": "file", "path": name, "size": len(content), "oid": oid}
                        if child == name
                        else {"type": "directory", "path": child, "oid": "0" * 40}
                    )
                body = json.dumps(list(listing.values())).encode()
                return self.send(200, body, {"Content-Type": "application/json"})
            self.send(404, b"{}", {"X-Error-Code": "EntryNotFound"})

        do_HEAD = do_GET

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# Reads every (dataset id, split) of argv[1] through the Hub at $HF_ENDPOINT; prints what `load_ratings` read.
READ_FROM_THE_HUB = """
import json, sys
import datasets
from armorm_io.data import load_ratings

datasets.config.USE_PARQUET_EXPORT = False  # the Hub's parquet export is another server
read = {}
for data, split in json.loads(sys.argv[1]):
    ratings = load_ratings(data, split, objectives=["score"])
    read[f"{data} {split}"] = [ratings.index, ratings.labels.ravel().tolist(), [e["index"] for e in ratings.skipped]]
print(json.dumps(read))
"""


def test_nan_labels_of_a_hub_dataset_are_listed_with_their_rows(tmp_path):
    """A Hub dataset id goes through `datasets` (id -> builder -> data files -> downloads) to a Hub on 127.0.0.1; its
    json files are read again from the copies `datasets` downloaded, so that a JSON NaN is listed with its row as
    in a local file, across several files and split slices. Csv and parquet cells are judged as local ones."""
    messages = json.dumps(RATING_ROWS[0][0])
    quoted = messages.replace('"', '""')
    cells = ["0.5", "NaN", "", "NA", "1.0"]
    labels = [0.5, math.nan, None, math.inf, 1.0]
    parquet = write_rows([{"messages": RATING_ROWS[0][0], "score": v} for v in labels], tmp_path / "train.parquet")
    second = MIXED_LABELS[::-1]  # the second file in another order: a row read against the wrong file shows
    server = serve_hub(
        {
            "org/csv": {"train.csv": ("messages,score\n" + "".join(f'"{quoted}",{c}\n' for c in cells)).encode()},
            "org/parquet": {"train.parquet": Path(parquet).read_bytes()},
            "org/json": {
                "data/train-0.jsonl": _mixed_label_rows(messages).encode(),
                "data/train-1.jsonl": "".join(f'{{"messages": {messages}, "score": {v}}}\n' for v in second).encode(),
            },
        }
    )
    assert data_fingerprint("org/json").sha256 is None  # a dataset id, not local data
    reads = [["org/csv", "train"], ["org/parquet", "train"]]
    reads += [["org/json", split] for split in ("train", "train[2:5]", "train[7:12]")]
    home = tmp_path / "home"
    env = {
        **os.environ,
        "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_DATASETS_CACHE": str(home / "datasets"),
        "HF_HUB_OFFLINE": "0",
    }
    try:
        result = subprocess.run(
            [sys.executable, "-c", READ_FROM_THE_HUB, json.dumps(reads)], env=env, capture_output=True, text=True
        )
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    read = json.loads(result.stdout.splitlines()[-1])
    # The json files were downloaded to the Hub cache (what the data is read again from), at the commit served.
    snapshot = home / "hub" / "datasets--org--json" / "snapshots" / HUB_COMMIT / "data"
    assert sorted(os.listdir(snapshot)) == ["train-0.jsonl", "train-1.jsonl"]

    assert read["org/csv train"][0] == [0, 2, 4] and read["org/csv train"][2] == [1, 3]
    assert read["org/parquet train"][0] == [0, 2, 4] and read["org/parquet train"][2] == [1, 3]
    # Row by row: null is a missing label, a finite number a label, anything else (NaN, ±Infinity, strings) listed.
    values = [json.loads(v) for v in MIXED_LABELS + second]
    for split, rows in (("train", values), ("train[2:5]", values[2:5]), ("train[7:12]", values[7:12])):
        kept = [i for i, v in enumerate(rows) if v is None or (type(v) in (int, float) and math.isfinite(v))]
        index, read_labels, skipped = read[f"org/json {split}"]
        assert index == kept, split
        assert skipped == [i for i in range(len(rows)) if i not in kept], split
        np.testing.assert_array_equal(read_labels, [math.nan if rows[i] is None else rows[i] for i in kept])

    # Offline, `datasets` gives its cached rows, not the files: a JSON NaN is then read as missing, and said so.
    offline = subprocess.run(
        [sys.executable, "-c", READ_FROM_THE_HUB, json.dumps([["org/json", "train"]])],
        env={**env, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
    )
    assert offline.returncode == 0, offline.stderr
    assert 3 in json.loads(offline.stdout.splitlines()[-1])["org/json train"][0]
    assert "column `score` mixes numbers and strings" in offline.stderr and "JSON NaN" in offline.stderr


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_data_replaced_after_its_fingerprint_is_refused(tmp_path, kind):
    """A stage hashes the data once (its report's fingerprint) and reads it only if it still has that content."""
    path = tmp_path / "r.jsonl" if kind == "file" else tmp_path / "data" / "train.jsonl"
    path.parent.mkdir(exist_ok=True)
    write_rows([{"messages": RATING_ROWS[0][0], "score": 1.0}], path)
    data = path if kind == "file" else path.parent
    fingerprint = data_fingerprint(data)
    assert load_ratings(data, sha256=fingerprint.sha256).labels.ravel().tolist() == [1.0]
    write_rows([{"messages": RATING_ROWS[0][0], "score": 2.0}], path)
    with pytest.raises(ValueError, match=rf"{data.name}.* changed .*sha256 {fingerprint.sha256}"):
        load_ratings(data, sha256=fingerprint.sha256)
    with pytest.raises(ValueError, match=rf"{data.name}.* changed "):
        load_pairs(data, sha256=fingerprint.sha256)
    assert load_ratings(data, sha256=data_fingerprint(data).sha256).labels.ravel().tolist() == [2.0]


def test_local_data_is_hashed_once_before_and_once_after_its_read(tmp_path, monkeypatch):
    path = write_rows([{"messages": RATING_ROWS[0][0], "score": 1.0}], tmp_path / "r.jsonl")
    hashed = []
    real = data_module.file_sha256
    monkeypatch.setattr(data_module, "file_sha256", lambda p: hashed.append(os.fspath(p)) or real(p))
    load_ratings(path, sha256=data_fingerprint(path).sha256)
    assert hashed == [path, path]
