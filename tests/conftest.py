"""Tiny models built from a config (2 layers, hidden 64) and a small byte-level tokenizer: no downloads."""

from __future__ import annotations

import os

# No test may reach a hub: a name that is not a local path fails at once instead of waiting on the network.
# Set before transformers and datasets are imported, which read these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from compress.data import embedded_text  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=320)


def tiny_config(family: str):
    import transformers as t

    if family == "llama":
        return t.LlamaConfig(**TINY, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
    if family == "qwen2":
        return t.Qwen2Config(**TINY, num_key_value_heads=2, max_position_embeddings=512)
    if family == "mistral":
        return t.MistralConfig(**TINY, num_key_value_heads=2, max_position_embeddings=512)
    if family == "gpt2":
        return t.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, vocab_size=320)
    if family == "opt":
        return t.OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=320,
            max_position_embeddings=512,
            word_embed_proj_dim=64,
        )
    if family == "bert":
        return t.BertConfig(**TINY, max_position_embeddings=512)
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "opt", "bert"]
CAUSAL = ["llama", "qwen2", "mistral", "gpt2", "opt"]


def build_model(family: str, seed: int = 0):
    import transformers as t

    torch.manual_seed(seed)
    config = tiny_config(family)
    model_class = t.AutoModel if family == "bert" else t.AutoModelForCausalLM
    model = model_class.from_config(config)
    # Bell-shaped weights with a few outliers per row, closer to trained models than the tiny default init.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
                p.add_(torch.randn_like(p) * 0.3 * (torch.rand_like(p) < 0.01))
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([embedded_text()[:100_000]], trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    path = tmp_path_factory.mktemp("tokenizer")
    wrapped.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """Each tiny family saved as a local Hugging Face directory with the tokenizer beside it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    result = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(family)
        build_model(family).save_pretrained(path)
        tokenizer.save_pretrained(path)
        result[family] = path
    return result


TINY_DATA = {
    "calibration": {"num_samples": 8, "seq_len": 64},
    "evaluation": {"num_windows": 4, "seq_len": 64, "batch_size": 2},
}


def tiny_recipe(model_dir: Path, out: Path, stages: list[dict], **extra):
    import yaml

    from compress.recipe import parse_recipe

    raw = {"model": str(model_dir), "data": TINY_DATA, "stages": stages, "export": {"out": str(out)}, **extra}
    return parse_recipe(yaml.safe_dump(raw), "tiny.yaml")


@pytest.fixture
def one_thread():
    """Tiny models: one thread is faster than a thread pool, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_output(model, ids):
    """Logits of a causal model, last hidden states of an encoder."""
    with torch.no_grad():
        result = model(input_ids=ids)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state
