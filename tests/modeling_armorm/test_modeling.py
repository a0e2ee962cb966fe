"""ArmoRMForRewardModeling against an independent per-row computation of the paper's math.

h   = f(x ⊕ y)[last real token]        h_x = f(x ⊕ y)[first token of the last gating pattern]
r   = W h                              g   = β softmax(MLP(h_x) / τ)     (softmax over the k objectives)
s   = Σ_i g_i (r T)_i                  c   = g Tᵀ, so s = c · r
"""

import re

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from modeling_armorm import ArmoRMConfig, ArmoRMForRewardModeling
from tests.utils import padded, reference_armorm_outputs, tiny_armorm, tiny_llama_config


PATTERN = [7, 8, 9]  # stands for "<eot><header>assistant" in a tiny vocabulary
EOT = 7


def conversations():
    """Unpadded token rows of different lengths; the pattern occurs twice in the last (multi-turn) one."""
    return [
        [1, 20, 21, 22, 7, 8, 9, 30, 31, 7],
        [1, 23, 7, 8, 9, 32, 7],
        [1, 24, 25, 7, 8, 9, 33, 34, 35, 36, 37, 7],
        [1, 26, 7, 8, 9, 38, 7, 10, 27, 7, 8, 9, 39, 40, 7],
    ]


@pytest.fixture(scope="module")
def model():
    return tiny_armorm(tiny_llama_config(vocab_size=64, pad_token_id=EOT), gating_token_pattern=PATTERN)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pad_id", [0, EOT])  # EOT: the pad id equals the end-of-turn id, as with Llama-3
def test_forward_equals_per_row_math_under_any_padding(model, side, pad_id):
    rows = conversations()
    expected = reference_armorm_outputs(model, rows, PATTERN)
    ids, mask = padded(rows, pad_id, side)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    for key, value in expected.items():
        torch.testing.assert_close(getattr(out, key), value, atol=1e-5, rtol=1e-5, msg=key)
    torch.testing.assert_close(out.logits[:, 0], out.score)
    torch.testing.assert_close((out.coefficients * out.rewards).sum(-1), out.score, atol=1e-5, rtol=1e-5)


def test_batch_of_one_and_no_mask(model):
    row = conversations()[2]
    expected = reference_armorm_outputs(model, [row], PATTERN)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([row]))
    torch.testing.assert_close(out.score, expected["score"], atol=1e-5, rtol=1e-5)


def test_softmax_is_over_objectives_and_includes_beta(model):
    with torch.no_grad():
        out = model(*padded(conversations(), 0, "right"))
    beta = model.gating.logit_scale.item()
    torch.testing.assert_close(out.gating_output.sum(-1), torch.full((4,), beta), atol=1e-5, rtol=1e-5)
    assert (out.gating_output > 0).all()


def test_gating_positions_override_and_inputs_embeds(model):
    rows = conversations()
    ids, mask = padded(rows, 0, "right")
    positions = torch.tensor([1, 1, 2, 3])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, gating_positions=positions)
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        embeds = model.get_input_embeddings()(ids)
        from_embeds = model(inputs_embeds=embeds, attention_mask=mask, gating_positions=positions)
    torch.testing.assert_close(out.prompt_embedding, hidden[torch.arange(4), positions])
    torch.testing.assert_close(from_embeds.score, out.score)
    with pytest.raises(ValueError, match="`gating_positions` is required with `inputs_embeds`"):
        model(inputs_embeds=embeds, attention_mask=mask)


def test_row_without_pattern_names_row_pattern_and_fix(model):
    rows = conversations()
    rows[2] = [1, 24, 25, 33, 34, 7]
    ids, mask = padded(rows, 0, "right")
    with pytest.raises(ValueError, match=r"Row\(s\) \[2\].*\[7, 8, 9\].*apply_chat_template.*gating_positions"):
        model(input_ids=ids, attention_mask=mask)


def test_pattern_in_padding_is_not_used(model):
    """A pattern made of pad tokens (pad == eot) must not be matched outside the real tokens."""
    rows = [[1, 24, 25, 33, 34, 7]]
    ids = torch.tensor([rows[0] + [7, 8, 9, 7]])
    mask = torch.tensor([[1] * 6 + [0] * 4])
    with pytest.raises(ValueError, match=r"Row\(s\) \[0\]"):
        model(input_ids=ids, attention_mask=mask)


