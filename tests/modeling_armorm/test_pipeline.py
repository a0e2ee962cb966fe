"""The `reward-scoring` pipeline: its scores against a per-row forward written here, explain's arithmetic, compare
and rank against score, batching, order, device/dtype/max_length, the text-classification pipeline and the chart."""

import ast
import copy
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from modeling_armorm import ArmoRMForRewardModeling, ArmoRMPipeline, ArmoRMReward, Explanation, plot_explanation
from tests.serving_utils import sensitive_gating
from tests.utils import BackboneForwards, spy_on_shared_prefixes, tiny_armorm, tiny_llama_config


pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["helpfulness", "correctness", "verbosity", "answer-length"]
VERBOSITY, LENGTH = 2, 3
PENALTIES = [0.4, 0.7, 0.0, 0.2]
SEPARATOR = "<|im_end|>\n<|im_start|>assistant\n"
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one, in French, with a sentence about it?"},
        {"role": "assistant", "content": "Rouge : c'est la couleur des tomates mûres et des coquelicots."},
    ],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}],
    [
        {"role": "user", "content": "Explain recursion in one paragraph."},
        {
            "role": "assistant",
            "content": "A function that calls itself on a smaller input until a base case stops it.",
        },
    ],
    [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes."}],
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer_dir):
    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


def save_checkpoint(folder: Path, tokenizer) -> Path:
    """A tiny ArmoRM as `armorm gate` leaves one: verbosity decorrelated (T from λ) and left out of the gate, plus
    the answer-length objective, saved with the SmolLM2 tokenizer."""
    model = tiny_armorm(
        tiny_llama_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id),
        num_objectives=len(NAMES),
        tokenizer=tokenizer,
        objective_names=NAMES,
        verbosity_objective=VERBOSITY,
        gated_objectives=[0, 1, 3],
        length_objective=LENGTH,
    )
    # T = I; T[v, :] −= λ; T[v, v] = 0
    matrix = torch.eye(len(NAMES))
    matrix[VERBOSITY] -= torch.tensor(PENALTIES)
    matrix[VERBOSITY, VERBOSITY] = 0.0
    with torch.no_grad():
        model.reward_transform_matrix.copy_(matrix)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    return save_checkpoint(tmp_path_factory.mktemp("pipeline") / "ckpt", tokenizer)


@pytest.fixture(scope="module")
def rm(checkpoint):
    return pipeline("reward-scoring", model=str(checkpoint), device="cpu")


def reference(model, tokenizer, conversations) -> list[dict]:
    """The model's math, one conversation at a time and unpadded: apply_chat_template's tokens, h_x at the last
    separator, r = W h with r_len = log(1 + n), g = β softmax over the gated objectives, s = Σ_i g_i (r T)_i."""
    pattern = tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"]
    config, rows = model.config, []
    torch.set_grad_enabled(False)
    for messages in conversations:
        ids = list(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])
        with torch.no_grad():
            hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0].double()
        start = max(i for i in range(len(ids) - len(pattern) + 1) if ids[i : i + len(pattern)] == pattern)
        r = model.regression_layer.weight.double() @ hidden[-1]
        r[config.length_objective] = math.log1p(len(ids) - 1 - start)
        x = hidden[start]
        for layer in model.gating.layers[:-1]:
            x = torch.clamp(layer.weight.double() @ x + layer.bias.double(), min=0)
        logits = (model.gating.layers[-1].weight.double() @ x + model.gating.layers[-1].bias.double()) / 10.0
        gated = config.gated_objectives
        weights = torch.zeros_like(logits)
        weights[gated] = torch.softmax(logits[gated], -1)
        g = model.gating.logit_scale.double() * weights
        T = model.reward_transform_matrix.double()
        r_t = r @ T
        rows.append(
            {
                "score": float(sum(g[i] * r_t[i] for i in range(len(g)))),
                "rewards": r.tolist(),
                "gating": g.tolist(),
                "coefficients": (T @ g).tolist(),
            }
        )
    torch.set_grad_enabled(True)
    return rows


