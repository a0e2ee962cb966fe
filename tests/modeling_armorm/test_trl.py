"""ArmoRM inside TRL's real trainers, on CPU, with tiny random models and the real SmolLM2 ChatML tokenizer.

The reference for every reward is computed here, one conversation at a time and without padding: the conversation
rendered with the tokenizer's chat template, and the gating position chosen by the template's meaning (the
`<|im_end|>` that closes the prompt's last message), passed to the model explicitly.
"""

import builtins
import copy
import pickle
import urllib.request
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, LlamaForCausalLM

from modeling_armorm import ArmoRMConfig, ArmoRMForRewardModeling
from modeling_armorm.trl_reward import ArmoRMReward
from tests.serving_utils import sensitive_gating
from tests.utils import BackboneForwards, spy_on_shared_prefixes, tiny_armorm, tiny_llama_config


trl = pytest.importorskip("trl")

OBJECTIVES = ["helpfulness", "correctness", "coherence", "verbosity"]
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime number."}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about reward models."},
    ],
    [{"role": "user", "content": "2 + 2 = ?"}],
]
ANSWERS = ["Paris.", "Seven is prime, and so is eleven.", "Why did the gate open? It was softmax.", "4"]
# fp32 throughout: TRL turns bf16 autocast on by default, which would blur the comparison with the reference.
COMMON = dict(
    report_to="none",
    use_cpu=True,
    bf16=False,
    save_strategy="no",
    logging_steps=1,
    learning_rate=1e-2,
    seed=0,
    gradient_checkpointing=False,
)


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer_dir):
    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def reward_model(tok):
    text_config = tiny_llama_config(vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    model = tiny_armorm(text_config, num_objectives=len(OBJECTIVES), tokenizer=tok, objective_names=OBJECTIVES)
    model.config._name_or_path = "tiny-armorm"  # TRL names a reward model's log entries after it
    return model


@pytest.fixture(scope="module")
def checkpoint(reward_model, tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_armorm")
    reward_model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def tiny_policy(tok) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = tiny_llama_config(
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None
    )
    return LlamaForCausalLM(config)


def as_messages(prompt, completion) -> list[dict]:
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    completion = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
    return prompt + completion


@torch.no_grad()
def reference_score(model, tok, prompt, completion) -> torch.Tensor:
    """ArmoRM's output for one conversation, unpadded, with the gating position taken from the template."""
    messages = as_messages(prompt, completion)
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    prompt_ids = tok.apply_chat_template(messages[:-1], tokenize=True, return_dict=True)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    gate = max(i for i, t in enumerate(prompt_ids) if t == end_of_turn)  # the prompt's last `<|im_end|>`
    was_training = model.training
    model.eval()
    output = model(torch.tensor([ids]), gating_positions=torch.tensor([gate]))
    model.train(was_training)
    return output


def reference_scores(model, tok, prompts, completions) -> list[float]:
    return [reference_score(model, tok, p, c).score.item() for p, c in zip(prompts, completions)]


def prompt_groups(tok, prompts, completions) -> list[list[tuple[int, ...]]]:
    """The conversations of each prompt given more than once, as `apply_chat_template` tokenizes them (sorted): the
    groups the shared-prefix path should run (`spy_on_shared_prefixes`)."""
    by_prompt = {}
    for prompt, completion in zip(prompts, completions):
        ids = tok.apply_chat_template(as_messages(prompt, completion), tokenize=True)["input_ids"]
        by_prompt.setdefault(repr(prompt), []).append(tuple(ids))
    return sorted(sorted(rows) for rows in by_prompt.values() if len(rows) > 1)


def logged_rewards(trainer, name):
    """What the trainer scored in its last generation batch: prompts, completions and the rewards of `name`."""
    return list(trainer._logs["prompt"]), list(trainer._logs["completion"]), list(trainer._logs["rewards"][name])


# --- ArmoRMReward on its own -------------------------------------------------------------------------------------


def test_callable_scores_the_templated_conversation(reward_model, tok):
    reward = ArmoRMReward(reward_model, batch_size=3, tokenizer=tok)
    completions = [[{"role": "assistant", "content": a}] for a in ANSWERS]
    expected = reference_scores(reward_model, tok, PROMPTS, completions)
    torch.testing.assert_close(torch.tensor(reward(PROMPTS, completions)), torch.tensor(expected))
    # A plain-string completion after a conversational prompt is the assistant's answer too.
    torch.testing.assert_close(torch.tensor(reward(PROMPTS, ANSWERS)), torch.tensor(expected))


def test_callable_renders_plain_text_prompts(reward_model, tok):
    reward = ArmoRMReward(reward_model, tokenizer=tok)
    prompts = ["What is the capital of France?", "Name a prime number.", "2 + 2 = ?"]
    answers = ["Paris.", "Seven.", "4"]
    expected = reference_scores(reward_model, tok, prompts, answers)  # rendered as a user turn + assistant answer
    torch.testing.assert_close(torch.tensor(reward(prompts, answers)), torch.tensor(expected))
    # A plain prompt is the user's text whatever it holds: one written in the template's markup (rendered already, or
    # a user asking about ChatML) is a user turn too, its markup kept as text, and no row fails the batch.
    rendered = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    as_user_turns = reward([[{"role": "user", "content": p}] for p in rendered], answers)
    torch.testing.assert_close(torch.tensor(reward(rendered, answers)), torch.tensor(as_user_turns))
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    headers = reward.encode("Hi", "Hello.").input_ids.count(im_start)  # the template's own turns only
    assert all(reward.encode(p, a).input_ids.count(im_start) == headers for p, a in zip(rendered, answers))
    # Without the template the pattern is absent: the model raises instead of scoring at a wrong position.
    ids = tok([p + a for p, a in zip(prompts, answers)], add_special_tokens=False, padding=True, return_tensors="pt")
    with pytest.raises(ValueError, match="gating pattern"):
        reward_model(**ids)


@pytest.mark.parametrize("conversational", [True, False])
def test_a_grpo_batch_runs_each_prompt_once(reward_model, tok, monkeypatch, conversational):
    """GRPO passes each prompt `num_generations` times in a row: the completions to one prompt are scored together
    through the shared-prefix path (conversational and plain-text prompts alike), and each reward equals the
    conversation scored alone (`reference_score`). The gate depends strongly on h_x here, so an h_x read at a wrong
    position shows."""
    model = copy.deepcopy(reward_model)
    sensitive_gating(model, seed=1)
    groups = spy_on_shared_prefixes(monkeypatch)
    num_generations = 4
    unique = PROMPTS[:3] if conversational else ["What is the capital of France?", "Name a prime number."]
    prompts = [prompt for prompt in unique for _ in range(num_generations)]
    # Completions of several lengths, one written twice (a policy repeats itself).
    completions = [ANSWERS[(i + j) % len(ANSWERS)] for i in range(len(unique)) for j in (0, 1, 2, 2)]
    if conversational:
        completions = [[{"role": "assistant", "content": c}] for c in completions]
    rewards = ArmoRMReward(model, batch_size=3, tokenizer=tok)(prompts, completions)
    assert sorted(groups) == prompt_groups(tok, prompts, completions) and len(groups) == len(unique)
    expected = reference_scores(model, tok, prompts, completions)
    torch.testing.assert_close(torch.tensor(rewards), torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_callable_objectives_and_logging(reward_model, tok):
    completions = ANSWERS
    outputs = [reference_score(reward_model, tok, p, c) for p, c in zip(PROMPTS, completions)]
    rewards = torch.cat([o.rewards for o in outputs])  # (n, k)
    gating = torch.cat([o.gating_output for o in outputs])

    single = ArmoRMReward(reward_model, objectives=["correctness"], tokenizer=tok)
    subset = ArmoRMReward(reward_model, objectives=["helpfulness", 2], tokenizer=tok)
    # Named from the objectives as given (TRL reads `__name__` when it builds the trainer, before any call).
    assert single.__name__ == "armorm[correctness]" and subset.__name__ == "armorm[helpfulness+2]"
    torch.testing.assert_close(torch.tensor(single(PROMPTS, completions)), rewards[:, 1])
    torch.testing.assert_close(torch.tensor(subset(PROMPTS, completions)), rewards[:, 0] + rewards[:, 2])

    metrics, extra = {}, {}
    ArmoRMReward(reward_model, tokenizer=tok)(
        PROMPTS, completions, log_metric=metrics.__setitem__, log_extra=extra.__setitem__, trainer_state=None
    )
    for i, name in enumerate(OBJECTIVES):
        assert metrics[f"armorm/rewards/{name}"] == pytest.approx(rewards[:, i].mean().item(), rel=1e-4)
        share = gating[:, i] / gating.sum(-1)
        assert metrics[f"armorm/gating/{name}"] == pytest.approx(share.mean().item(), rel=1e-4)
    contributions = (gating @ reward_model.reward_transform_matrix.T) * rewards
    assert extra["armorm/top_objective"] == [OBJECTIVES[i] for i in contributions.abs().argmax(-1)]

    unknown = ArmoRMReward(reward_model, objectives=["honesty"], tokenizer=tok)  # checked on the first call
    with pytest.raises(ValueError, match=r"Unknown objective 'honesty' in `objectives`; choose names among \['help"):
        unknown(PROMPTS, completions)
    with pytest.raises(ValueError, match="`objectives` is empty"):
        ArmoRMReward(reward_model, objectives=[], tokenizer=tok)


def test_normalize_returns_the_score_minus_the_reference_mean_over_the_std(reward_model, tok):
    """z = (s − mean) / std of the per-row score with the config's statistics; the logged rewards stay raw; a
    checkpoint without statistics refuses on the first call, and `objectives` (raw rewards) at construction."""
    scaled = copy.deepcopy(reward_model)
    scaled.config.score_statistics = {"count": 8, "mean": -0.3, "std": 0.25}
    expected = torch.tensor(reference_scores(reward_model, tok, PROMPTS, ANSWERS))
    metrics = {}
    reward = ArmoRMReward(scaled, tokenizer=tok, normalize=True)
    normalized = reward(PROMPTS, ANSWERS, log_metric=metrics.__setitem__)
    torch.testing.assert_close(torch.tensor(normalized), (expected + 0.3) / 0.25)
    raw = {}
    ArmoRMReward(reward_model, tokenizer=tok)(PROMPTS, ANSWERS, log_metric=raw.__setitem__)
    assert metrics == pytest.approx(raw)
    assert "normalize=True" in repr(reward)

    with pytest.raises(ValueError, match=r"records no score statistics.*score_statistics\(scores\)"):
        ArmoRMReward(reward_model, tokenizer=tok, normalize=True)(PROMPTS, ANSWERS)
    with pytest.raises(ValueError, match="`normalize` applies to the gated score"):
        ArmoRMReward(scaled, objectives=["correctness"], tokenizer=tok, normalize=True)


def test_callable_pickles_without_weights_and_reloads(reward_model, tok, checkpoint):
    reward = ArmoRMReward(Path(checkpoint), batch_size=2, device="cpu")
    first = reward(PROMPTS, ANSWERS)  # loads the model
    payload = pickle.dumps(reward)
    assert len(payload) < 10_000  # the path travels, not the weights
    clone = pickle.loads(payload)
    assert clone._model is None and clone.__name__ == "armorm"
    torch.testing.assert_close(torch.tensor(clone(PROMPTS, ANSWERS)), torch.tensor(first))
    torch.testing.assert_close(
        torch.tensor(first), torch.tensor(reference_scores(reward_model, tok, PROMPTS, ANSWERS))
    )
    # A model object pickles by value.
    by_value = pickle.loads(pickle.dumps(ArmoRMReward(reward_model, tokenizer=tok)))
    torch.testing.assert_close(torch.tensor(by_value(PROMPTS, ANSWERS)), torch.tensor(first))


def test_max_batch_tokens_bounds_every_forward(reward_model, tok):
    """`max_batch_tokens` reaches the batching of both calls (`__call__` and `score`): every forward of several rows
    holds at most that many padded tokens, more forwards of fewer rows run, and every reward is unchanged."""
    completions = [[{"role": "assistant", "content": a}] for a in ANSWERS]
    expected = torch.tensor(reference_scores(reward_model, tok, PROMPTS, completions))
    rows_only = ArmoRMReward(reward_model, batch_size=8, tokenizer=tok)
    budget = 2 * max(len(rows_only.encode(p, c)) for p, c in zip(PROMPTS, completions))  # two of the longest
    with BackboneForwards(reward_model.model) as by_rows:
        rows_only(PROMPTS, completions)
    assert by_rows.over(budget)

    reward = ArmoRMReward(reward_model, batch_size=8, tokenizer=tok, max_batch_tokens=budget)
    assert f"max_batch_tokens={budget}" in repr(reward)
    assert pickle.loads(pickle.dumps(reward)).max_batch_tokens == budget
    with BackboneForwards(reward_model.model) as forwards:
        torch.testing.assert_close(torch.tensor(reward(PROMPTS, completions)), expected)
        torch.testing.assert_close(reward.score(PROMPTS, completions).score, expected)
    assert forwards and not forwards.over(budget) and len(forwards) > 2 * len(by_rows)
    with pytest.raises(ValueError, match="`max_batch_tokens` must be at least 1"):
        ArmoRMReward(reward_model, max_batch_tokens=0)


def test_construction_does_no_io_and_the_first_call_fails_clearly(monkeypatch):
    """Building the function, naming it (TRL reads `__name__` when it builds the trainer) and pickling it send no
    request and read no file; the first call reads the server or the checkpoint and fails there, naming the fix."""

    def no_io(*args, **kwargs):
        raise AssertionError(f"I/O while building the reward function: {args}")

    with monkeypatch.context() as patch:
        for owner, name in [
            (urllib.request, "urlopen"),
            (builtins, "open"),
            (ArmoRMConfig, "from_pretrained"),
            (ArmoRMForRewardModeling, "from_pretrained"),
            (AutoTokenizer, "from_pretrained"),
        ]:
            patch.setattr(owner, name, no_io)
        remote = ArmoRMReward(url="http://127.0.0.1:9", objectives=["safety"], timeout=5)
        local = ArmoRMReward("/nonexistent/abs/path", objectives=["safety", 3])
        assert (remote.__name__, local.__name__) == ("armorm[safety]", "armorm[safety+3]")
        remote, local = pickle.loads(pickle.dumps(remote)), pickle.loads(pickle.dumps(local))
    with pytest.raises(ConnectionError, match=r"reward server at http://127.0.0.1:9/info .*`armorm serve --model"):
        remote(["Hi"], ["Hello"])
    with pytest.raises(OSError, match="/nonexistent/abs/path"):
        local(["Hi"], ["Hello"])


# --- Online trainers ---------------------------------------------------------------------------------------------


def conversational_prompts() -> Dataset:
    return Dataset.from_dict({"prompt": PROMPTS})


def grpo_args(tmp_path, **kwargs):
    return trl.GRPOConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, num_generations=2,
        max_completion_length=4, **COMMON, **kwargs,
    )  # fmt: skip


def test_grpo_with_model_object_and_callable(reward_model, tok, tmp_path, monkeypatch):
    """Both TRL paths (the model as reward model, and the callable) give the reference reward of each completion, and
    TRL's `reward_weights` combine them (docs/trl.md). The callable scores each prompt's generations together, through
    the shared-prefix path."""
    callable_reward = ArmoRMReward(reward_model, tokenizer=tok)
    trainer = trl.GRPOTrainer(
        model=tiny_policy(tok),
        reward_funcs=[reward_model, callable_reward],
        args=grpo_args(tmp_path, reward_weights=[1.0, 0.5]),
        train_dataset=conversational_prompts(),
        processing_class=tok,
        reward_processing_classes=[tok, None],
    )
    groups = spy_on_shared_prefixes(monkeypatch)
    trainer.train()
    prompts, completions, from_model = logged_rewards(trainer, "tiny-armorm")
    _, _, from_callable = logged_rewards(trainer, "armorm")
    assert groups and sorted(groups) == prompt_groups(tok, prompts, completions)
    expected = reference_scores(reward_model, tok, prompts, completions)
    torch.testing.assert_close(torch.tensor(from_model), torch.tensor(expected), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(from_callable), torch.tensor(expected), rtol=1e-4, atol=1e-5)
    logged = trainer.state.log_history[0]
    weighted = [1.0 * a + 0.5 * b for a, b in zip(from_model, from_callable)]
    assert logged["reward"] == pytest.approx(sum(weighted) / len(weighted), rel=1e-4, abs=1e-5)
    for name in OBJECTIVES:
        assert f"armorm/rewards/{name}" in logged and f"armorm/gating/{name}" in logged
    assert sum(logged[f"armorm/gating/{name}"] for name in OBJECTIVES) == pytest.approx(1.0, abs=1e-4)


def test_grpo_with_checkpoint_path(reward_model, tok, checkpoint, tmp_path):
    """A path loads through `AutoModelForSequenceClassification` and scores like the model it was saved from."""
    args = grpo_args(tmp_path, model_init_kwargs={"trust_remote_code": True})
    trainer = trl.GRPOTrainer(
        model=tiny_policy(tok), reward_funcs=[checkpoint], args=args, train_dataset=conversational_prompts(),
        processing_class=tok,
    )  # fmt: skip
    assert type(trainer.reward_funcs[0]).__name__ == ArmoRMForRewardModeling.__name__
    trainer.train()
    name = checkpoint.rstrip("/").split("/")[-1]
    prompts, completions, rewards = logged_rewards(trainer, name)
    expected = reference_scores(reward_model, tok, prompts, completions)
    torch.testing.assert_close(torch.tensor(rewards), torch.tensor(expected), rtol=1e-4, atol=1e-5)


def test_grpo_plain_text_prompts(reward_model, tok, tmp_path):
    """Plain prompts: the callable templates them; the model path raises (TRL concatenates text untemplated)."""
    dataset = Dataset.from_dict({"prompt": ["What is the capital of France?", "Name a prime number."] * 2})
    reward = ArmoRMReward(reward_model, objectives=["correctness"], tokenizer=tok)
    trainer = trl.GRPOTrainer(
        model=tiny_policy(tok), reward_funcs=reward, args=grpo_args(tmp_path), train_dataset=dataset,
        processing_class=tok,
    )  # fmt: skip
    trainer.train()
    prompts, completions, rewards = logged_rewards(trainer, "armorm[correctness]")
    expected = [reference_score(reward_model, tok, p, c).rewards[0, 1].item() for p, c in zip(prompts, completions)]
    torch.testing.assert_close(torch.tensor(rewards), torch.tensor(expected), rtol=1e-4, atol=1e-5)
    assert "armorm[correctness]/rewards/verbosity" in trainer.state.log_history[0]

    trainer = trl.GRPOTrainer(
        model=tiny_policy(tok), reward_funcs=reward_model, args=grpo_args(tmp_path), train_dataset=dataset,
        processing_class=tok, reward_processing_classes=tok,
    )  # fmt: skip
    with pytest.raises(ValueError, match="gating pattern"):
        trainer.train()


def test_rloo_with_model_object(reward_model, tok, tmp_path):
    args = trl.RLOOConfig(  # beta=0: no reference copy of the policy (it would be reloaded from a path)
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, num_generations=2,
        max_completion_length=4, beta=0.0, **COMMON,
    )  # fmt: skip
    trainer = trl.RLOOTrainer(
        model=tiny_policy(tok), reward_funcs=reward_model, args=args, train_dataset=conversational_prompts(),
        processing_class=tok, reward_processing_classes=tok,
    )  # fmt: skip
    trainer.train()
    prompts, completions, rewards = logged_rewards(trainer, "tiny-armorm")
    expected = reference_scores(reward_model, tok, prompts, completions)
    torch.testing.assert_close(torch.tensor(rewards), torch.tensor(expected), rtol=1e-4, atol=1e-5)


def test_online_dpo_with_model_object(reward_model, tok, tmp_path):
    """OnlineDPO keeps no per-completion log: record the reward model's calls and re-score every real row."""
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    calls = []
    hook = reward_model.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((kwargs["input_ids"], kwargs["attention_mask"], output)),
        with_kwargs=True,
    )
    args = OnlineDPOConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, max_new_tokens=4, **COMMON
    )
    trainer = OnlineDPOTrainer(
        model=tiny_policy(tok), reward_funcs=reward_model, args=args, train_dataset=conversational_prompts(),
        processing_class=tok, reward_processing_classes=tok,
    )  # fmt: skip
    try:
        trainer.train()
    finally:
        hook.remove()
    assert calls, "OnlineDPO never called the reward model"
    rendered_prompts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in PROMPTS]
    for input_ids, attention_mask, output in calls:
        for row in range(input_ids.shape[0]):
            text = tok.decode(input_ids[row][attention_mask[row].bool()])
            prompt = next(p for p in PROMPTS if text.startswith(rendered_prompts[PROMPTS.index(p)]))
            answer = text[len(rendered_prompts[PROMPTS.index(prompt)]) :].removesuffix("<|im_end|>\n")
            expected = reference_score(reward_model, tok, prompt, answer).score
            torch.testing.assert_close(output.logits[row, 0], expected[0], rtol=1e-4, atol=1e-5)


