import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import compress
from compress import pipeline
from compress.errors import CompressError
from compress.formats.embedding import QuantizedEmbedding
from compress.formats.uniform import UniformLinear
from compress.stages.head import HeadConfig, apply
from tests.conftest import build_model, tiny_recipe
from tests.stages.test_rtn import Recorder, logits_sqnr

HEAD = {"stage": "head", "bits": 8, "group_size": 32}
RTN = {"stage": "rtn", "bits": 4, "group_size": 32}


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_a_tied_embedding_reads_the_rows_of_the_compressed_head(family):
    reference, model = build_model(family), build_model(family)
    context = Recorder()
    apply(model, HeadConfig(bits=8, group_size=32), context)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    assert isinstance(head, UniformLinear) and head.bits == 8
    assert isinstance(embedding, QuantizedEmbedding) and embedding.head is head
    assert list(context.layers) == ["lm_head"] and context.layers["lm_head"] < 1e-4
    assert not model.config.tie_word_embeddings  # nothing may re-tie a float matrix to the compressed head
    assert not [name for name in model.state_dict() if "embed_tokens" in name or "wte" in name]  # stored once, as codes
    ids = torch.randint(0, 320, (3, 7))
    torch.testing.assert_close(embedding(ids), F.embedding(ids, head.dequantize()), rtol=0, atol=0)
    assert logits_sqnr(reference, model, torch.randint(3, 320, (2, 32))) > 30  # 8 bits: about 48 dB per weight


def test_fewer_bits_cost_more_and_an_untied_embedding_stays_as_it_is():
    reference = build_model("qwen2")  # untied: the embedding keeps its own float matrix
    ids = torch.randint(3, 320, (2, 32))
    sqnr = {}
    for bits in (4, 8):
        model = build_model("qwen2")
        embedding = model.get_input_embeddings()
        apply(model, HeadConfig(bits=bits, group_size=None), Recorder())
        assert model.get_input_embeddings() is embedding and type(embedding) is torch.nn.Embedding
        assert model.get_output_embeddings().group_size == 64  # null: one scale per row
        sqnr[bits] = logits_sqnr(reference, model, ids)
    assert sqnr[8] - sqnr[4] > 4 * 4


def test_refuses_what_it_cannot_compress():
    with pytest.raises(CompressError, match="no output head"):
        apply(build_model("bert"), HeadConfig(), Recorder())
    model = build_model("llama")
    with pytest.raises(CompressError, match="group_size 48 does not divide the head's 64 input features"):
        apply(model, HeadConfig(group_size=48), Recorder())
    apply(model, HeadConfig(), Recorder())
    with pytest.raises(CompressError, match="UniformLinear, not a linear layer"):
        apply(model, HeadConfig(), Recorder())


def test_checkpoint_stores_the_matrix_once_and_loads_as_it_ran(model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    result = pipeline.run(tiny_recipe(model_dirs["llama"], out, [RTN, HEAD]))
    config = json.loads((out / "config.json").read_text())
    quantization = config["quantization_config"]
    assert quantization["format_version"] == 5 and quantization["embeddings"] == {"model.embed_tokens": "lm_head"}
    assert quantization["layers"]["lm_head"]["bits"] == 8 and config["tie_word_embeddings"] is False
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        names = set(handle.keys())
    assert "lm_head.qweight" in names and not [name for name in names if name.startswith("model.embed_tokens")]
    assert "lm_head" in result.report.layers  # counted in the bits per weight and the sizes
    ids = torch.randint(3, 320, (2, 40))
    with torch.no_grad():
        expected = result.model(input_ids=ids).logits
        for loaded in (compress.load(out), AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)):
            assert isinstance(loaded.get_input_embeddings(), QuantizedEmbedding)
            assert torch.equal(loaded(input_ids=ids).logits, expected)


def test_dense_export_writes_both_matrices_for_stock_transformers(model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dense"
    export = {"out": str(out), "format": "dense"}
    result = pipeline.run(tiny_recipe(model_dirs["llama"], out, [RTN, HEAD], export=export), evaluate=False)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    dense = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(dense.get_input_embeddings()) is torch.nn.Embedding
    ids = torch.randint(3, 320, (2, 24))
    with torch.no_grad():
        expected, found = dense(input_ids=ids).logits, result.model(input_ids=ids).logits
    torch.testing.assert_close(expected, found, rtol=1e-2, atol=1e-2)


def test_a_reader_refuses_embeddings_it_cannot_serve(model_dirs, tmp_path):
    out = tmp_path / "out"
    pipeline.run(tiny_recipe(model_dirs["llama"], out, [RTN, HEAD]), evaluate=False)
    config_path = out / "config.json"
    original = json.loads(config_path.read_text())
    cases = [
        ({"format_version": 4}, "embeddings needs format version 5, not 4"),
        ({"embeddings": {"model.embed_tokens": "model.layers.0.mlp.up_proj"}}, "is 320x64 but the head"),
        ({"embeddings": {"model.embed_tokens": "model.norm"}}, "which is not a compressed layer"),
        ({"embeddings": {"model.nowhere": "lm_head"}}, "which the model does not have"),
        ({"embeddings": ["lm_head"]}, "must map embedding names to head names"),
    ]
    for change, message in cases:
        config = json.loads(json.dumps(original))
        config["quantization_config"].update(change)
        config_path.write_text(json.dumps(config))
        with pytest.raises(CompressError, match=message):
            compress.load(out, verify=False)