def assert_row(result: dict, expected: dict) -> None:
    assert result["score"] == pytest.approx(expected["score"], rel=1e-4, abs=1e-5)
    assert list(result["rewards"]) == NAMES and list(result["gating"]) == NAMES
    assert list(result["rewards"].values()) == pytest.approx(expected["rewards"], rel=1e-4, abs=1e-5)
    assert list(result["gating"].values()) == pytest.approx(expected["gating"], rel=1e-4, abs=1e-5)


def test_the_task_is_registered_on_import(rm):
    assert "reward-scoring" in PIPELINE_REGISTRY.get_supported_tasks()
    assert isinstance(rm, ArmoRMPipeline) and isinstance(rm.model, ArmoRMForRewardModeling)


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_scores_equal_a_per_row_forward_in_input_order(rm, tokenizer, batch_size):
    expected = reference(rm.model, tokenizer, CONVERSATIONS)
    results = rm.score(CONVERSATIONS, batch_size=batch_size)
    assert len(results) == len(CONVERSATIONS)
    for result, row in zip(results, expected):
        assert_row(result, row)
    # Another order in, the same order out; `pipe(...)` is `score(...)`; one conversation gives one dict.
    order = [3, 0, 4, 2, 1]
    shuffled = rm([CONVERSATIONS[i] for i in order], batch_size=batch_size)
    for result, i in zip(shuffled, order):
        assert_row(result, expected[i])
    assert_row(rm(CONVERSATIONS[1]), expected[1])


def test_batch_size_does_not_change_a_score(rm):
    one = [r["score"] for r in rm.score(CONVERSATIONS, batch_size=1)]
    for batch_size in (2, 3, 5):
        assert [r["score"] for r in rm.score(CONVERSATIONS, batch_size=batch_size)] == pytest.approx(one, abs=1e-5)


def test_explain_takes_the_score_apart(rm, tokenizer):
    expected = reference(rm.model, tokenizer, CONVERSATIONS)
    explanations = rm.explain(CONVERSATIONS, top_k=2)
    assert len(explanations) == len(CONVERSATIONS) and all(isinstance(e, Explanation) for e in explanations)
    for explanation, row in zip(explanations, expected):
        by_name = {o.name: o for o in explanation.objectives}
        assert sorted(by_name) == sorted(NAMES)
        assert explanation.score == pytest.approx(row["score"], rel=1e-4, abs=1e-5)
        # The contributions c_i r_i sum to the score, as the model computes it.
        assert sum(o.contribution for o in explanation.objectives) == pytest.approx(explanation.score, abs=1e-5)
        for j, name in enumerate(NAMES):
            o = by_name[name]
            assert o.contribution == pytest.approx(o.coefficient * o.reward, rel=1e-12)
            assert o.reward == pytest.approx(row["rewards"][j], rel=1e-4, abs=1e-5)
            assert o.coefficient == pytest.approx(row["coefficients"][j], rel=1e-4, abs=1e-5)
            assert explanation.gating[name] == pytest.approx(row["gating"][j], rel=1e-4, abs=1e-5)
        # Verbosity is out of the gate (g_v = 0) but weighs −Σ λ_i g_i through T; the length reward is log(1 + n).
        g = [explanation.gating[name] for name in NAMES]
        assert g[VERBOSITY] == 0.0
        assert by_name["verbosity"].coefficient == pytest.approx(-sum(p * w for p, w in zip(PENALTIES, g)), abs=1e-5)
        sizes = [abs(o.contribution) for o in explanation.objectives]
        assert sizes == sorted(sizes, reverse=True)
        assert explanation.top == explanation.objectives[:2]
    one = rm.explain(CONVERSATIONS[0])
    assert isinstance(one, Explanation) and len(one.top) == 3
    as_dict = json.loads(json.dumps(one.to_dict()))
    assert set(as_dict) == {"score", "objectives", "gating", "top"}
    assert set(as_dict["objectives"][0]) == {"name", "reward", "coefficient", "contribution", "learned_from"}
    assert as_dict["score"] == one.score and list(as_dict["gating"]) == NAMES


