import math

import pytest
import torch
import torch.nn.functional as F

from compress.eval import ReferenceCache, language_model_quality, quantized_bits
from compress.stages.rtn import RtnConfig
from compress.stages.rtn import apply as rtn
from tests.conftest import build_model


class Recorder:
    def record_layer(self, *args):
        pass


def test_perplexity_equals_the_model_loss():
    model = build_model("llama")
    windows = torch.randint(3, 320, (3, 20))
    quality = language_model_quality(model, windows, batch_size=2)
    with torch.no_grad():
        loss = model(input_ids=windows, labels=windows).loss
    assert quality.perplexity == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert quality.tokens == 3 * 19


def test_kl_against_a_direct_computation():
    original, other = build_model("llama", seed=0), build_model("llama", seed=1)
    windows = torch.randint(3, 320, (3, 20))
    cache = ReferenceCache(3, 19, 320)
    try:
        language_model_quality(original, windows, 2, cache, record=True)
        assert language_model_quality(original, windows, 2, cache).kl_to_original == pytest.approx(0, abs=1e-4)
        measured = language_model_quality(other, windows, 2, cache).kl_to_original
    finally:
        cache.close()
    with torch.no_grad():
        p = F.log_softmax(original(input_ids=windows).logits[:, :-1], -1)
        q = F.log_softmax(other(input_ids=windows).logits[:, :-1], -1)
    expected = float((p.exp() * (p - q)).sum(-1).mean())
    assert measured == pytest.approx(expected, rel=1e-2)


def test_quantized_bits_counts_only_compressed_layers():
    model = build_model("llama")
    assert quantized_bits(model) == (0.0, 0)
    rtn(model, RtnConfig(bits=2, group_size=64), Recorder())
    bits, weights = quantized_bits(model)
    assert bits == pytest.approx(2 + 18 / 64)
    assert weights == 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)  # q,o + k,v (2 KV heads) + gate, up, down


def test_sentence_embeddings_ignore_padding(tokenizer_dir):
    from transformers import AutoTokenizer

    from compress.eval import masked_sentence_embeddings

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.pad_token = "<unk>"
    model = build_model("bert")
    short, long = "A short sentence.", "A much longer sentence, with many more words than the first one has."
    alone = masked_sentence_embeddings(model, tokenizer, [short])
    padded = masked_sentence_embeddings(model, tokenizer, [short, long])
    assert padded.shape == (2, 64) and torch.allclose(padded.norm(dim=-1), torch.ones(2))
    assert torch.allclose(alone[0], padded[0], atol=1e-5)  # the padding of the shorter sentence changes nothing
    assert float(padded[0] @ padded[1]) < 0.9999


def test_the_spread_of_a_perplexity_is_the_standard_error_over_windows():
    from compress.eval import LanguageModelQuality

    quality = LanguageModelQuality(perplexity=1.0, kl_to_original=None, tokens=4, window_nll=[1.0, 2.0, 3.0, 4.0])
    assert quality.log_perplexity_se == pytest.approx((5 / 3) ** 0.5 / 2)  # sample std / sqrt(windows)
    assert LanguageModelQuality(1.0, None, 1, [2.0]).log_perplexity_se is None


def test_each_windows_loss_is_recorded():
    model = build_model("llama")
    windows = torch.randint(3, 320, (5, 24), generator=torch.Generator().manual_seed(0))
    quality = language_model_quality(model, windows, 2)
    assert len(quality.window_nll) == 5 and len(set(quality.window_nll)) == 5
    assert math.exp(sum(quality.window_nll) / 5) == pytest.approx(quality.perplexity)  # equal windows: the mean
    assert 0 < quality.log_perplexity_se < 1
