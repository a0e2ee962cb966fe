"""`armorm score` and `armorm explain`: input from a file or stdin, tables, JSON, charts and bad lines."""

import io
import json
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, pipeline

from armorm_cli import cli
from armorm_cli.explain import plot_paths
from tests.modeling_armorm.test_pipeline import CONVERSATIONS, NAMES, save_checkpoint
from tests.utils import BackboneForwards


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, smollm2_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    return str(save_checkpoint(tmp_path_factory.mktemp("score_cli") / "ckpt", tokenizer))


@pytest.fixture(scope="module")
def expected(checkpoint):
    """The pipeline's results, the reference the commands print."""
    return pipeline("reward-scoring", model=checkpoint, device="cpu").score(CONVERSATIONS)


def write_jsonl(path, conversations) -> str:
    # Both line forms, and a blank line that is skipped.
    lines = [json.dumps({"messages": c} if i % 2 else c) for i, c in enumerate(conversations)]
    path.write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n")
    return str(path)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_score_json_from_a_file_in_input_order(checkpoint, expected, tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", CONVERSATIONS)
    argv = ["score", "--model", checkpoint, "--input", data, "--json", "--batch-size", "2", "--max-length", "1000"]
    cli.main([*argv, "--dtype", "float32", "--device", "cpu"])
    printed = json_lines(capsys.readouterr().out)
    assert len(printed) == len(CONVERSATIONS)
    for row, want in zip(printed, expected):
        assert row["score"] == pytest.approx(want["score"], abs=1e-5)
        assert list(row["rewards"]) == NAMES
        assert list(row["rewards"].values()) == pytest.approx(list(want["rewards"].values()), abs=1e-5)


def test_score_table_from_stdin(checkpoint, expected, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(json.dumps(c) for c in CONVERSATIONS)))
    cli.main(["score", "--model", checkpoint])
    header, *rows = capsys.readouterr().out.strip().splitlines()
    assert header.split() == ["#", "score", *NAMES]
    assert len(rows) == len(CONVERSATIONS)
    for i, (line, want) in enumerate(zip(rows, expected)):
        cells = line.split()
        assert cells[0] == str(i) and float(cells[1]) == pytest.approx(want["score"], abs=1e-4)
        assert [float(c) for c in cells[2:]] == pytest.approx(list(want["rewards"].values()), abs=1e-4)


def test_one_json_conversation_over_several_lines_is_one_conversation(checkpoint, expected, tmp_path, capsys):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(CONVERSATIONS[1], indent=2))
    cli.main(["score", "--model", checkpoint, "--input", str(path), "--json"])
    (row,) = json_lines(capsys.readouterr().out)
    assert row["score"] == pytest.approx(expected[1]["score"], abs=1e-5)


def test_score_max_length_and_truncate_prompt(checkpoint, tmp_path, capsys):
    """`--max-length` refuses a longer conversation, naming it; `--truncate-prompt` scores it without its earliest
    prompt turns, as the pipeline does."""
    short = [*CONVERSATIONS[1][:1], *CONVERSATIONS[1][3:]]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    limit = len(tokenizer.apply_chat_template(short, tokenize=True)["input_ids"])
    path = tmp_path / "one.json"
    path.write_text(json.dumps(CONVERSATIONS[1]))
    argv = ["score", "--model", checkpoint, "--input", str(path), "--json", "--max-length", str(limit)]
    with pytest.raises(ValueError, match=r"Conversation 0 has \d+ tokens, more than `max_length`"):
        cli.main(argv)
    cli.main([*argv, "--truncate-prompt"])
    (row,) = json_lines(capsys.readouterr().out)
    want = pipeline("reward-scoring", model=checkpoint, device="cpu").score(short)
    assert row["score"] == pytest.approx(want["score"], abs=1e-5)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"in.jsonl line 2 is not JSON .*one conversation per line"),
        ('{"chosen": []}', r"in.jsonl line 2: the object has no `messages`"),
        ('[{"role": "user", "content": "Hi"}]', r"in.jsonl line 2 ends with a user turn"),
        ("42", r"in.jsonl line 2: expected a conversation, got int"),
    ],
)
def test_a_bad_line_is_named_with_the_fix(checkpoint, tmp_path, line, message):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(CONVERSATIONS[0]) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        cli.main(["score", "--model", checkpoint, "--input", str(path)])


def test_empty_input_is_an_error(checkpoint, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("\n\n"))
    with pytest.raises(ValueError, match="stdin holds no conversation"):
        cli.main(["score", "--model", checkpoint])