def test_trl_keyword_arguments_are_accepted(model):
    ids, mask = padded(conversations(), 0, "left")
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask)
        extra = model(
            input_ids=ids,
            attention_mask=mask,
            use_cache=False,
            margin=torch.zeros(4),
            token_type_ids=torch.zeros_like(ids),
        )
    torch.testing.assert_close(plain.score, extra.score)


# --- Labels: transformers' regression loss of the one logit ---------------------------------------------------


@pytest.mark.parametrize("shape", ["(batch,)", "(batch, 1)"])
def test_labels_give_the_mean_squared_error_of_the_score(model, shape):
    """loss = (1/B) Σ_b (s_b − y_b)², with s from the independent per-row reference."""
    rows = conversations()
    expected_score = reference_armorm_outputs(model, rows, PATTERN)["score"]
    labels = torch.tensor([0.5, -1.0, 2.0, 0.0])
    ids, mask = padded(rows, EOT, "left")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels if shape == "(batch,)" else labels[:, None])
        without = model(input_ids=ids, attention_mask=mask, labels=None)
        as_tuple = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    torch.testing.assert_close(out.loss, ((expected_score - labels) ** 2).mean(), atol=1e-5, rtol=1e-5)
    assert out.loss.shape == () and without.loss is None
    torch.testing.assert_close(without.score, out.score)
    torch.testing.assert_close(as_tuple[0], out.loss)  # transformers' order: the loss first


def test_the_loss_trains_W_and_the_gating_but_not_T():
    """s = c · r = c · (W h) with c = g Tᵀ independent of W, so ∂loss/∂W = (2/B) Σ_b (s_b − y_b) c_b h_bᵀ."""
    model = tiny_armorm(tiny_llama_config(vocab_size=64, pad_token_id=EOT), gating_token_pattern=PATTERN).train()
    ids, mask = padded(conversations(), EOT, "right")
    labels = torch.tensor([0.5, -1.0, 2.0, 0.0])
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    residual = 2 * (out.score - labels).detach() / len(labels)  # (B,)
    expected = torch.einsum("b,bk,bd->kd", residual, out.coefficients.detach(), out.hidden_state.detach())
    torch.testing.assert_close(model.regression_layer.weight.grad, expected, atol=1e-5, rtol=1e-4)
    for name, parameter in model.gating.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert not model.reward_transform_matrix.requires_grad and model.reward_transform_matrix.grad is None


def test_labels_of_the_wrong_shape_or_problem_type_are_refused(model):
    ids, mask = padded(conversations(), EOT, "right")  # 4 rows
    for labels in (torch.zeros(2, 2), torch.zeros(4, 2), torch.zeros(3), torch.tensor(1.0)):
        with pytest.raises(ValueError, match=r"`labels` has shape .*one target score per row, of shape \(4,\)"):
            model(input_ids=ids, attention_mask=mask, labels=labels)
    config = ArmoRMConfig.from_dict(model.config.to_dict())
    config.problem_type = "single_label_classification"
    with pytest.raises(ValueError, match='set `config.problem_type = "regression"`'):
        ArmoRMForRewardModeling(config)(input_ids=ids, attention_mask=mask, labels=torch.zeros(4))


def test_missing_pattern_config_is_an_error():
    model = tiny_armorm(tiny_llama_config(vocab_size=64))
    with pytest.raises(ValueError, match="gating_token_pattern` is not set"):
        model(input_ids=torch.tensor([[1, 2, 3]]))


def test_fresh_model_initialises_T_to_identity_and_beta():
    config = ArmoRMConfig(text_config=tiny_llama_config(), num_objectives=5, gating_hidden_dim=8)
    model = ArmoRMForRewardModeling(config)
    torch.testing.assert_close(model.reward_transform_matrix, torch.eye(5))
    assert model.gating.logit_scale.item() == 100.0
    assert "reward_transform_matrix" in model.state_dict()
    assert "reward_transform_matrix" not in dict(model.named_parameters())


