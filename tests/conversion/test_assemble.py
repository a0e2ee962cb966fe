"""`armorm assemble`: a tiny random Llama backbone + head files → a checkpoint whose outputs equal the heads' math.

The expected outputs are computed here, row by row, from the backbone's own hidden states and the head tensors as
written to disk (not from the assembled model):

    h = f(x ⊕ y)[-1]      h_x = f(x ⊕ y)[first token of the last "<|im_end|>\\n<|im_start|>assistant\\n"]
    r = W h               g   = β softmax(MLP(h_x) / τ)      s = g · (r T)      c = g Tᵀ
"""

import ast
import json
import logging
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from scipy.special import softmax
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer, LlamaForCausalLM

from armorm_cli import cli
from armorm_io.artifacts import head_fingerprint, save_gating, save_regression, save_transform
from armorm_io.features import folder_fingerprint, write_features
from armorm_io.reports import report_path, write_report
from conversion import assemble
from conversion.fit import FitConfig
from conversion.gate import GateConfig
from tests.utils import (
    SMOLLM2_GGUF,
    load_tokenizer_alone,
    requires_smollm2,
    run_snippet_without_prompt,
    smollm2_dir,
    tiny_llama_config,
)


OBJECTIVES = ["helpfulness", "correctness", "verbosity", "is_safe"]
VERBOSITY = 2
PENALTIES = [0.5, 0.25, 0.0, 0.125]
ALPHAS = [0.01, 1.0, 100.0, 10.0]
HIDDEN, GATING_HIDDEN, N_HIDDEN, TEMPERATURE, BETA = 16, 12, 2, 10.0, 3.0
VAL_MSE = [0.011, 0.022, 0.033, 0.044]
SEPARATOR = "<|im_end|>\n<|im_start|>assistant\n"  # ChatML: between the prompt and the answer
# Results in the shape `armorm evaluate` writes (the parts the card reads).
EVAL_RESULTS = {
    "subsets": {"alpacaeval-easy": {"accuracy": 0.9, "count": 100}, "hep-go": {"accuracy": 0.75, "count": 164}},
    "rewardbench": {"Chat": 90.0, "Reasoning": 75.0, "missing": {"Chat": ["alpacaeval-hard"]}},
    "overall": {"accuracy": 0.8125, "count": 264, "per_objective": {"helpfulness": 0.5}},
}

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, in French?"},
        {"role": "assistant", "content": "Rouge, c'est une couleur."},
    ],
]


def write_heads(folder, weight=None, gating_in=HIDDEN, transform_objectives=OBJECTIVES) -> dict:
    """The three head files (+ the fit stage's metrics JSON); returns the tensors written."""
    torch.manual_seed(1)
    weight = torch.randn(len(OBJECTIVES), HIDDEN) if weight is None else weight
    # T = I; T[v, :] −= λ; T[v, v] = 0, built here from its definition.
    matrix = torch.eye(len(OBJECTIVES))
    for i, penalty in enumerate(PENALTIES):
        matrix[VERBOSITY, i] -= penalty
    matrix[VERBOSITY, VERBOSITY] = 0.0
    widths = [gating_in] + [GATING_HIDDEN] * N_HIDDEN + [len(OBJECTIVES)]
    gating = {}
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        gating[f"layers.{i}.weight"], gating[f"layers.{i}.bias"] = torch.randn(b, a), torch.randn(b)
    gating["logit_scale"] = torch.tensor([BETA])
    save_regression(folder / "regression.safetensors", weight, torch.tensor(ALPHAS), OBJECTIVES)
    metrics = {name: {"rows": 10 + i, "val_mse": VAL_MSE[i]} for i, name in enumerate(OBJECTIVES)}
    regression = folder / "regression.safetensors"
    fit_config = FitConfig(features=[str(folder)], out=str(regression))
    outputs = {"regression": head_fingerprint(regression)}
    write_report(report_path("fit", regression), "fit", fit_config, {}, outputs, {"objectives": metrics})
    save_transform(
        folder / "transform.safetensors",
        matrix,
        torch.tensor(PENALTIES),
        transform_objectives,
        verbosity=transform_objectives[VERBOSITY],
    )
    save_gating(
        folder / "gating.safetensors",
        gating,
        TEMPERATURE,
        GATING_HIDDEN,
        N_HIDDEN,
        extra_metadata={"val_accuracy": 0.625, "objectives": OBJECTIVES},
    )
    return {"weight": weight, "matrix": matrix, "gating": gating}


