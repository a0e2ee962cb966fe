"""The support floor has one home (`conversion.support`) and no hidden input: `armorm decorrelate` and `armorm gate`
read each objective's support metrics from the regression file itself; for a file without them, from the `fit.json`
beside it only if it was written for that file (then an input of their reports); with neither, they say so."""

import json
import logging
from pathlib import Path

import pytest

from armorm_cli.cli import build_parser
from armorm_io.artifacts import head_fingerprint, load_regression, load_support_metrics, save_regression
from armorm_io.files import file_sha256
from conversion import build, decorrelate, gate
from conversion.decorrelate import DecorrelateSettings
from conversion.gate import GateSettings
from conversion.support import SUPPORT_KEYS, SupportSettings
from tests.conversion import test_build
from tests.conversion.test_build import run_build
from tests.conversion.test_quality import FAST, thin_ratings


pytestmark = pytest.mark.usefixtures("one_thread")
backbone = test_build.backbone  # the fixture: a tiny random Llama with SmolLM2's tokenizer


def strip_support(regression) -> None:
    """Rewrite `regression` as armorm 0.1 wrote it: the same W, α and objectives, no support metrics."""
    weight, alpha, objectives = load_regression(regression)
    save_regression(regression, weight, alpha, objectives)


def make_old_style(regression: Path) -> None:
    """`regression` and the `fit.json` beside it as armorm 0.1 wrote them: the report names the file by its hash."""
    strip_support(regression)
    report_file = regression.with_name("fit.json")
    report = json.loads(report_file.read_text())
    report["outputs"]["regression"]["sha256"] = head_fingerprint(regression).sha256
    report_file.write_text(json.dumps(report))


def run_stages(tmp_path, paths) -> tuple[dict, dict]:
    """`decorrelate --verbosity auto`, then `gate` on its transform: their reports."""
    transform = str(tmp_path / "transform.safetensors")
    decorrelated = decorrelate.main(**paths, out=transform)
    gated = gate.main(
        features=paths["reference"], regression=paths["regression"], transform=transform,
        out=str(tmp_path / "gating.safetensors"), **FAST,
    )  # fmt: skip
    return decorrelated, gated


def test_fit_records_the_support_metrics_in_the_regression_file_and_the_stages_read_them_there(tmp_path):
    paths = thin_ratings(tmp_path, labelled_verbosity=7)
    fitted = json.loads((tmp_path / "fit.json").read_text())["metrics"]["objectives"]
    recorded = load_support_metrics(paths["regression"])
    assert recorded == {name: {key: fitted[name][key] for key in SUPPORT_KEYS} for name in fitted}
    (tmp_path / "fit.json").unlink()  # nothing beside the file: the numbers come from the file alone

    decorrelated, gated = run_stages(tmp_path, paths)
    # `auto` does not trust `verbosity` (7 rated rows) and the gate leaves it out: the floor is applied.
    assert "fitted on 7 rated rows" in decorrelated["metrics"]["verbosity_reason"]
    assert "fitted on 7 rated rows" in gated["metrics"]["left_out"]["verbosity"]
    for report in (decorrelated, gated):
        assert report["metrics"]["support_source"] == "regression"
        assert "fit_report" not in report["inputs"]
        assert not any("support floors" in warning for warning in report["metrics"]["warnings"])


def test_a_regression_file_without_them_uses_the_fit_report_written_for_it_and_records_it(tmp_path):
    paths = thin_ratings(tmp_path, labelled_verbosity=7)
    make_old_style(tmp_path / "regression.safetensors")
    report_file = tmp_path / "fit.json"

    decorrelated, gated = run_stages(tmp_path, paths)
    assert "fitted on 7 rated rows" in decorrelated["metrics"]["verbosity_reason"]
    assert "fitted on 7 rated rows" in gated["metrics"]["left_out"]["verbosity"]
    for stage_report in (decorrelated, gated):
        assert stage_report["metrics"]["support_source"] == "fit_report"
        assert stage_report["inputs"]["fit_report"] == {"path": "fit.json", "sha256": file_sha256(report_file)}


