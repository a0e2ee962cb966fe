"""examples/real_data_report.py's own code on tiny models (the report itself runs for hours on the real data): the
Bradley-Terry RM's held-out scores, and the second build on the BT backbone reusing the first one's extractions."""

import argparse
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from armorm_cli.cli import main as cli
from armorm_io.features import load_features
from conversion import extract
from tests.utils import spy_on_stages, tiny_llama_config


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def report():
    sys.path.insert(0, str(EXAMPLES))  # the script imports `demo` from its own folder
    try:
        yield importlib.import_module("real_data_report")
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.fixture
def pairs(tmp_path) -> Path:
    rows = [json.loads(line) for line in (EXAMPLES / "data" / "pairs.jsonl").open(encoding="utf-8")][:5]
    path = tmp_path / "data" / "heldout.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def tiny_classifier(folder: Path, tokenizer, pad_token_id: int) -> str:
    """A random one-output Llama classifier and its tokenizer, as `armorm bt` saves one."""
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=len(tokenizer), pad_token_id=pad_token_id, num_labels=1)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def classifier_logits(folder: str, rows: list[dict]) -> torch.Tensor:
    """The independent computation: each answer through `AutoModelForSequenceClassification` on the chat template's
    own tokens (its pooling, its pad id), one conversation per forward."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    scores = torch.zeros(len(rows), 2)
    for i, row in enumerate(rows):
        for side, key in enumerate(("chosen", "rejected")):
            ids = tokenizer.apply_chat_template(row[key], tokenize=True, return_dict=False)
            with torch.no_grad():
                scores[i, side] = model(input_ids=torch.tensor([ids])).logits[0, 0]
    return scores


@pytest.mark.parametrize("pooling", ["last token", "a pad id that ends every conversation"])
def test_bt_scores_are_the_classifiers_logits(report, pairs, tmp_path, smollm2_tokenizer, pooling):
    """s = w · h(last real token) from the held-out features equals the classifier's logit, so the report scores the
    BT RM without a forward; where the classifier pools another token (its pad id ends the conversations), the
    check on the first pairs sees it and every pair is scored by the classifier instead: equal to it either way."""
    rows = [json.loads(line) for line in pairs.open(encoding="utf-8")]
    last_token = smollm2_tokenizer.apply_chat_template(rows[0]["chosen"], tokenize=True, return_dict=False)[-1]
    pad = last_token if pooling.startswith("a pad id") else smollm2_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert pad != last_token or pooling.startswith("a pad id")
    folder = tiny_classifier(tmp_path / "bt", smollm2_tokenizer, pad)
    extract.main(
        extract.ExtractConfig(
            backbone=folder,
            data=str(pairs),
            kind="pairs",
            out=str(tmp_path / "heldout"),
            max_length=512,
            truncate_prompt=True,
            dtype="float32",
            device="cpu",
        )  # fmt: skip
    )
    heldout, _ = load_features(tmp_path / "heldout")
    order = heldout["index"].tolist()
    assert sorted(order) == list(range(len(rows)))

    args = argparse.Namespace(max_length=512)
    scores, how = report.bt_heldout_scores(Path(folder), heldout, rows, args, n_check=1)

    expected = classifier_logits(folder, [rows[i] for i in order])
    torch.testing.assert_close(torch.from_numpy(scores).float(), expected, rtol=1e-4, atol=1e-4)
    by_features = pooling == "last token"
    assert how["scored_by"].startswith("score head" if by_features else "AutoModelForSequenceClassification")
    assert (how["max_abs_difference"] <= how["tolerance"]) == by_features and how["checked_pairs"] == 1


def test_the_preference_build_reuses_the_first_builds_extractions(report, tmp_path, smollm2_tokenizer, monkeypatch):
    """`share_features` hard-links the finished features folders of one build work folder into another at the same
    depth, and `armorm build` there (with `--fit-preference`) reuses them: it runs fit onwards, no extraction."""
    from transformers import AutoModel

    torch.manual_seed(0)
    AutoModel.from_config(tiny_llama_config(vocab_size=len(smollm2_tokenizer), pad_token_id=2)).save_pretrained(
        tmp_path / "bt"
    )
    smollm2_tokenizer.save_pretrained(tmp_path / "bt")

    def run_build(name: str, *extra: str) -> None:
        cli([
            "build", "--backbone", str(tmp_path / "bt"),
            "--ratings", str(EXAMPLES / "data" / "ratings.jsonl"), "--pairs", str(EXAMPLES / "data" / "pairs.jsonl"),
            "--extract-split", "train[:60]", "--out", str(tmp_path / f"armorm-{name}"),
            "--work", str(tmp_path / f"build-{name}"), "--gate-steps", "10", "--gate-batch-size", "16",
            "--gate-gating-hidden-dim", "16", "--gate-eval-every", "5", "--extract-device", "cpu",
            "--gate-device", "cpu", *extra,
        ])  # fmt: skip

    runs = spy_on_stages(monkeypatch)
    run_build("bt")
    assert runs == ["extract:ratings-0", "extract:pairs-0", "fit", "decorrelate", "gate", "assemble"]
    runs.clear()

    report.share_features(tmp_path / "build-bt", tmp_path / "build-bt-preference")
    run_build("bt-preference", "--fit-preference")
    assert runs == ["fit", "decorrelate", "gate", "assemble"]
    for name in ("ratings-0", "pairs-0"):
        source, shared = (tmp_path / f"build-{k}" / "features" / name for k in ("bt", "bt-preference"))
        assert sorted(p.name for p in shared.iterdir()) == sorted(p.name for p in source.iterdir())
        assert all((shared / p.name).samefile(p) for p in source.iterdir())  # links, not copies
    objectives = json.loads((tmp_path / "build-bt-preference" / "fit.json").read_text())["metrics"]["objectives"]
    assert "preference" in objectives


def test_the_committed_report_is_rendered_from_its_results(report):
    """The README in examples/real_data_report/ is what `markdown_report` writes from the committed results.json (and
    the results it replaced), so no figure in it was edited by hand; each headline accuracy is results.json's."""
    out = EXAMPLES / "real_data_report"
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    before = out / "results_before.json"
    before = json.loads(before.read_text(encoding="utf-8")) if before.is_file() else None
    rendered = report.markdown_report({**results, "before": before})
    assert rendered == (out / "README.md").read_text(encoding="utf-8")
    for method in (report.BT_RM, report.ARMORM_BT, report.ARMORM_BT_PREFERENCE, report.ARMORM, report.PROBE):
        accuracy = results["accuracy"][method]["all"]
        assert f"| {method} | " in rendered and f"**{100 * accuracy:.1f}**" in rendered
