"""The documentation runs as written.

* README.md stays a front door: fewer than 200 lines.
* Every ```python snippet of README.md and docs/*.md runs: here, in a fresh interpreter with stdin closed and its
  checkpoint path pointed at a tiny checkpoint, or, when it needs more than a checkpoint (a trainer and its data,
  vLLM, a running server, the metric module), in the tests `RUN_ELSEWHERE` names for it, which must call what the
  snippet calls. A new snippet that is in neither place is run here, and fails if it cannot run.
* Every `armorm COMMAND --flag` shown exists; every module a page names imports; docs/cli.md is what the settings
  dataclasses generate; every relative link (and its #anchor) resolves.
"""

import ast
import importlib
import os
import re
from pathlib import Path

import pytest

from armorm_cli.cli import COMMANDS, build_parser
from armorm_cli.reference import reference
from armorm_io.reports import command_line
from conversion.build import STAGES
from tests.utils import run_snippet_without_prompt, tiny_armorm, tiny_llama_config


ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CLI_REFERENCE = ROOT / "docs" / "cli.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
# Pages whose links must resolve (their snippets are not tested: they show old and new names side by side).
LINKED_PAGES = [*PAGES, ROOT / "CHANGELOG.md", ROOT / "SECURITY.md"]

# The snippets that need more than a checkpoint folder, by (page, a line of the snippet) → the tests that run the
# snippet's code, and what the snippet calls, which those tests' module must call too.
RUN_ELSEWHERE = {
    ("docs/trl.md", "reward_weights=[1.0, 0.5]"): (
        ["tests/modeling_armorm/test_trl.py::test_grpo_with_model_object_and_callable"],
        ["GRPOConfig(", "GRPOTrainer(", "reward_funcs=[", "reward_weights="],
    ),
    ("docs/trl.md", 'reward_funcs=["/abs/path/armorm"]'): (
        ["tests/modeling_armorm/test_trl.py::test_grpo_with_checkpoint_path"],
        ["GRPOTrainer(", "model_init_kwargs=", '"trust_remote_code": True'],
    ),
    ("docs/trl.md", "OnlineDPOTrainer("): (
        ["tests/modeling_armorm/test_trl.py::test_online_dpo_with_model_object"],
        ["OnlineDPOTrainer(", "OnlineDPOConfig(", "reward_processing_classes="],
    ),
    ("docs/trl.md", "RewardTrainer("): (
        [
            "tests/modeling_armorm/test_trl.py::test_reward_trainer_trains_the_heads",
            "tests/modeling_armorm/test_trl.py::test_reward_trainer_with_peft",
        ],
        ["RewardTrainer(", "model.model.requires_grad_(False)", "LoraConfig(", "modules_to_save=", "peft_config="],
    ),
    ("docs/serving.md", "score_tokens(llm"): (
        ["tests/serving/vllm/test_plugin.py::test_released_layout_matches_its_conversion"],
        ["LLM(", "score_tokens("],
    ),
    ("docs/serving.md", '"http://localhost:8000/get_reward"'): (
        ["tests/serving/test_serve.py::test_get_reward_answers_openrlhf"],
        ["/get_reward", "apply_chat_template(", "add_generation_prompt=True", "eos_token", '"labels"'],
    ),
    ("docs/serving.md", 'ArmoRMReward(url="http://reward-host:8000")'): (
        ["tests/serving/test_serve.py::test_armorm_reward_scores_through_the_server"],
        ["ArmoRMReward(url="],
    ),
    ("docs/verl.md", "from serving.verl_reward import compute_score"): (
        ["tests/serving/test_verl_reward.py::test_loaded_as_a_pkg_path"],
        ["compute_score(", "ARMORM_SERVE_URL"],
    ),
    ("docs/evaluation.md", "evaluate.load("): (
        ["tests/evaluation/test_rewardbench.py::test_evaluate_metric_loaded_by_path"],
        ["evaluate.load(", "subset=", "chosen_score=", "rejected_score="],
    ),
}
# The snippets run here score this checkpoint folder; it gets the demo checkpoint's objectives.
CHECKPOINT_PATHS = ("/abs/path/to/checkpoint", "runs/demo/armorm-smollm2-demo")
DEMO_OBJECTIVES = ["demo-helpfulness", "demo-correctness", "demo-safety", "demo-verbosity"]
PACKAGES = ("modeling_armorm", "armorm_io", "evaluation", "conversion", "serving", "vllm_armorm", "armorm_cli")
# The repository's folders whose files a page may name in a code span (`conversion/support.py`).
REPO_FOLDERS = ("modeling_armorm", "armorm_io", "evaluation", "conversion", "serving", "armorm_cli", "tests")
REPO_FOLDERS += ("examples", "benchmarks", "metrics")