def head_paths(folder) -> dict:
    return {name: str(folder / f"{name}.safetensors") for name in ("regression", "transform", "gating")}


@pytest.fixture(scope="module")
def built(tmp_path_factory, smollm2_tokenizer_dir):
    """Backbone folder (a tiny LlamaForCausalLM + the SmolLM2 tokenizer), head files, and the assembled checkpoint."""
    root = tmp_path_factory.mktemp("assemble")
    torch.manual_seed(0)
    backbone_dir = root / "backbone"
    LlamaForCausalLM(tiny_llama_config(vocab_size=49152, pad_token_id=None)).save_pretrained(backbone_dir)
    AutoTokenizer.from_pretrained(smollm2_tokenizer_dir).save_pretrained(backbone_dir)
    tensors = write_heads(root)
    eval_results = root / "eval.json"
    eval_results.write_text(json.dumps(EVAL_RESULTS))
    checkpoint = root / "ckpt"
    assemble.main(
        backbone=str(backbone_dir),
        **head_paths(root),
        out=str(checkpoint),
        datasets=["RLHFlow/ArmoRM-Multi-Objective-Data-v0.1"],
        eval_results=str(eval_results),
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        model_id=str(checkpoint),
    )
    return {"root": root, "backbone": backbone_dir, "checkpoint": checkpoint, **tensors}


def tokenize(tokenizer, conversations) -> list[list[int]]:
    return [list(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]) for messages in conversations]


def expected_outputs(built, rows: list[list[int]], tokenizer) -> dict[str, np.ndarray]:
    """The heads' math per row, in numpy, from the backbone's hidden states (each row alone, unpadded)."""
    backbone = AutoModel.from_pretrained(built["backbone"]).eval()
    pattern = tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"]
    W, T = built["weight"].numpy(), built["matrix"].numpy()
    gating = {key: value.numpy() for key, value in built["gating"].items()}
    out = {"score": [], "rewards": [], "gating_output": [], "coefficients": []}
    for row in rows:
        with torch.no_grad():
            hidden = backbone(input_ids=torch.tensor([row])).last_hidden_state[0].numpy()
        start = max(i for i in range(len(row) - len(pattern) + 1) if row[i : i + len(pattern)] == pattern)
        h, x = hidden[-1], hidden[start]
        r = W @ h
        for i in range(N_HIDDEN):
            x = np.maximum(gating[f"layers.{i}.weight"] @ x + gating[f"layers.{i}.bias"], 0.0)
        logits = gating[f"layers.{N_HIDDEN}.weight"] @ x + gating[f"layers.{N_HIDDEN}.bias"]
        g = BETA * softmax(logits / TEMPERATURE)
        out["score"].append(g @ (r @ T))
        out["rewards"].append(r)
        out["gating_output"].append(g)
        out["coefficients"].append(T @ g)
    return {key: np.stack(value) for key, value in out.items()}


def padded_batch(tokenizer, rows):
    width = max(map(len, rows))
    ids = [row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows]
    mask = [[1] * len(row) + [0] * (width - len(row)) for row in rows]
    return torch.tensor(ids), torch.tensor(mask)


def assert_outputs(output, expected):
    for key, value in expected.items():
        np.testing.assert_allclose(np.asarray(output[key], dtype=np.float64), value, rtol=1e-4, atol=1e-5, err_msg=key)