def test_save_load_same_outputs_and_T_stays_frozen(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, ArmoRMForRewardModeling)
    ids, mask = padded(conversations(), EOT, "right")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).score, model(ids, mask).score)
    torch.testing.assert_close(loaded.reward_transform_matrix, model.reward_transform_matrix)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert "reward_transform_matrix" not in trainable and "gating.logit_scale" in trainable
    # One pad id, read the same way by RewardBench (top level) and TRL (text config).
    assert loaded.config.pad_token_id == loaded.config.get_text_config().pad_token_id == EOT
    assert AutoModel.from_pretrained(tmp_path).__class__ is ArmoRMForRewardModeling


@pytest.mark.parametrize(
    "missing", ["reward_transform_matrix", "gating.logit_scale", "regression_layer.weight", "gating.layers.1.bias"]
)
def test_a_checkpoint_missing_a_head_tensor_fails_loudly(tmp_path, missing):
    """A checkpoint without one of the head tensors must not load: transformers would initialise it (T = I, a random
    W or gating layer, β = 100) and the model would score with made-up values. The error names the tensor."""
    from safetensors.torch import load_file, save_file

    tiny_armorm(tiny_llama_config(vocab_size=64), num_objectives=3).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights[missing]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(missing)):
        ArmoRMForRewardModeling.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=re.escape(missing)):
        AutoModelForSequenceClassification.from_pretrained(tmp_path)


def test_pad_token_id_has_one_home():
    config = ArmoRMConfig(text_config=tiny_llama_config(pad_token_id=3), num_objectives=2)
    assert config.pad_token_id == 3
    config.pad_token_id = 5  # what TRL does to the text config, and RewardBench reads at the top
    assert config.get_text_config().pad_token_id == 5
    config.get_text_config().pad_token_id = 6
    assert config.pad_token_id == 6
    assert config.to_dict()["pad_token_id"] == 6 and config.to_dict()["text_config"]["pad_token_id"] == 6
    assert config.num_labels == 1


def test_config_validation_and_auto_registration():
    with pytest.raises(ValueError, match="`objective_names` has 1 names"):
        ArmoRMConfig(text_config=tiny_llama_config(), num_objectives=2, objective_names=["a"])
    with pytest.raises(ValueError, match="`verbosity_objective`"):
        ArmoRMConfig(text_config=tiny_llama_config(), num_objectives=2, verbosity_objective=2)
    config = AutoConfig.for_model("armorm", text_config={"model_type": "qwen2", "hidden_size": 16}, num_objectives=2)
    assert isinstance(config, ArmoRMConfig) and config.text_config.model_type == "qwen2"


def test_other_backbone_families():
    """Any decoder `AutoModel` is a backbone: Qwen2 here, with its own config class."""
    text_config = AutoConfig.for_model(
        "qwen2", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, pad_token_id=0,
    )  # fmt: skip
    model = tiny_armorm(text_config, gating_token_pattern=PATTERN)
    expected = reference_armorm_outputs(model, conversations(), PATTERN)
    with torch.no_grad():
        out = model(*padded(conversations(), 0, "left"))
    torch.testing.assert_close(out.score, expected["score"], atol=1e-5, rtol=1e-5)


def test_attention_implementations_agree(model, tmp_path):
    model.save_pretrained(tmp_path)
    ids, mask = padded(conversations(), 0, "right")
    scores = {}
    for impl in ("eager", "sdpa"):
        loaded = ArmoRMForRewardModeling.from_pretrained(tmp_path, attn_implementation=impl).eval()
        assert loaded.model.config._attn_implementation == impl
        with torch.no_grad():
            scores[impl] = loaded(input_ids=ids, attention_mask=mask).score
    torch.testing.assert_close(scores["eager"], scores["sdpa"], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(model):
    ids, mask = padded(conversations(), 0, "right")
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(input_ids=ids, attention_mask=mask).score.sum().backward()
        grads.append(model.model.layers[0].mlp.up_proj.weight.grad.clone())
        model.gradient_checkpointing_disable()
    model.eval()
    torch.testing.assert_close(grads[0], grads[1])


def test_bfloat16_scores_close_to_float32(model, tmp_path):
    model.save_pretrained(tmp_path)
    bf16 = ArmoRMForRewardModeling.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    assert bf16.reward_transform_matrix.dtype == torch.float32  # λ keeps its precision
    ids, mask = padded(conversations(), EOT, "left")
    with torch.no_grad():
        low, full = bf16(input_ids=ids, attention_mask=mask).score, model(ids, mask).score
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full, atol=0.05 * full.abs().max().item(), rtol=0.05)