# --- RewardTrainer -----------------------------------------------------------------------------------------------


def preference_dataset() -> Dataset:
    return Dataset.from_dict(
        {
            "chosen": [as_messages(p, a) for p, a in zip(PROMPTS, ANSWERS)],
            "rejected": [as_messages(p, "I don't know.") for p in PROMPTS],
        }
    )


def reward_args(tmp_path):
    return trl.RewardConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, **COMMON)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_reward_trainer_trains_the_heads(reward_model, tok, tmp_path):
    """Backbone frozen by the user: W and the gating network move, the backbone and T stay."""
    model = tiny_armorm(reward_model.config.text_config, num_objectives=len(OBJECTIVES), tokenizer=tok).train()
    model.model.requires_grad_(False)
    before = snapshot(model)
    trainer = trl.RewardTrainer(model=model, args=reward_args(tmp_path), train_dataset=preference_dataset(),
                                processing_class=tok)  # fmt: skip
    trainer.train()
    after = snapshot(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    heads = {name for name, p in model.named_parameters() if not name.startswith("model.")}
    assert heads == changed, f"heads {sorted(heads)} but changed {sorted(changed)}"
    assert "reward_transform_matrix" not in changed


def test_reward_trainer_with_peft(reward_model, tok, tmp_path):
    """LoRA on the backbone, the heads trained in full through `modules_to_save`; T never moves."""
    peft = pytest.importorskip("peft")
    model = tiny_armorm(reward_model.config.text_config, num_objectives=len(OBJECTIVES), tokenizer=tok).train()
    transform = model.reward_transform_matrix.clone()
    peft_config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["regression_layer", "gating"],
        task_type="SEQ_CLS",
    )
    trainer = trl.RewardTrainer(model=model, args=reward_args(tmp_path), train_dataset=preference_dataset(),
                                processing_class=tok, peft_config=peft_config)  # fmt: skip
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any("modules_to_save" in n and "gating" in n for n in trainable)
    assert not any("reward_transform_matrix" in n for n in trainable)
    trainer.train()
    params = dict(trainer.model.named_parameters())
    # Two steps: LoRA's B leaves zero on the first, A moves on the second (its gradient is zero while B is).
    moved = {n for n, before in trainable.items() if not torch.equal(before, params[n].detach())}
    assert moved == set(trainable), f"did not move: {sorted(set(trainable) - moved)}"
    torch.testing.assert_close(trainer.model.base_model.model.reward_transform_matrix, transform, rtol=0, atol=0)