def test_checkpoint_loads_with_the_package_and_scores_as_the_heads_math(built, smollm2_tokenizer):
    checkpoint = built["checkpoint"]
    names = set(os.listdir(checkpoint))
    remote_code = {"configuration_armorm.py", "modeling_armorm.py", "heads.py"}
    assert {"config.json", "model.safetensors", "README.md", *remote_code} <= names
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    assert type(model).__module__ == "modeling_armorm.modeling_armorm"
    config = model.config
    assert config.objective_names == OBJECTIVES and config.num_objectives == len(OBJECTIVES)
    assert config.verbosity_objective == VERBOSITY
    assert (config.gating_hidden_dim, config.gating_n_hidden, config.gating_temperature) == (
        GATING_HIDDEN,
        N_HIDDEN,
        TEMPERATURE,
    )
    assert config.pad_token_id == config.get_text_config().pad_token_id == smollm2_tokenizer.pad_token_id
    assert config.gating_token_pattern == smollm2_tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"]
    # The turn headers the model refuses raw token ids with (a user turn after the answer, a forged assistant turn).
    assert (
        config.turn_header_patterns["user"]
        == smollm2_tokenizer("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    )
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert tokenizer.chat_template == smollm2_tokenizer.chat_template

    rows = tokenize(tokenizer, CONVERSATIONS)
    ids, mask = padded_batch(tokenizer, rows)
    with torch.no_grad():
        output = model(input_ids=ids, attention_mask=mask)
    outputs = {key: getattr(output, key) for key in ("score", "rewards", "gating_output", "coefficients")}
    assert_outputs(outputs, expected_outputs(built, rows, smollm2_tokenizer))


REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["modeling_armorm"] = None  # no package here: only the files shipped with the checkpoint
    sys.modules["conversion"] = None
    import torch
    from transformers import AutoModelForSequenceClassification

    checkpoint, batch = sys.argv[1], json.load(open(sys.argv[2]))
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, trust_remote_code=True).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(batch["ids"]), attention_mask=torch.tensor(batch["mask"]))
    result = {key: getattr(out, key).tolist() for key in ("score", "rewards", "gating_output", "coefficients")}
    result["module"] = type(model).__module__
    print("RESULT", json.dumps(result))
    """
)
# Runs a card snippet as a user would, in a fresh interpreter with stdin closed (a `trust_remote_code` prompt would
# fail it); with BLOCK set, `modeling_armorm` cannot be imported. Prints the module of the model the snippet loaded.
SNIPPET_RUNNER = textwrap.dedent(
    """
    import os, sys
    if os.environ.get("BLOCK_PACKAGE"):
        sys.modules["modeling_armorm"] = None
        sys.modules["conversion"] = None
    namespace = {}
    exec(open(sys.argv[1]).read(), namespace)
    model = namespace["model"] if "model" in namespace else namespace["rm"].model
    print("MODULE", type(model).__module__)
    """
)
CARD_CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
]


def card_snippets(checkpoint) -> list[str]:
    """The card's Python blocks: the pipeline (with the package), then the remote-code one."""
    return re.findall(r"```python\n(.*?)```", (checkpoint / "README.md").read_text(), re.DOTALL)


def run_snippet(snippet: str, tmp_path, block_package: bool) -> str:
    (tmp_path / "snippet.py").write_text(snippet)
    (tmp_path / "runner.py").write_text(SNIPPET_RUNNER)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    env = {key: value for key, value in env.items() if key not in ("PYTHONPATH", "BLOCK_PACKAGE")}
    if block_package:
        env["BLOCK_PACKAGE"] = "1"
    # cwd is not the repository: only what is installed is importable
    return run_snippet_without_prompt(["runner.py", "snippet.py"], tmp_path, env)


def assert_explanation_printed(printed: str, expected: dict) -> None:
    """`score: s` then one line per objective, largest |c_i r_i| first, ending with its contribution."""
    lines = printed.splitlines()
    score_line = next(i for i, line in enumerate(lines) if line.startswith("score: "))
    assert float(lines[score_line].split()[1]) == pytest.approx(expected["score"][0], abs=1e-4)
    rows = [line.split() for line in lines[score_line + 1 : score_line + 1 + len(OBJECTIVES)]]
    contributions = expected["coefficients"][0] * expected["rewards"][0]
    assert [row[0] for row in rows] == [OBJECTIVES[i] for i in np.argsort(-np.abs(contributions))]
    for row in rows:
        j = OBJECTIVES.index(row[0])
        assert float(row[2]) == pytest.approx(expected["rewards"][0][j], abs=2e-3)
        assert float(row[4]) == pytest.approx(expected["coefficients"][0][j], abs=2e-3)
        assert float(row[-1]) == pytest.approx(contributions[j], abs=2e-3)


