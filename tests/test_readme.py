"""The README's snippets run as written (with the checkpoint path pointed at a tiny checkpoint)."""

import re
from pathlib import Path

from tests.utils import tiny_armorm, tiny_llama_config


README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_score_and_explain_snippet_runs(tmp_path, smollm2_tokenizer, capsys):
    model = tiny_armorm(tiny_llama_config(vocab_size=len(smollm2_tokenizer)), tokenizer=smollm2_tokenizer)
    model.config.pad_token_id = smollm2_tokenizer.pad_token_id
    model.save_pretrained(tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)
    snippet = next(
        block for block in python_blocks() if "Score and explain" in README.read_text() and "contributions" in block
    )
    exec(snippet.replace("/abs/path/to/checkpoint", str(tmp_path)), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("score ") and len(printed) == 5