def test_a_non_finite_reward_is_an_error_naming_the_completion(tok, monkeypatch):
    """TRL `nansum`s a NaN reward to 0 without a word: `ArmoRMReward` raises instead, locally and through a server."""
    from modeling_armorm import NonFiniteScoreError, trl_reward

    model = tiny_armorm(tiny_llama_config(vocab_size=len(tok), pad_token_id=tok.pad_token_id), tokenizer=tok)
    paris = tok("Paris", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        model.get_input_embeddings().weight[paris] = float("inf")  # an overflow in the answer "Paris." only
    with pytest.raises(NonFiniteScoreError, match=r"[Cc]onversation\(s\) \[0\]"):
        ArmoRMReward(model, tokenizer=tok)(PROMPTS, ANSWERS)

    def server(url, payload, timeout):  # an `armorm serve` that answers NaN for the second row
        if url.endswith("/info"):
            return {"objective_names": ["a", "b"]}
        n = len(payload["completions"])
        rows = [[0.5, 0.5]] * n
        return {
            "scores": [1.0, float("nan")] + [1.0] * (n - 2),
            "rewards": rows,
            "gating_output": rows,
            "coefficients": rows,
        }

    monkeypatch.setattr(trl_reward, "_request_json", server)
    with pytest.raises(NonFiniteScoreError, match=r"completion\(s\) \[1\]"):
        ArmoRMReward(url="http://reward-host:8000")(PROMPTS, ANSWERS)