def test_heads_stay_float32_under_bf16_autocast(model):
    """Trainers (TRL, accelerate) run the forward under bf16 autocast; the heads must not drop to bf16."""
    ids, mask = padded(conversations(), 0, "right")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, attention_mask=mask)
    assert out.rewards.dtype == out.score.dtype == out.gating_output.dtype == torch.float32


# --- Gated objectives, the length objective, and inputs that must not be scored -----------------------------


def masked_gating(model, prompt_embedding: torch.Tensor, gated: list[int]) -> torch.Tensor:
    """β · softmax over the gated objectives only, 0 elsewhere, computed from the gating weights by hand."""
    x = prompt_embedding
    for layer in model.gating.layers[:-1]:
        x = torch.clamp(x @ layer.weight.T + layer.bias, min=0)
    logits = (x @ model.gating.layers[-1].weight.T + model.gating.layers[-1].bias) / model.config.gating_temperature
    g = torch.zeros_like(logits)
    e = torch.exp(logits[:, gated] - logits[:, gated].max(-1, keepdim=True).values)
    g[:, gated] = model.gating.logit_scale * e / e.sum(-1, keepdim=True)
    return g


def test_gated_objectives_mask_the_softmax(model, tmp_path):
    """Objectives outside `gated_objectives` get weight exactly 0; the others share β; the converted release (no
    list) keeps the softmax over all k."""
    torch.manual_seed(0)
    gated = tiny_armorm(
        tiny_llama_config(vocab_size=64, pad_token_id=EOT), gating_token_pattern=PATTERN, gated_objectives=[0, 2, 3]
    )
    ids, mask = padded(conversations(), 0, "right")
    with torch.no_grad():
        out = gated(input_ids=ids, attention_mask=mask)
        expected = masked_gating(gated, out.prompt_embedding, [0, 2, 3])
    assert (out.gating_output[:, 1] == 0).all()
    torch.testing.assert_close(out.gating_output, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close((out.coefficients * out.rewards).sum(-1), out.score, atol=1e-5, rtol=1e-5)
    gated.save_pretrained(tmp_path)
    reloaded = ArmoRMForRewardModeling.from_pretrained(tmp_path).eval()
    assert reloaded.config.gated_objectives == [0, 2, 3]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).score, out.score)
    assert (
        model.config.gated_objectives is None and (model(input_ids=ids, attention_mask=mask).gating_output > 0).all()
    )


def test_length_objective_is_the_log_of_the_answer_tokens():
    """r_len = log(1 + n), n = tokens after the gating position up to the last real token, under any padding."""
    model = tiny_armorm(
        tiny_llama_config(vocab_size=64, pad_token_id=EOT), gating_token_pattern=PATTERN, length_objective=2
    )
    rows = conversations()
    expected = reference_armorm_outputs(model, rows, PATTERN)["rewards"]
    for i, row in enumerate(rows):
        start = max(s for s in range(len(row) - 2) if row[s : s + 3] == PATTERN)
        expected[i, 2] = torch.log1p(torch.tensor(float(len(row) - 1 - start)))
    for side in ("right", "left"):
        with torch.no_grad():
            out = model(*padded(rows, EOT, side))
        torch.testing.assert_close(out.rewards, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close((out.coefficients * out.rewards).sum(-1), out.score, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"gating_temperature": 0.0}, "`gating_temperature` must be > 0"),
        ({"gating_temperature": -1.0}, "`gating_temperature` must be > 0"),
        ({"gating_token_pattern": [7, 8, 9], "gating_token_offset": 3}, "reads past the prompt"),
        ({"gating_token_pattern": [7, 800, 9]}, r"ids \[800\] outside the backbone's vocabulary"),
        ({"gated_objectives": [0, 0]}, "`gated_objectives`"),
        ({"gated_objectives": [5]}, "`gated_objectives`"),
        ({"gated_objectives": []}, "`gated_objectives`"),
        ({"length_objective": 4}, "`length_objective`"),
    ],
)
def test_invalid_config_values_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ArmoRMConfig(text_config=tiny_llama_config(vocab_size=64), num_objectives=4, **kwargs)


