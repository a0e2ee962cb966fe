"""`token_cut`: a prompt's tokens, then the tokens of the text from its cut on, are the whole conversation's tokens.

The property is checked against the tokenizer itself (the whole text tokenized at once), for many random prompts and
continuations that start with what merges across a boundary (whitespace, newlines, markup, special tokens' texts), on
real tokenizers (Llama-3, SmolLM2's ChatML) and on tokenizers built here for the cases that could break a cut: a
SentencePiece-style `Metaspace` pre-tokenizer that adds `▁` to the first piece only, and an added token that a prompt's
end and an answer's start would spell together.
"""

import random

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from modeling_armorm.scoring import ChatEncoder
from modeling_armorm.token_cut import TokenCuts
from tests.utils import llama3_tokenizer


GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
# Spelled by the generation prompt's end ("\n<start_of_turn>model\n") and an answer that starts with "Yes".
ACROSS = "\n<start_of_turn>model\nYes"
CORPUS = ["Armorm prompt probe and answer probe.", "model user system assistant", "Hello there, how are you? Yes."]
PIECES = [
    "\n", "\n\n", " ", "  ", "\t", "\r\n", " \n", "Hello", "world", " the", "Yes", "yes,", "'s", "123", "4567", "é",
    "💥", "```python\n", "<|", "|>", "<", ">", "model", "assistant", ".", "!!", "▁", "<|eot_id|>", "<|im_end|>",
    "<|im_start|>assistant\n", "<end_of_turn>", "<start_of_turn>model\n", "[/INST]", "</s>", ACROSS,
]  # fmt: skip


def trained(special: list[str], template: str, pre_tokenizer: str = "byte_level", **named) -> PreTrainedTokenizerFast:
    """A small BPE trained here, with byte-level or SentencePiece-style (`Metaspace`, `▁` on the first piece only)
    pre-tokenization."""
    backend = Tokenizer(models.BPE(unk_token="<unk>" if pre_tokenizer == "metaspace" else None))
    if pre_tokenizer == "metaspace":
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        backend.decoder = decoders.Metaspace(prepend_scheme="first")
        alphabet = sorted(set("".join(CORPUS + PIECES + ["▁"])))
        special = ["<unk>", *special]
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special, initial_alphabet=alphabet)
    backend.train_from_iterator(CORPUS * 10, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **named)
    tokenizer.chat_template = template
    return tokenizer


def gemma(pre_tokenizer: str = "byte_level", extra: tuple = ()) -> PreTrainedTokenizerFast:
    special = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", *extra]
    return trained(special, GEMMA_TEMPLATE, pre_tokenizer, bos_token="<bos>", eos_token="<eos>")


def mistral() -> PreTrainedTokenizerFast:
    special = ["<s>", "</s>", "[INST]", "[/INST]"]
    return trained(special, MISTRAL_TEMPLATE, bos_token="<s>", eos_token="</s>")


def with_non_special_added_token(tokenizer):
    tokenizer.add_tokens([AddedToken("<think>", special=False, normalized=False), "answer"])
    return tokenizer


TOKENIZERS = {
    "llama3": llama3_tokenizer,
    "gemma-byte-level": gemma,
    "gemma-metaspace-first": lambda: gemma("metaspace"),
    "mistral": mistral,
    "gemma-non-special-added": lambda: with_non_special_added_token(gemma()),
    "gemma-added-across-the-cut": lambda: gemma(extra=(ACROSS,)),
}


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def random_text(rng: random.Random, most: int) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, most)))


def random_prompt(rng: random.Random) -> list[dict]:
    """A system turn or none, then alternating user and assistant turns ending with a user turn."""
    messages = [{"role": "system", "content": random_text(rng, 3)}] if rng.random() < 0.3 else []
    for turn in range(rng.choice([1, 1, 3])):
        messages.append({"role": "assistant" if turn % 2 else "user", "content": random_text(rng, 6)})
    return messages


def check_cuts(tokenizer, seed: int, prompts: int = 60, continuations: int = 12) -> int:
    """Asserts the cut's identity on random prompts and continuations; returns how many prompts got a cut."""
    cuts, rng, found = TokenCuts(tokenizer), random.Random(seed), 0
    if tokenizer.chat_template == MISTRAL_TEMPLATE:  # it refuses a system turn and wants alternating turns
        make = lambda: [{"role": "user", "content": random_text(rng, 6)}]  # noqa: E731
    else:
        make = lambda: random_prompt(rng)  # noqa: E731
    for _ in range(prompts):
        prompt = tokenizer.apply_chat_template(make(), tokenize=False, add_generation_prompt=True)
        encoding = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        cut = cuts.find(prompt, encoding["input_ids"], encoding["offset_mapping"])
        if cut is None:
            continue
        found += 1
        for _ in range(continuations):
            continuation = random_text(rng, 8)
            whole = ids(tokenizer, prompt + continuation)
            assert encoding["input_ids"][: cut.token] + ids(tokenizer, prompt[cut.start :] + continuation) == whole, (
                prompt,
                continuation,
            )
    return found


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_the_cut_gives_the_whole_texts_tokens(name):
    found = check_cuts(TOKENIZERS[name](), seed=sum(map(ord, name)))
    if name == "gemma-added-across-the-cut":
        assert found == 0  # every prompt ends with the start of `ACROSS`: no cut, each conversation whole
    else:
        assert found == 60  # every prompt of a real template has a cut: the property was checked, not skipped


def test_the_cut_on_chatml(smollm2_tokenizer):
    assert check_cuts(smollm2_tokenizer, seed=1) == 60


class CountingTokenizer:
    """The tokenizer, with the texts it was asked to tokenize."""

    def __init__(self, tokenizer):
        self.__dict__.update(inner=tokenizer, texts=[])

    def __call__(self, text, **kwargs):
        self.texts.append(text)
        return self.inner(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("name", ["llama3", "gemma-metaspace-first", "gemma-added-across-the-cut"])
def test_answers_to_one_prompt_tokenize_their_own_text(name):
    """GRPO groups: every conversation gets `apply_chat_template`'s tokens for the whole conversation, and after the
    group's first answer each answer tokenizes its own text (with the prompt's last markup), not the prompt again."""
    tokenizer = CountingTokenizer(TOKENIZERS[name]())
    encoder = ChatEncoder(tokenizer)
    rng = random.Random(0)
    for group in range(12):
        prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Question {group}: why?"}]
        rendered = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        for answer in range(6):
            # Plain answers that start and end with whitespace, newlines or the start of `ACROSS`.
            text = rng.choice(["", " ", "\n", "\n\n", "Yes", "Yes, "]) + f"answer {answer}" + rng.choice(["", " \n"])
            conversation = [*prompt, {"role": "assistant", "content": text}]
            tokenizer.texts.clear()
            row = encoder.encode(conversation)
            assert row.input_ids == ids(tokenizer.inner, tokenizer.apply_chat_template(conversation, tokenize=False))
            if answer and name != "gemma-added-across-the-cut":
                assert max(map(len, tokenizer.texts)) < len(rendered), tokenizer.texts