def test_compare_and_rank_agree_with_score(rm):
    prompt = "Explain recursion in one paragraph."
    answers = ["It calls itself.", "A function that calls itself on a smaller input until a base case stops it.", ""]
    convs = [[{"role": "user", "content": prompt}, {"role": "assistant", "content": a}] for a in answers]
    scores = [r["score"] for r in rm.score(convs)]
    compared = rm.compare(prompt, answers[0], answers[1])
    assert compared["scores"] == pytest.approx(scores[:2], abs=1e-6)
    assert compared["margin"] == pytest.approx(scores[0] - scores[1], abs=1e-6)
    assert compared["preferred"] == ("a" if scores[0] > scores[1] else "b")
    # A message-list prompt is the same prompt; the same answer twice is a tie.
    assert rm.compare([{"role": "user", "content": prompt}], answers[1], answers[0])["preferred"] == (
        "a" if scores[1] > scores[0] else "b"
    )
    tie = rm.compare(prompt, answers[0], answers[0])
    assert tie["preferred"] == "tie" and tie["margin"] == 0.0
    ranked = rm.rank(prompt, answers)
    order = sorted(range(len(answers)), key=lambda i: -scores[i])
    assert [r["index"] for r in ranked] == order and [r["rank"] for r in ranked] == [1, 2, 3]
    for entry in ranked:
        assert entry["answer"] == answers[entry["index"]]
        assert entry["score"] == pytest.approx(scores[entry["index"]], abs=1e-6)


def assert_equal_alone(results: list[dict], expected: list[dict]) -> None:
    """Every score, reward and gating weight equals the conversation's scored alone, within 1e-5 relative."""
    keys = ("score", "rewards", "gating")
    got = {key: [r[key] if key == "score" else list(r[key].values()) for r in results] for key in keys}
    want = {key: [e[key] for e in expected] for key in keys}
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # a failure names the key


def test_answers_to_one_prompt_run_it_once(rm, tokenizer, monkeypatch):
    """`compare`, `rank` and `score` on a list that repeats prompts score the answers to one prompt together through
    the shared-prefix path (its groups are those the prompts make), and every number equals the conversation scored
    alone (`reference`: apply_chat_template's tokens, one conversation at a time). The gate depends strongly on h_x
    here, so an h_x read at a wrong position shows."""
    model = copy.deepcopy(rm.model)
    sensitive_gating(model, seed=1)
    pipe = pipeline("reward-scoring", model=model, tokenizer=tokenizer, device="cpu")
    groups = spy_on_shared_prefixes(monkeypatch)
    prompt = "Explain recursion in one paragraph."
    answers = ["It calls itself.", "A function that calls itself on a smaller input.", "", "See: recursion."]
    convs = [[{"role": "user", "content": prompt}, {"role": "assistant", "content": a}] for a in answers]
    ids = [tuple(tokenizer.apply_chat_template(c, tokenize=True)["input_ids"]) for c in convs]
    expected = reference(model, tokenizer, convs)

    compared = pipe.compare(prompt, answers[0], answers[1])
    assert groups == [sorted(ids[:2])]
    torch.testing.assert_close(compared["scores"], [e["score"] for e in expected[:2]], rtol=1e-5, atol=1e-6)
    groups.clear()
    ranked = pipe.rank(prompt, answers)
    assert groups == [sorted(ids)]
    got = [entry["score"] for entry in sorted(ranked, key=lambda entry: entry["index"])]
    torch.testing.assert_close(got, [e["score"] for e in expected], rtol=1e-5, atol=1e-6)

    # Two prompts (one of several turns) three and two times, in between a conversation alone; batches of 2 split
    # the group of three.
    turns = CONVERSATIONS[1][:-1]
    mixed = [convs[0], [*turns, convs[1][-1]], CONVERSATIONS[0], convs[2], [*turns, convs[3][-1]], convs[3]]
    mixed_ids = [tuple(tokenizer.apply_chat_template(c, tokenize=True)["input_ids"]) for c in mixed]
    groups.clear()
    results = pipe.score(mixed, batch_size=2)
    assert sorted(groups) == sorted([sorted(mixed_ids[i] for i in (0, 3, 5)), sorted(mixed_ids[i] for i in (1, 4))])
    assert_equal_alone(results, reference(model, tokenizer, mixed))