def test_inputs_that_would_be_mis_scored_are_refused(model):
    rows = conversations()
    ids, mask = padded(rows, EOT, "right")
    with pytest.raises(ValueError, match=r"outside the real tokens"):
        model(input_ids=ids, attention_mask=mask, gating_positions=torch.tensor([1, 1, 40, 1]))
    with pytest.raises(ValueError, match=r"outside the real tokens"):
        model(input_ids=ids, attention_mask=mask, gating_positions=torch.tensor([1, -1, 1, 1]))
    with pytest.raises(ValueError, match="one position per row"):
        model(input_ids=ids, attention_mask=mask, gating_positions=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="empty"):
        model(input_ids=torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"Row\(s\) \[0, 1, 2\] of the batch look padded.*attention_mask"):
        model(input_ids=ids)  # right padding with pad == eot, no mask
    with pytest.raises(ValueError, match=r"look padded"):
        model(input_ids=padded(rows, EOT, "left")[0])
    with pytest.raises(ValueError, match=r"Row\(s\) \[1\] have no real token"):
        model(input_ids=ids, attention_mask=mask * torch.tensor([[1], [0], [1], [1]]))
    long_row = torch.tensor([[1] * 4095 + PATTERN + [5, EOT]])
    with pytest.raises(ValueError, match=r"`max_position_embeddings` \(4096\)"):
        model(input_ids=long_row)


# ---------------------------------------------------------------------------------------------------------------
# Raw token ids that are not one prompt and one answer (the path of TRL's `reward_funcs=[model]`)

USER, ASSISTANT, TOOL = [8, 10], [8, 9], [8, 11]  # role headers in the tiny vocabulary: <header>user, ...
HEADERS = {"user": USER, "assistant": ASSISTANT, "tool": TOOL}
PROMPT = [1, *USER, 20, EOT, *ASSISTANT]  # <bos><header>user ... <eot><header>assistant


@pytest.fixture(scope="module")
def guarded_model():
    return tiny_armorm(
        tiny_llama_config(vocab_size=64, pad_token_id=EOT), gating_token_pattern=PATTERN, turn_header_patterns=HEADERS
    )


def test_raw_tokens_of_one_prompt_and_one_answer_are_scored(guarded_model, model):
    """One turn and several: the gating position and the score are the unguarded model's (same weights)."""
    rows = [PROMPT + [30, EOT], PROMPT + [30, EOT, *USER, 21, EOT, *ASSISTANT, 31, 32, EOT]]
    ids, mask = padded(rows, EOT, "right")
    with torch.no_grad():
        guarded = guarded_model(input_ids=ids, attention_mask=mask)
        expected = reference_armorm_outputs(guarded_model, rows, PATTERN)
    torch.testing.assert_close(guarded.score, expected["score"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "row, reason",
    [
        (PROMPT + [30, EOT, *USER, 21, EOT], "user or tool header after"),  # [user, assistant, user]
        (PROMPT + [30, EOT, *TOOL, 21, EOT], "user or tool header after"),  # a tool turn after the answer
        (PROMPT + [30, EOT, *ASSISTANT, 31, EOT], "second assistant header"),  # the answer writes the header
        (PROMPT + [30, *ASSISTANT, 31, EOT], "second assistant header"),  # ... even without the end of turn
    ],
)
def test_raw_tokens_that_are_not_one_prompt_and_one_answer_are_refused(guarded_model, model, row, reason):
    """Today `apply_chat_template([user, assistant, user])` is scored (h_x inside the first answer), and a completion
    that writes `<eot><header>assistant` moves h_x into itself. Both are refused, naming the row and the fix; a
    config without `turn_header_patterns` keeps scoring them (the checkpoints made before)."""
    rows = [PROMPT + [30, EOT], row]
    ids, mask = padded(rows, EOT, "left")
    with pytest.raises(ValueError, match=rf"Row\(s\) \[1\].*{reason}.*ArmoRMReward"):
        guarded_model(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, attention_mask=mask).score).all()