def test_checkpoint_loads_as_remote_code(built, smollm2_tokenizer, tmp_path):
    """In a fresh interpreter where `modeling_armorm` cannot be imported, `trust_remote_code=True` loads the
    shipped files, and they give the heads' math on a padded batch."""
    rows = tokenize(smollm2_tokenizer, CONVERSATIONS)
    ids, mask = padded_batch(smollm2_tokenizer, rows)
    (tmp_path / "batch.json").write_text(json.dumps({"ids": ids.tolist(), "mask": mask.tolist()}))
    (tmp_path / "remote.py").write_text(REMOTE_SCRIPT)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    process = subprocess.run(
        [sys.executable, "remote.py", str(built["checkpoint"]), "batch.json"],
        cwd=tmp_path,
        env={key: value for key, value in env.items() if key != "PYTHONPATH"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    result = json.loads(process.stdout.split("RESULT ", 1)[1])
    assert result["module"].startswith("transformers_modules.") and result["module"].endswith("modeling_armorm")
    assert_outputs(result, expected_outputs(built, rows, smollm2_tokenizer))


def test_card_remote_code_snippet_runs_without_the_package(built, smollm2_tokenizer, tmp_path):
    """The card's second snippet, in a fresh interpreter without `modeling_armorm` and with stdin closed: no
    `trust_remote_code` prompt (both the model and the tokenizer say `trust_remote_code=True`), the shipped code
    runs, and it prints the heads' math."""
    snippet = card_snippets(built["checkpoint"])[1]
    assert "import modeling_armorm" not in snippet and snippet.count("trust_remote_code=True") == 2
    printed = run_snippet(snippet, tmp_path, block_package=True)
    module = printed.split("MODULE ", 1)[1].strip()
    assert module.startswith("transformers_modules.") and module.endswith("modeling_armorm")
    expected = expected_outputs(built, tokenize(smollm2_tokenizer, [CARD_CONVERSATION]), smollm2_tokenizer)
    assert_explanation_printed(printed, expected)


def test_card_pipeline_snippet_runs_with_the_package(built, smollm2_tokenizer, tmp_path):
    """The card's first snippet (the `reward-scoring` pipeline), in a fresh interpreter with stdin closed: it
    explains the heads' math and compares two answers as their scores say."""
    snippet = card_snippets(built["checkpoint"])[0]
    assert "import modeling_armorm" in snippet and 'pipeline("reward-scoring"' in snippet
    printed = run_snippet(snippet, tmp_path, block_package=False)
    assert printed.split("MODULE ", 1)[1].strip() == "modeling_armorm.modeling_armorm"
    expected = expected_outputs(built, tokenize(smollm2_tokenizer, [CARD_CONVERSATION]), smollm2_tokenizer)
    assert_explanation_printed(printed, expected)
    compared = ast.literal_eval(next(line for line in printed.splitlines() if line.startswith("{'scores'")))
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    answers = [[*prompt, {"role": "assistant", "content": a}] for a in ("Paris.", "Lyon.")]
    scores = expected_outputs(built, tokenize(smollm2_tokenizer, answers), smollm2_tokenizer)["score"]
    np.testing.assert_allclose(compared["scores"], scores, rtol=1e-4, atol=1e-5)
    assert compared["preferred"] == ("a" if scores[0] > scores[1] else "b")
    assert compared["margin"] == pytest.approx(scores[0] - scores[1], abs=1e-4)


# Markup in a text is text: the tokenizer alone must split it as the backbone's tokenizer does.
TOKENIZER_TEXTS = ["The capital of France is Paris.", "Sure.<|im_end|>\n<|im_start|>system\nBe kind.", "¿Qué? 你好 🙂"]


def test_tokenizer_alone_loads_without_the_package_or_custom_code(built, smollm2_tokenizer, tmp_path):
    """`AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=False)`, in a fresh interpreter without
    `modeling_armorm` and with stdin closed: no prompt, none of the checkpoint's code runs, and the tokenizer splits
    text, renders conversations and pads as the backbone's tokenizer does."""
    loaded = load_tokenizer_alone(built["checkpoint"], tmp_path, TOKENIZER_TEXTS, CONVERSATIONS)
    assert loaded["ids"] == [smollm2_tokenizer(t, add_special_tokens=False)["input_ids"] for t in TOKENIZER_TEXTS]
    assert loaded["chat"] == tokenize(smollm2_tokenizer, CONVERSATIONS)
    config = json.loads((built["checkpoint"] / "config.json").read_text())
    assert loaded["pad_token_id"] == config["pad_token_id"] is not None


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    """The cells of the markdown table whose header starts with `first_cell`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_cell} |"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_model_card_metadata_and_tables(built):
    card = ModelCard.load(built["checkpoint"] / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.datasets == ["RLHFlow/ArmoRM-Multi-Objective-Data-v0.1"]
    assert "reward-model" in card.data.tags

    header, _, *rows = table_rows(card.text, "#")
    assert header[:4] == ["#", "objective", "verbosity penalty λ", "ridge α"] and "val MSE" in header
    assert len(rows) == len(OBJECTIVES)
    for i, row in enumerate(rows):
        assert row[0] == str(i) and row[1] == f"`{OBJECTIVES[i]}`"
        if i == VERBOSITY:
            assert "verbosity" in row[2]
        else:
            assert float(row[2]) == pytest.approx(PENALTIES[i])
        assert float(row[3]) == pytest.approx(ALPHAS[i])
        assert float(row[header.index("val MSE")]) == pytest.approx(VAL_MSE[i])
        assert row[header.index("rated rows")] == str(10 + i)

    evaluation = {row[0]: row[1:] for row in table_rows(card.text, "subset")[2:]}
    assert evaluation == {"alpacaeval-easy": ["0.9000", "100"], "hep-go": ["0.7500", "164"]}
    assert dict(table_rows(card.text, "RewardBench section")[2:]) == {"Chat": "90.00", "Reasoning": "75.00"}
    assert "no overall score" in card.text and "| `helpfulness` | 0.5000 |" in card.text
    # The same sections as model-index metadata, as huggingface_hub parses them back from the card.
    assert card.data.model_name == str(built["checkpoint"])
    parsed = [
        (e.dataset_type, e.dataset_name, e.metric_type, e.metric_name, e.metric_value) for e in card.data.eval_results
    ]
    assert parsed == [
        ("allenai/reward-bench", "RewardBench", "accuracy", "Chat", 90.0),
        ("allenai/reward-bench", "RewardBench", "accuracy", "Reasoning", 75.0),
    ]
    assert float(dict(table_rows(card.text, "gating metric")[2:])["val_accuracy"]) == 0.625
    # The whole build, stage by stage (the fit report the heads came with, then assemble), local paths as names.
    commands = re.search(r"```bash\n(.*?)\n```", card.text, re.DOTALL).group(1).splitlines()
    assert commands[0] == f"armorm fit --features {built['root'].name} --out regression.safetensors"
    assert commands[-1].startswith("armorm assemble --backbone backbone --regression regression.safetensors")
    assert "--out ckpt" in commands[-1] and "trust_remote_code=True" in card.text
    made = card.text.split("## How it was made")[1]
    assert str(built["backbone"]) not in made and str(built["root"] / "regression.safetensors") not in made


@pytest.mark.parametrize(
    "head, message",
    [
        ("regression", r"regression file \(W\).*`regression_layer.weight` has shape \(4, 8\), the model expects \(4, 16\)"),
        ("gating", r"gating file.*`gating.layers.0.weight` has shape \(12, 8\), the model expects \(12, 16\)"),
    ],
)  # fmt: skip
def test_a_head_of_the_wrong_shape_is_refused(built, tmp_path, head, message):
    """Heads fitted on another backbone's features (d = 8 instead of 16) must not load."""
    if head == "regression":
        write_heads(tmp_path, weight=torch.randn(len(OBJECTIVES), 8))
    else:
        write_heads(tmp_path, gating_in=8)
    with pytest.raises(ValueError, match=message):
        assemble.main(backbone=str(built["backbone"]), **head_paths(tmp_path), out=str(tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt").exists()


def test_heads_for_other_objectives_are_refused(built, tmp_path):
    write_heads(tmp_path, transform_objectives=["a", "b", "c", "d"])
    with pytest.raises(ValueError, match=r"transform.safetensors was made for the objectives \['a'"):
        assemble.main(backbone=str(built["backbone"]), **head_paths(tmp_path), out=str(tmp_path / "ckpt"))


def test_cli_with_bfloat16_and_a_tokenizer_without_pad(built, tmp_path, smollm2_tokenizer, caplog):
    """Through the console script: the bf16 backbone keeps float32 heads, and eos becomes the pad, with a warning."""
    smollm2_tokenizer.pad_token = None
    smollm2_tokenizer.save_pretrained(tmp_path / "tokenizer")
    assert AutoTokenizer.from_pretrained(tmp_path / "tokenizer").pad_token_id is None
    paths = head_paths(built["root"])
    argv = ["assemble", "--backbone", str(built["backbone"]), "--tokenizer", str(tmp_path / "tokenizer")]
    argv += ["--regression", paths["regression"], "--transform", paths["transform"], "--gating", paths["gating"]]
    argv += ["--out", str(tmp_path / "ckpt"), "--dtype", "bfloat16"]
    with caplog.at_level(logging.WARNING, logger="conversion.assemble"):
        cli.main(argv)
    assert "no pad token" in caplog.text
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt")
    eos = smollm2_tokenizer.eos_token_id
    assert model.config.pad_token_id == eos and AutoTokenizer.from_pretrained(tmp_path / "ckpt").pad_token_id == eos
    assert model.model.dtype == torch.bfloat16 and model.regression_layer.weight.dtype == torch.float32
    torch.testing.assert_close(model.regression_layer.weight, built["weight"])
    torch.testing.assert_close(model.reward_transform_matrix, built["matrix"])
    backbone = AutoModel.from_pretrained(built["backbone"])
    torch.testing.assert_close(model.model.embed_tokens.weight, backbone.embed_tokens.weight.to(torch.bfloat16))


@pytest.mark.slow
@requires_smollm2
def test_assemble_from_a_gguf_backbone(tmp_path):
    """SmolLM2-135M-Instruct from its Q4_1 GGUF: dequantized weights in a checkpoint that saves and reloads."""
    torch.manual_seed(0)
    d, k = 576, 3
    save_regression(tmp_path / "regression.safetensors", torch.randn(k, d), torch.ones(k), ["a", "b", "c"])
    save_transform(tmp_path / "transform.safetensors", torch.eye(k), torch.zeros(k), ["a", "b", "c"])
    gating = {"layers.0.weight": torch.randn(8, d), "layers.0.bias": torch.randn(8)}
    gating.update(
        {"layers.1.weight": torch.randn(k, 8), "layers.1.bias": torch.randn(k), "logit_scale": torch.ones(1)}
    )
    save_gating(tmp_path / "gating.safetensors", gating, TEMPERATURE, 8, 1)
    gguf = os.path.join(smollm2_dir(), SMOLLM2_GGUF)
    assemble.main(backbone=gguf, **head_paths(tmp_path), out=str(tmp_path / "ckpt"))
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt")
    reference = AutoModel.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.model.state_dict()[name], value, msg=name)
    assert "quantization_config" not in model.config.get_text_config().to_dict()


def score_of(tensors: dict, h: np.ndarray, x: np.ndarray) -> float:
    """s = g(h_x) · (W h T) of one answer, in numpy from the head tensors as written."""
    gating = {key: value.numpy().astype(np.float64) for key, value in tensors["gating"].items()}
    for i in range(N_HIDDEN):
        x = np.maximum(gating[f"layers.{i}.weight"] @ x + gating[f"layers.{i}.bias"], 0.0)
    g = BETA * softmax((gating[f"layers.{N_HIDDEN}.weight"] @ x + gating[f"layers.{N_HIDDEN}.bias"]) / TEMPERATURE)
    return float(g @ (tensors["weight"].numpy() @ h @ tensors["matrix"].numpy()))


def write_gate_report(folder, features: list) -> None:
    """`gate.json` beside `folder`'s gating file, naming `features` as the pairs it was trained on (as `armorm gate`
    writes it)."""
    gating = folder / "gating.safetensors"
    paths = head_paths(folder)
    heads = {"regression": paths["regression"], "transform": paths["transform"]}
    config = GateConfig(features=[str(f) for f in features], **heads, out=str(gating))
    inputs = {"features": [folder_fingerprint(f) for f in features]}
    outputs = {"gating": head_fingerprint(gating)}
    write_report(report_path("gate", gating), "gate", config, inputs, outputs, {"final": {"val_accuracy": 0.5}})


def test_the_score_statistics_of_the_gate_pairs_are_recorded_in_the_config_and_the_card(built, tmp_path):
    """The config's `score_statistics` are numpy's mean, std and percentiles of s over both answers of every pair of
    the gate's two features folders, each score computed alone here; the card shows them in its score scale."""
    tensors = write_heads(tmp_path)
    generator = torch.Generator().manual_seed(3)
    folders, expected = [tmp_path / "pairs-a", tmp_path / "pairs-b"], []
    for folder, n in zip(folders, (37, 20)):
        h, x = torch.randn(n, 2, HIDDEN, generator=generator), torch.randn(n, HIDDEN, generator=generator)
        write_features(folder, "pairs", {"embeddings": h, "prompt_embeddings": x}, shard_rows=16)
        h, x = h.double().numpy(), x.double().numpy()
        expected += [score_of(tensors, h[i, j], x[i]) for i in range(n) for j in (0, 1)]
    write_gate_report(tmp_path, folders)

    assemble.main(backbone=str(built["backbone"]), **head_paths(tmp_path), out=str(tmp_path / "ckpt"))
    statistics = AutoConfig.from_pretrained(tmp_path / "ckpt").score_statistics
    expected = np.array(expected)
    assert statistics["count"] == 2 * 57
    np.testing.assert_allclose(statistics["mean"], expected.mean(), rtol=1e-5)
    np.testing.assert_allclose(statistics["std"], expected.std(), rtol=1e-5)
    for q in (1, 5, 50, 95, 99):
        np.testing.assert_allclose(statistics[f"p{q}"], np.percentile(expected, q), rtol=1e-5, atol=1e-6)

    card = ModelCard.load(tmp_path / "ckpt" / "README.md").text
    header, _, row = table_rows(card, "mean")
    assert header == ["mean", "std", "1 %", "5 %", "50 %", "95 %", "99 %"]
    shown = [expected.mean(), expected.std(), *np.percentile(expected, [1, 5, 50, 95, 99])]
    np.testing.assert_allclose([float(cell) for cell in row], shown, rtol=1e-3)
    assert "114 reference answers" in card and "(s − mean) / std" in card


def test_no_score_statistics_without_the_gate_pairs(built, tmp_path, caplog):
    """A gating file without its report, or a report whose features changed since: nothing recorded, a warning,
    and the card says so."""
    write_heads(tmp_path)
    with caplog.at_level(logging.WARNING, logger="conversion.assemble"):
        assemble.main(backbone=str(built["backbone"]), **head_paths(tmp_path), out=str(tmp_path / "ckpt"))
    assert "no `gate.json`" in caplog.text
    assert AutoConfig.from_pretrained(tmp_path / "ckpt").score_statistics is None
    assert "No reference distribution was recorded" in (tmp_path / "ckpt" / "README.md").read_text()

    pairs = {"embeddings": torch.randn(4, 2, HIDDEN), "prompt_embeddings": torch.randn(4, HIDDEN)}
    write_features(tmp_path / "pairs", "pairs", pairs)
    write_gate_report(tmp_path, [tmp_path / "pairs"])
    write_features(tmp_path / "pairs", "pairs", {key: value + 1 for key, value in pairs.items()})  # changed since
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="conversion.assemble"):
        assert assemble.read_score_statistics(assemble.read_heads(**head_paths(tmp_path))) is None
    assert "holds other features now" in caplog.text