def test_device_dtype_batch_size_and_max_length(checkpoint, tokenizer):
    rm = pipeline(
        "reward-scoring", model=str(checkpoint), device="cpu", dtype=torch.bfloat16, batch_size=2, max_length=400
    )
    assert rm.device == torch.device("cpu") and rm._batch_size == 2
    assert rm.model.model.dtype == torch.bfloat16 and rm.model.regression_layer.weight.dtype == torch.float32
    expected = reference(rm.model, tokenizer, CONVERSATIONS)  # the bfloat16 backbone, row by row
    for result, row in zip(rm.score(CONVERSATIONS), expected):
        assert result["score"] == pytest.approx(row["score"], rel=2e-2, abs=2e-2)
    lengths = [len(tokenizer.apply_chat_template(c, tokenize=True)["input_ids"]) for c in CONVERSATIONS]
    limit = sorted(lengths)[-2]  # only the longest conversation is over it
    longest = lengths.index(max(lengths))
    with pytest.raises(ValueError, match=rf"Conversation {longest} has {max(lengths)} tokens, more than `max_length`"):
        rm.score(CONVERSATIONS, max_length=limit)
    assert len(rm.score(CONVERSATIONS, max_length=max(lengths))) == len(CONVERSATIONS)
    # A loaded model and tokenizer work too.
    model = ArmoRMForRewardModeling.from_pretrained(checkpoint)
    direct = pipeline("reward-scoring", model=model, tokenizer=tokenizer, device="cpu")
    assert isinstance(direct, ArmoRMPipeline) and direct(CONVERSATIONS[0])["score"] == pytest.approx(
        reference(model, tokenizer, CONVERSATIONS[:1])[0]["score"], rel=1e-4, abs=1e-5
    )


def test_truncate_prompt_drops_the_earliest_prompt_turns(checkpoint, rm, tokenizer):
    """Conversation 1 (system, user, assistant, user, assistant) is the only one over `max_length`: refused without
    `truncate_prompt`, and with it scored as its system turn, last user turn and answer (`armorm extract`'s policy);
    the others are scored as they are."""
    lengths = [len(tokenizer.apply_chat_template(c, tokenize=True)["input_ids"]) for c in CONVERSATIONS]
    short = [*CONVERSATIONS[1][:1], *CONVERSATIONS[1][3:]]
    short_length = len(tokenizer.apply_chat_template(short, tokenize=True)["input_ids"])
    limit = max(short_length, *lengths[:1], *lengths[2:])
    assert lengths[1] > limit  # only conversation 1 is too long, and without its first exchange it fits
    with pytest.raises(ValueError, match=rf"Conversation 1 has {lengths[1]} tokens, more than `max_length`"):
        rm.score(CONVERSATIONS, max_length=limit)
    expected = reference(rm.model, tokenizer, [*CONVERSATIONS[:1], short, *CONVERSATIONS[2:]])
    for result, row in zip(rm.score(CONVERSATIONS, max_length=limit, truncate_prompt=True), expected):
        assert_row(result, row)
    # Set on the pipeline (as `armorm score --max-length --truncate-prompt` does), and through explain.
    truncating = pipeline(
        "reward-scoring", model=str(checkpoint), device="cpu", max_length=limit, truncate_prompt=True
    )
    assert_row(truncating(CONVERSATIONS[1]), expected[1])
    assert truncating.explain(CONVERSATIONS[1]).score == pytest.approx(expected[1]["score"], rel=1e-4, abs=1e-5)
    assert rm.score(CONVERSATIONS, truncate_prompt=True)[1]["score"] != pytest.approx(expected[1]["score"])
    # Shorter than the turns it keeps: still refused, naming the conversation.
    assert lengths[0] < short_length - 1
    with pytest.raises(ValueError, match=r"Conversation 1: too long: .* even with only the system turn"):
        truncating(CONVERSATIONS[:2], max_length=short_length - 1)