def test_with_neither_a_warning_names_the_file_and_the_report_says_no_floor_was_applied(tmp_path, caplog):
    paths = thin_ratings(tmp_path, labelled_verbosity=7)
    strip_support(paths["regression"])  # and the `fit.json` beside it now belongs to the file as it was
    with caplog.at_level(logging.WARNING):
        decorrelated, gated = run_stages(tmp_path, paths)
    assert f"fit.json is not the report of {paths['regression']}" in caplog.text  # it belongs to the file before
    assert f"{paths['regression']} records no support metrics" in caplog.text
    assert "support floors (`--min-objective-rows`, `--min-objective-z`) are not applied" in caplog.text
    for report in (decorrelated, gated):
        assert report["metrics"]["support_source"] is None
        assert "fit_report" not in report["inputs"]
        assert any("are not applied" in warning for warning in report["metrics"]["warnings"])
    # No floor: `auto` takes the one objective named verbosity, and the gate leaves nothing out for its data.
    assert decorrelated["metrics"]["verbosity"] == "verbosity"
    assert "verbosity" in gated["metrics"]["left_out"]  # decorrelated away: its column of T is zero
    assert "rated rows" not in gated["metrics"]["left_out"]["verbosity"]


def test_the_floor_is_one_settings_group_of_both_stages():
    assert issubclass(DecorrelateSettings, SupportSettings) and issubclass(GateSettings, SupportSettings)
    assert DecorrelateSettings(min_objective_rows=3).min_objective_rows == 3
    with pytest.raises(ValueError, match="`min_objective_z` is NaN"):
        GateSettings(min_objective_z=float("nan"))


@pytest.mark.parametrize(
    "command, old, new, value",
    [
        ("decorrelate", "--min-verbosity-rows", "min_objective_rows", 3),
        ("decorrelate", "--min-verbosity-z", "min_objective_z", -1.0),
        ("build", "--decorrelate-min-verbosity-rows", "decorrelate_min_objective_rows", 3),
        ("build", "--decorrelate-min-verbosity-z", "decorrelate_min_objective_z", -1.0),
    ],
)
def test_the_old_flag_names_set_the_same_setting_with_a_deprecation_warning(command, old, new, value, caplog):
    required = {
        "decorrelate": ["--regression", "r", "--out", "o"],
        "build": ["--backbone", "b", "--ratings", "r", "--pairs", "p", "--out", "o"],
    }[command]
    parser = build_parser().stage_parsers[command]
    flag = "--" + new.replace("_", "-")
    with caplog.at_level(logging.WARNING):
        renamed = parser.parse_args_into_dataclasses([*required, old, str(value)])
    assert f"`{old}` is deprecated" in caplog.text and f"`{flag}`" in caplog.text
    assert renamed == parser.parse_args_into_dataclasses([*required, flag, str(value)])
    if command == "build":
        config = build._from_flags(renamed[0], renamed[1:])
        assert getattr(config.decorrelate, new.removeprefix("decorrelate_")) == value
    else:
        assert getattr(renamed[0], new) == value


def test_build_reuses_the_stages_of_a_work_folder_whose_regression_file_has_only_its_fit_report(
    backbone, tmp_path, caplog
):
    """A work folder of armorm 0.1: the `fit.json` there is among decorrelate's and gate's inputs, so build lists it
    too, or it would never reuse them."""
    run_build(backbone, tmp_path)
    work = tmp_path / "work"
    regression = work / "regression.safetensors"
    make_old_style(regression)
    caplog.set_level(logging.INFO, logger="conversion.build")
    run_build(backbone, tmp_path)  # fit is reused (its report is that file's); decorrelate and gate read fit.json
    assert "[build] decorrelate ..." in caplog.text and "[build] gate ..." in caplog.text
    for stage in ("decorrelate", "gate"):
        report = json.loads((work / f"{stage}.json").read_text())
        assert report["inputs"]["fit_report"]["path"] == "fit.json"
        assert report["metrics"]["support_source"] == "fit_report"
    caplog.clear()
    run_build(backbone, tmp_path)
    assert caplog.text.count("done earlier, reused") == 6, caplog.text