def test_explain_json_and_charts(checkpoint, expected, tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", CONVERSATIONS[:3])
    cli.main(
        [
            "explain",
            "--model",
            checkpoint,
            "--input",
            data,
            "--json",
            "--top-k",
            "2",
            "--plot",
            str(tmp_path / "x.png"),
        ]
    )
    printed = json_lines(capsys.readouterr().out)
    assert len(printed) == 3
    for row, want in zip(printed, expected):
        assert row["score"] == pytest.approx(want["score"], abs=1e-5)
        contributions = [o["contribution"] for o in row["objectives"]]
        assert sum(contributions) == pytest.approx(row["score"], abs=1e-5)
        assert [abs(c) for c in contributions] == sorted(map(abs, contributions), reverse=True)
        for o in row["objectives"]:
            assert set(o) == {"name", "reward", "coefficient", "contribution", "learned_from"}
            # This checkpoint's objectives are rated ones and the answer's length.
            assert (o["learned_from"] == "ratings") == (o["name"] != "answer-length"), o
            assert o["reward"] == pytest.approx(want["rewards"][o["name"]], abs=1e-5)
        assert row["gating"] == pytest.approx(want["gating"], abs=1e-5)
        assert row["top"] == row["objectives"][:2]
    assert plot_paths(str(tmp_path / "x.png"), 3) == [tmp_path / f"x-{i}.png" for i in range(3)]
    for i in range(3):
        assert (tmp_path / f"x-{i}.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "x.png").exists()


def test_explain_table_and_one_chart(checkpoint, expected, tmp_path, capsys):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"messages": CONVERSATIONS[3]}))
    cli.main(["explain", "--model", checkpoint, "--input", str(path), "--plot", str(tmp_path / "one.svg")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"conversation 0: score {expected[3]['score']:+.4f}"
    rows = [line.split() for line in lines[2:-1]]
    assert sorted(row[0] for row in rows) == sorted(NAMES)
    for name, reward, _, coefficient, _, contribution, gating in rows:
        assert float(contribution) == pytest.approx(float(reward) * float(coefficient), abs=2e-4)
        assert float(gating) == pytest.approx(expected[3]["gating"][name], abs=1e-4)
    assert lines[-1].startswith("  top 3: ")
    assert "<svg" in (tmp_path / "one.svg").read_text()


def test_score_json_never_prints_nan(checkpoint, tmp_path, capsys):
    """A backbone that overflows on one conversation (an infinite embedding of "Rouge" stands for it): `--json` prints
    no `NaN` line for it; the run fails naming that conversation."""
    from modeling_armorm import ArmoRMForRewardModeling, NonFiniteScoreError

    model = ArmoRMForRewardModeling.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    with torch.no_grad():
        model.get_input_embeddings().weight[tokenizer("Rouge", add_special_tokens=False)["input_ids"]] = float("inf")
    model.save_pretrained(tmp_path / "overflow")
    tokenizer.save_pretrained(tmp_path / "overflow")
    data = write_jsonl(tmp_path / "in.jsonl", CONVERSATIONS[:3])
    with pytest.raises(NonFiniteScoreError, match=r"[Cc]onversation\(s\) \[1\]"):
        cli.main(["score", "--model", str(tmp_path / "overflow"), "--input", data, "--json"])
    assert "NaN" not in capsys.readouterr().out


def test_max_batch_tokens_reaches_score_and_explain(checkpoint, expected, tmp_path, monkeypatch, capsys):
    """`--max-batch-tokens` reaches the pipeline's batching in both commands: every forward of several rows holds at
    most that many padded tokens (more forwards of fewer rows than by rows alone), and every score is unchanged."""
    from modeling_armorm import pipeline as pipeline_module

    score_encoded, runs = pipeline_module.score_encoded, []

    def watched(model, *args, **kwargs):  # the backbone forwards of each scoring call
        with BackboneForwards(model.model) as forwards:
            out = score_encoded(model, *args, **kwargs)
        runs.append(forwards)
        return out

    monkeypatch.setattr(pipeline_module, "score_encoded", watched)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    budget = 2 * max(len(tokenizer.apply_chat_template(c, tokenize=True)["input_ids"]) for c in CONVERSATIONS)
    data = write_jsonl(tmp_path / "in.jsonl", CONVERSATIONS)
    flag = ["--max-batch-tokens", str(budget)]
    for command, flags in (("score", []), ("score", flag), ("explain", flag)):
        cli.main([command, "--model", checkpoint, "--input", data, "--json", "--batch-size", "8", *flags])
        printed = json_lines(capsys.readouterr().out)
        assert [row["score"] for row in printed] == pytest.approx([want["score"] for want in expected], abs=1e-5)
    by_rows, *by_tokens = runs
    assert by_rows.over(budget)
    for forwards in by_tokens:
        assert forwards and not forwards.over(budget) and len(forwards) > len(by_rows)


def test_score_normalize_and_explain_refusing_it(checkpoint, expected, tmp_path, capsys):
    """`--normalize` prints (s − mean) / std of the pipeline's raw scores, with the config's statistics; `explain`,
    on the raw scale, and a checkpoint without statistics refuse it by name."""
    data = write_jsonl(tmp_path / "in.jsonl", CONVERSATIONS)
    with pytest.raises(ValueError, match="records no score statistics"):
        cli.main(["score", "--model", checkpoint, "--input", data, "--normalize"])
    scaled = tmp_path / "scaled"
    shutil.copytree(checkpoint, scaled)
    config = AutoConfig.from_pretrained(scaled)
    config.score_statistics = {"count": 2, "mean": -1.5, "std": 4.0}
    config.save_pretrained(scaled)
    capsys.readouterr()
    cli.main(["score", "--model", str(scaled), "--input", data, "--json", "--normalize"])
    printed = json_lines(capsys.readouterr().out)
    assert [row["score"] for row in printed] == pytest.approx([(want["score"] + 1.5) / 4.0 for want in expected])
    for row, want in zip(printed, expected):
        assert list(row["rewards"].values()) == pytest.approx(list(want["rewards"].values()), abs=1e-5)
    with pytest.raises(ValueError, match="`armorm explain` is on the raw scale"):
        cli.main(["explain", "--model", str(scaled), "--input", data, "--normalize"])