def test_bad_input_names_the_conversation(rm):
    bad = [CONVERSATIONS[0], [{"role": "user", "content": "No answer."}]]
    with pytest.raises(ValueError, match="conversation 1 ends with a user turn"):
        rm.score(bad)
    with pytest.raises(ValueError, match="ends with an assistant turn"):
        rm.compare(CONVERSATIONS[0], "a", "b")
    with pytest.raises(ValueError, match="candidate 1 must be a string"):
        rm.rank("Hi", ["ok", None])


def test_the_other_scorers_share_the_pipeline_path(rm, tokenizer):
    """`ArmoRMReward` and `armorm evaluate` score through the same `scoring` path: the same numbers, bit for bit, for
    the same conversations in the same order. (A pair's answers share their prompt, which runs once: that equals the
    prompt run with each answer up to float rounding, not bit for bit, so the pairs are compared with the pipeline
    scoring the same pairs.)"""
    from evaluation.evaluate import EvalRow, score_rows

    scores = [r["score"] for r in rm.score(CONVERSATIONS, batch_size=1)]
    reward = ArmoRMReward(rm.model, tokenizer=tokenizer, batch_size=1)
    assert reward([c[:-1] for c in CONVERSATIONS], [c[-1:] for c in CONVERSATIONS]) == scores
    pairs = [(CONVERSATIONS[0][:-1], "4.", "Four."), (CONVERSATIONS[4][:-1], "Yes.", "No.")]
    rows = [
        EvalRow(id=i, subset="s", prompt=prompt, chosen=[chosen], rejected=[rejected], index=i)
        for i, (prompt, chosen, rejected) in enumerate(pairs)
    ]
    scored, *_ = score_rows(rm.model, tokenizer, rows, batch_size=1)
    answers = [prompt + [{"role": "assistant", "content": a}] for prompt, *both in pairs for a in both]
    paired = [r["score"] for r in rm.score(answers, batch_size=1)]
    assert [s for row in scored for s in (*row.chosen_scores, *row.rejected_scores)] == paired
    assert paired[::2] == pytest.approx([scores[0], scores[4]], rel=1e-5)


def test_text_classification_pipeline_returns_the_raw_score(checkpoint, rm, tokenizer):
    """transformers' text-classification pipeline reads `problem_type`; "regression" means no sigmoid."""
    assert json.loads((checkpoint / "config.json").read_text())["problem_type"] == "regression"
    classify = pipeline("text-classification", model=str(checkpoint), device="cpu")
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS]
    expected = [r["score"] for r in rm.score(CONVERSATIONS)]
    for text, score in zip(texts, expected):
        (result,) = classify(text)
        assert result["score"] == pytest.approx(score, rel=1e-4, abs=1e-5)
    assert any(abs(s - 1 / (1 + math.exp(-s))) > 1e-2 for s in expected)  # a sigmoid would have shown