def test_turn_header_patterns_are_validated():
    with pytest.raises(ValueError, match=r"`turn_header_patterns`.*\[8, 800\]"):
        ArmoRMConfig(text_config=tiny_llama_config(vocab_size=64), turn_header_patterns={"user": [8, 800]})
    with pytest.raises(ValueError, match=r"`turn_header_patterns`.*'robot'"):
        ArmoRMConfig(text_config=tiny_llama_config(vocab_size=64), turn_header_patterns={"robot": [8]})
    with pytest.raises(ValueError, match=r"`turn_header_patterns`.*'user'"):
        ArmoRMConfig(text_config=tiny_llama_config(vocab_size=64), turn_header_patterns={"user": []})


# ---------------------------------------------------------------------------------------------------------------
# Non-finite numbers are never a reward; a checkpoint holds exactly the model's tensors


@pytest.mark.parametrize(
    "key, value",
    [("gating_temperature", float("inf")), ("gating_temperature", float("nan")),
     ("gating_logit_scale_init", float("inf")), ("gating_token_offset", -1)],
)  # fmt: skip
def test_a_checkpoint_with_a_non_finite_or_negative_config_value_is_refused(tmp_path, key, value):
    import json

    tiny_armorm(tiny_llama_config(vocab_size=64), num_objectives=3, gating_token_pattern=PATTERN).save_pretrained(
        tmp_path
    )
    config = json.loads((tmp_path / "config.json").read_text())
    config[key] = value  # written as JSON's `Infinity` / `NaN`, which Python's json reads back
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"`{key}`"):
        ArmoRMForRewardModeling.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["regression_layer.weight", "reward_transform_matrix", "gating.logit_scale",
                                  "gating.layers.0.weight", "gating.layers.3.bias"])  # fmt: skip
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_checkpoint_with_a_non_finite_head_tensor_is_refused(tmp_path, name, value):
    from safetensors.torch import load_file, save_file

    tiny_armorm(tiny_llama_config(vocab_size=64), num_objectives=3).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights[name].view(-1)[0] = value
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{re.escape(name)}.*non-finite"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path)


def test_a_checkpoint_with_unexpected_tensors_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_armorm(tiny_llama_config(vocab_size=64), num_objectives=3).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["score.weight"] = torch.zeros(1, 16)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"\['score.weight'\].*armorm assemble"):
        ArmoRMForRewardModeling.from_pretrained(tmp_path)


def nan_backbone_model():
    """A model whose backbone turns token 33 into NaN (an overflow stands for it): the heads are finite, so it loads,
    and only the rows holding token 33 score NaN."""
    guarded = tiny_armorm(tiny_llama_config(vocab_size=64, pad_token_id=EOT), gating_token_pattern=PATTERN)
    with torch.no_grad():
        guarded.get_input_embeddings().weight[33] = float("nan")
    return guarded


def test_a_non_finite_score_is_an_error_naming_the_row():
    from modeling_armorm.modeling_armorm import NonFiniteScoreError
    from modeling_armorm.scoring import EncodedConversation, score_encoded

    nan_model = nan_backbone_model()
    rows = conversations()  # row 2 holds token 33
    ids, mask = padded(rows, EOT, "right")
    with pytest.raises(NonFiniteScoreError, match=r"Row\(s\) \[2\] of the batch.*non-finite"):
        nan_model(input_ids=ids, attention_mask=mask)
    # The scoring path names the caller's row, whatever order its length-sorted batches ran in.
    encoded = [EncodedConversation(row, row.index(9) - 2, row.index(9) + 1) for row in rows]
    with pytest.raises(NonFiniteScoreError, match=r"[Cc]onversation\(s\) \[2\]"):
        score_encoded(nan_model, encoded, batch_size=2, pad_id=EOT)
    assert issubclass(NonFiniteScoreError, RuntimeError)  # a model fault, not the caller's (a server's 500)