def name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def fenced(page: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", page.read_text(), flags=re.S | re.M)


def prose(page: Path) -> str:
    """The page without its fenced code blocks."""
    return re.sub(r"^```.*?^```$", "", page.read_text(), flags=re.S | re.M)


def snippets() -> list[tuple[str, int, str]]:
    """(page, index on the page, code) of every Python snippet of the README and the docs."""
    return [(name(page), i, code) for page in PAGES for i, code in enumerate(fenced(page, "python"))]


def elsewhere_key(page: str, code: str) -> tuple[str, str] | None:
    keys = [key for key in RUN_ELSEWHERE if key[0] == page and key[1] in code]
    assert len(keys) <= 1, f"{page}: one snippet matches {keys}"
    return keys[0] if keys else None


RUN_HERE = [s for s in snippets() if elsewhere_key(s[0], s[2]) is None]
RUN_THERE = [s for s in snippets() if elsewhere_key(s[0], s[2]) is not None]


def test_readme_is_a_front_door():
    lines = README.read_text().count("\n")
    assert lines < 200, f"README.md has {lines} lines: move the reference to a page of docs/ and link it"


def test_every_elsewhere_entry_names_one_snippet():
    """No stale entry: each `RUN_ELSEWHERE` key matches exactly one snippet (else it excuses nothing, or two)."""
    for page, line in RUN_ELSEWHERE:
        matching = [s for s in snippets() if s[0] == page and line in s[2]]
        assert len(matching) == 1, f"RUN_ELSEWHERE[{page!r}, {line!r}] matches {len(matching)} snippets"
    assert len(RUN_HERE) >= 5  # README: the pipeline and ArmoRMReward; scoring.md: both; trl.md: ArmoRMReward


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    model = tiny_armorm(
        tiny_llama_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id), tokenizer=tokenizer,
        objective_names=DEMO_OBJECTIVES,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("page, index, code", RUN_HERE, ids=[f"{p}-{i}" for p, i, _ in RUN_HERE])
def test_snippet_runs_here(page, index, code, checkpoint, tmp_path):
    """The snippet as written (its checkpoint path pointed at a tiny checkpoint with the demo's objectives), in a
    fresh interpreter with stdin closed, so a `trust_remote_code` prompt would fail it; it prints its result."""
    for path in CHECKPOINT_PATHS:
        code = code.replace(path, str(checkpoint))
    (tmp_path / "snippet.py").write_text(code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    printed = run_snippet_without_prompt(["snippet.py"], tmp_path, env, what=f"{page} snippet {index}:\n{code}")
    assert printed.strip(), f"{page} snippet {index} printed nothing"


def function_source(test_id: str) -> tuple[str, str]:
    """(the test function's source, its module's source) for `tests/…/test_x.py::test_name`."""
    file, function = test_id.split("::")
    source = (ROOT / file).read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == function:
            return ast.get_source_segment(source, node), source
    raise AssertionError(f"{test_id} does not exist: point RUN_ELSEWHERE at the test that runs the snippet")


@pytest.mark.parametrize("page, index, code", RUN_THERE, ids=[f"{p}-{i}" for p, i, _ in RUN_THERE])
def test_snippet_runs_in_the_test_named_for_it(page, index, code):
    """The snippet is valid Python, its named tests exist, and what it calls they call too (in the test or in the
    helpers and fixtures of its module)."""
    compile(code, f"{page} snippet {index}", "exec")
    tests, calls = RUN_ELSEWHERE[elsewhere_key(page, code)]
    modules = [function_source(test_id)[1] for test_id in tests]
    for call in calls:
        assert call in code, f"RUN_ELSEWHERE for {page} snippet {index}: the snippet no longer calls {call!r}"
        assert any(call in source for source in modules), f"{tests} do not call {call!r} as {page} does"


def test_every_snippet_that_loads_a_checkpoint_never_asks_to_run_custom_code():
    """Each snippet that loads a model or tokenizer imports the package (which registers ArmoRM) or passes
    `trust_remote_code=True` to every `from_pretrained`: none stops at `Do you wish to run the custom code? [y/N]`."""
    for page, index, code in snippets():
        loads = code.count("from_pretrained(") + code.count("pipeline(")
        if loads and "import modeling_armorm" not in code and "from modeling_armorm" not in code:
            assert code.count("trust_remote_code=True") >= code.count("from_pretrained("), (page, index)


def resolves(dotted: str) -> bool:
    """`a.b.c` is a module, or an attribute of the longest module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


def named_modules(page: Path) -> set[str]:
    """The project's dotted names a page shows: in prose code spans, and imported by its Python snippets."""
    spans = re.findall(rf"`((?:{'|'.join(PACKAGES)})(?:\.\w+)+)", prose(page))
    names = {span for span in spans if not span.endswith((".py", ".md", ".json"))}  # not file names
    for code in fenced(page, "python"):
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                names |= {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names if alias.name.split(".")[0] in PACKAGES}
    return names


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_named_modules_and_files_exist(page):
    """Every module, class or function the page names by its import path exists (no `conversion.evaluate` after
    the move to `evaluation.evaluate`), and every file of the repository it names in a code span is there."""
    missing = sorted(dotted for dotted in named_modules(page) if not resolves(dotted))
    assert not missing, f"{name(page)} names what does not exist: {missing}"
    files = re.findall(rf"`((?:{'|'.join(REPO_FOLDERS)})/[\w./-]*)`", prose(page))
    assert not [f for f in files if not (ROOT / f).exists()], f"{name(page)} names missing files"


@pytest.mark.parametrize("page", LINKED_PAGES, ids=name)
def test_tests_a_page_cites_exist(page):
    """Each test a page cites for a guarantee (`tests/x.py::test_a`, then `::test_b` of the same file) is defined."""
    missing, file = [], None
    for path, test in re.findall(r"`(tests/[\w/]+\.py)?::(test_\w+)`", prose(page)):
        file = path or file
        source = (ROOT / file).read_text() if file and (ROOT / file).exists() else ""
        if not re.search(rf"^(async )?def {test}\(", source, flags=re.M):
            missing.append(f"{file}::{test}")
    assert not missing, f"{name(page)} cites tests that do not exist: {missing}"


def cli_sections() -> dict[str, set[str]]:
    """docs/cli.md: command → the flags of its table."""
    sections = re.split(r"^## `armorm ([\w-]+)`$", CLI_REFERENCE.read_text(), flags=re.M)
    return {
        command: set(re.findall(r"^\| `(--[\w-]+)`", body, flags=re.M))
        for command, body in zip(sections[1::2], sections[2::2])
    }


def shown_commands(page: Path) -> list[tuple[str, list[str], str]]:
    """(command, its flags, the line) of every `armorm COMMAND …` in the page's bash blocks (continuation lines
    joined, comments dropped) and of every code span in its prose that gives `armorm COMMAND --flag`."""
    lines = []
    for block in fenced(page, "bash"):
        lines += [re.split(r"\s#", line)[0] for line in block.replace("\\\n", " ").splitlines()]
    lines += [span for span in re.findall(r"`(armorm [a-z][^`]*)`", prose(page)) if " --" in span]
    shown = []
    for line in lines:
        for match in re.finditer(r"(?<![\w.-])armorm(?:_cli)?[ \t]+([a-z][\w-]*)([^|;&>]*)", line):
            shown.append((match[1], re.findall(r"(?<![\w-])(--[a-z][\w-]*)", match[2]), line.strip()))
    return shown


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_commands_and_flags_shown_exist(page):
    """Each `armorm COMMAND` shown is a command of the dispatcher, and each of its flags is in that command's table in
    docs/cli.md (`armorm build` also takes every stage's settings as `--<stage>-<name>`)."""
    sections = cli_sections()
    build_flags = set(build_parser().stage_parsers["build"]._option_string_actions)
    for command, flags, line in shown_commands(page):
        assert command in COMMANDS, f"{name(page)}: `armorm {command}` is not a command ({line})"
        for flag in flags:
            staged = command == "build" and flag.split("-")[2] in STAGES and flag in build_flags
            known = flag in sections[command] or flag == "--help" or staged
            assert known, f"{name(page)}: `armorm {command}` has no flag {flag} ({line}); see docs/cli.md"


def test_commands_shown_are_checked():
    """The scan above sees the pages' commands (a broken pattern would check nothing)."""
    shown = {command for page in PAGES for command, _, _ in shown_commands(page)}
    assert {"build", "extract", "fit", "decorrelate", "gate", "assemble", "push", "evaluate", "serve"} <= shown
    assert {"score", "explain", "convert-rlhflow", "rewardbench-score"} <= shown


def test_cli_reference_is_generated():
    """docs/cli.md is what the settings dataclasses print today."""
    assert CLI_REFERENCE.read_text() == reference(), (
        "docs/cli.md is stale: regenerate it with `python -m armorm_cli.reference > docs/cli.md`"
    )


def anchors(page: Path) -> set[str]:
    """The #anchors of a page's headings, as GitHub makes them."""
    found, seen = set(), {}
    for heading in re.findall(r"^#+ (.+)$", prose(page), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


@pytest.mark.parametrize("page", LINKED_PAGES, ids=name)
def test_relative_links_resolve(page):
    """Every relative link (and image) points to a file of the repository, and its #anchor to a heading there."""
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(page)):
        if re.match(r"[a-z]+:", target):
            continue  # https://, mailto:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{name(page)} links to {target}, which does not exist"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{name(page)} links to {target}: no such heading in {file.name}"


def test_nothing_cites_a_spec_the_repository_does_not_hold():
    """Code, tests, docs and the Makefile cite the paper (arXiv 2406.12845 §3.2) or a page of docs/, never a
    design note outside the repository ("SPEC §6")."""
    folders = [ROOT / folder for folder in (*REPO_FOLDERS, "docs")]
    files = [path for folder in folders for path in folder.rglob("*") if path.suffix in (".py", ".md", ".txt", ".yml")]
    files += [*ROOT.glob("*.md"), ROOT / "Makefile", ROOT / "pyproject.toml", ROOT / "setup.cfg"]
    citing = [
        name(path)
        for path in files
        if path.is_file() and path != Path(__file__) and re.search(r"\bSPEC\b", path.read_text(errors="replace"))
    ]
    assert citing == [], f"{citing} cite a SPEC that is not in the repository: cite the paper or the docs page"


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