def test_plot_draws_each_contribution(rm, tmp_path):
    from matplotlib.figure import Figure

    explanation = rm.explain(CONVERSATIONS[1])
    figure = plot_explanation(explanation, tmp_path / "chart.png", title="one answer")
    assert isinstance(figure, Figure) and figure.axes[0].get_title() == "one answer"
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = figure.axes[0]
    bars = sorted(axes.patches, key=lambda bar: -bar.get_y())  # top to bottom
    assert [bar.get_width() for bar in bars] == pytest.approx([o.contribution for o in explanation.objectives])
    ticks = sorted(zip(axes.get_yticks(), (t.get_text() for t in axes.get_yticklabels())), key=lambda t: -t[0])
    assert [name for _, name in ticks] == [o.name for o in explanation.objectives]
    plot_explanation(explanation, tmp_path / "chart.svg")
    svg = (tmp_path / "chart.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg


def test_plot_without_matplotlib_says_how_to_install_it(rm, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_explanation(rm.explain(CONVERSATIONS[0]))


def test_the_package_imports_without_conversion_and_registers_the_task():
    code = (
        "import sys; sys.modules['conversion'] = None; sys.modules['matplotlib'] = None\n"
        "import modeling_armorm\n"
        "from transformers.pipelines import PIPELINE_REGISTRY\n"
        "assert 'reward-scoring' in PIPELINE_REGISTRY.get_supported_tasks()\n"
        "print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_no_module_imports_private_names_of_the_package():
    """Only public names cross module boundaries into `modeling_armorm` (its own modules included)."""
    offenders = []
    # The project's own code, not the virtual environments (.venv, .venv-vllm) or derived files beside it.
    folders = (
        "modeling_armorm",
        "armorm_io",
        "evaluation",
        "conversion",
        "serving",
        "armorm_cli",
        "metrics",
        "examples",
        "benchmarks",
        "tests",
    )
    for path in (p for folder in folders for p in (ROOT / folder).glob("**/*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                inside = (node.module or "").startswith("modeling_armorm") or (
                    node.level and path.parent.name == "modeling_armorm"
                )
                if inside:
                    offenders += [f"{path}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert not offenders, offenders


def test_max_batch_tokens_bounds_every_forward(checkpoint, rm, tokenizer):
    """`max_batch_tokens`, given to `pipeline(...)` or to a call (`score`, `explain`), reaches the batching: every
    forward of several rows holds at most that many padded tokens (rows × the longest), so more forwards of fewer rows
    run than by rows alone, and every number still equals the conversation scored alone."""
    lengths = [len(tokenizer.apply_chat_template(c, tokenize=True)["input_ids"]) for c in CONVERSATIONS]
    budget = 2 * max(lengths)  # two rows of the longest conversation
    expected = reference(rm.model, tokenizer, CONVERSATIONS)
    with BackboneForwards(rm.model.model) as rows_only:
        rm.score(CONVERSATIONS, batch_size=8)
    assert rows_only.over(budget)  # by rows alone, a forward holds more than the budget

    built = pipeline("reward-scoring", model=str(checkpoint), device="cpu", batch_size=8, max_batch_tokens=budget)
    for pipe, kwargs in ((built, {}), (rm, {"batch_size": 8, "max_batch_tokens": budget})):
        with BackboneForwards(pipe.model.model) as forwards:
            results = pipe.score(CONVERSATIONS, **kwargs)
            explanations = pipe.explain(CONVERSATIONS, **kwargs)
        assert forwards and not forwards.over(budget) and len(forwards) > 2 * len(rows_only)
        assert_equal_alone(results, expected)
        assert [e.score for e in explanations] == pytest.approx([e["score"] for e in expected], rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="`max_batch_tokens` must be >= 1"):
        rm.score(CONVERSATIONS, max_batch_tokens=0)


def test_on_a_cpu_a_forward_holds_the_default_budget(rm, tokenizer):
    """No `max_batch_tokens` on a CPU: every forward of several rows holds at most `CPU_MAX_PACKED_TOKENS` tokens
    (rows × the longest; the pipeline packs its batches there), where rows alone would put more in one (long answers
    to distinct prompts, run whole); a budget given lifts it; the numbers equal each conversation scored alone either
    way."""
    from modeling_armorm.batching import CPU_MAX_PACKED_TOKENS

    words = "the tide turns slowly because the moon pulls water toward it".split()
    conversations = [
        [
            {"role": "user", "content": f"Question {i}: why do tides turn?"},
            {"role": "assistant", "content": " ".join(words[j % len(words)] for j in range(300 + 60 * i))},
        ]
        for i in range(8)
    ]
    expected = reference(rm.model, tokenizer, conversations)
    assert 8 * max(len(tokenizer.apply_chat_template(c)["input_ids"]) for c in conversations) > CPU_MAX_PACKED_TOKENS
    with BackboneForwards(rm.model.model) as by_default:
        results = rm.score(conversations, batch_size=8)
    assert by_default and not by_default.over(CPU_MAX_PACKED_TOKENS) and max(rows for rows, _ in by_default) > 1
    assert_equal_alone(results, expected)
    with BackboneForwards(rm.model.model) as lifted:
        results = rm.score(conversations, batch_size=8, max_batch_tokens=10**9)
    assert lifted == [(8, lifted[0][1])]  # one forward of all 8 rows
    assert_equal_alone(results, expected)


STATISTICS = {"count": 10, "mean": 0.25, "std": 0.5, "p1": -1.0, "p5": -0.5, "p50": 0.2, "p95": 1.0, "p99": 1.5}


@pytest.fixture(scope="module")
def scaled_checkpoint(checkpoint, tmp_path_factory):
    """The checkpoint with `score_statistics` recorded in its config, as `armorm assemble` records them."""
    folder = tmp_path_factory.mktemp("scaled") / "ckpt"
    shutil.copytree(checkpoint, folder)
    config = AutoConfig.from_pretrained(folder)
    config.score_statistics = STATISTICS
    config.save_pretrained(folder)
    return folder


def test_normalize_returns_the_score_minus_the_reference_mean_over_the_std(scaled_checkpoint, rm, tokenizer):
    """z = (s − mean) / std of the per-row forward's s; rewards and gating stay raw; a call's `normalize` overrides
    the pipeline's; compare's margin and rank are on the normalized scale."""
    expected = reference(rm.model, tokenizer, CONVERSATIONS)
    normalized = [{**row, "score": (row["score"] - 0.25) / 0.5} for row in expected]
    scaled = pipeline("reward-scoring", model=str(scaled_checkpoint), device="cpu", normalize=True)
    for result, row in zip(scaled(CONVERSATIONS), normalized):
        assert_row(result, row)
    for result, row in zip(scaled(CONVERSATIONS, normalize=False), expected):
        assert_row(result, row)
    plain = pipeline("reward-scoring", model=str(scaled_checkpoint), device="cpu")
    for result, row in zip(plain.score(CONVERSATIONS, normalize=True), normalized):
        assert_row(result, row)
    prompt, answers = CONVERSATIONS[0][0]["content"], ["4.", "Four, since 2 + 2 = 4."]
    raw = rm.compare(prompt, *answers)
    compared = scaled.compare(prompt, *answers)
    assert compared["margin"] == pytest.approx(raw["margin"] / 0.5, rel=1e-5, abs=1e-6)
    assert [r["score"] for r in scaled.rank(prompt, answers)] == pytest.approx(
        [(r["score"] - 0.25) / 0.5 for r in rm.rank(prompt, answers)], rel=1e-5, abs=1e-6
    )
    with pytest.raises(ValueError, match="`explain` is on the raw scale"):
        scaled.explain(CONVERSATIONS[0], normalize=True)
    assert scaled.explain(CONVERSATIONS[0]).score == pytest.approx(expected[0]["score"], rel=1e-4, abs=1e-5)


def test_normalize_without_score_statistics_says_how_to_get_them(checkpoint, rm):
    """A checkpoint that records no statistics (an RLHFlow conversion) refuses, at build and at call."""
    with pytest.raises(ValueError, match=r"records no score statistics.*score_statistics\(scores\)"):
        pipeline("reward-scoring", model=str(checkpoint), device="cpu", normalize=True)
    with pytest.raises(ValueError, match="records no score statistics"):
        rm(CONVERSATIONS[0], normalize=True)
