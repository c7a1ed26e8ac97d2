import pytest
import torch

import compress
from compress import pipeline
from compress.cli import main
from compress.errors import CompressError
from compress.formats.codebook import CodebookLinear
from compress.stages import jlcm
from tests.conftest import build_model, tiny_recipe
from tests.stages.test_nupes import Context, block_error
from tests.test_validate import write

SMALL = dict(code_bits=4, vector_dim=2, rows_per_group=16, kmeans_iterations=10)


def relative_error(weight, layer):
    return float((layer.dequantize() - weight).pow(2).sum() / weight.pow(2).sum())


def mixed_rows(seed=0):
    """Rows of three distribution shapes (gaussian, heavy-tailed, two-peaked), shuffled."""
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(32, 512, generator=generator)
    heavy = torch.randn(32, 512, generator=generator).pow(3)
    peaks = torch.sign(torch.randn(32, 512, generator=generator)) + 0.1 * torch.randn(32, 512, generator=generator)
    rows = torch.cat([gaussian, heavy, peaks])
    return rows[torch.randperm(96, generator=generator)] * 0.05


def test_grouping_reduces_error_versus_one_codebook_at_about_equal_size():
    weight = mixed_rows()
    ones = torch.ones(512)
    layers = {
        grouping: jlcm.initial_layer(
            weight, None, ones, jlcm.JlcmConfig(**SMALL, grouping=grouping), torch.Generator().manual_seed(0)
        )  # fmt: skip
        for grouping in ("cluster", "contiguous", "none")
    }
    errors = {name: relative_error(weight, layer) for name, layer in layers.items()}
    sizes = {name: layer.bits_per_weight() for name, layer in layers.items()}
    assert layers["cluster"].num_groups == 6 and layers["none"].num_groups == 1
    assert sizes["cluster"] < 1.05 * sizes["none"]  # five more codebooks and the permutation add under 5%
    assert errors["cluster"] < 0.8 * errors["none"]
    assert errors["cluster"] < 0.9 * errors["contiguous"]  # it is the clustering, not only more codebooks


def test_sensitive_inputs_get_smaller_errors():
    weight = mixed_rows(1)
    sensitivity = torch.ones(512)
    sensitivity[:16] = 50.0
    sensitivity = sensitivity / sensitivity.mean()
    layer = jlcm.initial_layer(weight, None, sensitivity, jlcm.JlcmConfig(**SMALL), torch.Generator().manual_seed(0))
    plain = jlcm.initial_layer(
        weight, None, torch.ones(512), jlcm.JlcmConfig(**SMALL), torch.Generator().manual_seed(0)
    )
    error = (layer.dequantize() - weight).pow(2)
    plain_error = (plain.dequantize() - weight).pow(2)
    assert error[:, :16].sum() < 0.8 * plain_error[:, :16].sum()


def correlated_inputs(features=512, samples=4096, seed=0):
    """Inputs whose features are strongly correlated (a few shared factors), as activations are."""
    generator = torch.Generator().manual_seed(seed)
    factors = torch.randn(samples, 16, generator=generator)
    mixing = torch.randn(16, features, generator=generator)
    return factors @ mixing + 0.1 * torch.randn(samples, features, generator=generator)


def output_error(weight, layer, inputs):
    return float((inputs @ (layer.dequantize() - weight).T).pow(2).sum() / (inputs @ weight.T).pow(2).sum())


def test_error_feedback_assignment_lowers_the_output_error():
    from compress.solvers.gptq import HessianAccumulator

    weight = mixed_rows(2)
    inputs = correlated_inputs()
    statistics = HessianAccumulator(512)
    statistics.add_batch(inputs[:2048])
    held_out = inputs[2048:]
    config = jlcm.JlcmConfig(**SMALL)
    layer = jlcm.initial_layer(weight, None, jlcm.input_sensitivity(statistics.hessian), config,
                               torch.Generator().manual_seed(0))  # fmt: skip
    nearest = output_error(weight, layer, held_out)
    codes, kept = jlcm.gptq_codes(layer, weight, statistics.hessian, damping=0.01)
    layer.set_codes(codes)
    assert kept is None and output_error(weight, layer, held_out) < 0.5 * nearest


def test_error_feedback_is_nearest_assignment_when_inputs_are_uncorrelated():
    """With a diagonal Hessian no error can be compensated elsewhere: the codes are the nearest entries."""
    weight = mixed_rows(3)
    config = jlcm.JlcmConfig(**SMALL)
    layer = jlcm.initial_layer(weight, None, torch.ones(512), config, torch.Generator().manual_seed(0))
    hessian = torch.diag(torch.rand(512, generator=torch.Generator().manual_seed(1)) + 0.5)
    codes, _ = jlcm.gptq_codes(layer, weight, hessian, damping=0.0)
    layer.encode(weight)  # the nearest entry of every vector
    assert torch.equal(codes, layer.unpacked_codes())


def massive_feature_inputs(samples=4096, seed=0):
    """Correlated inputs where feature 37 carries activations 40 times the others' (a "massive activation", as
    the MLP inputs of some LLM blocks have), so its column dominates the layer's output."""
    inputs = correlated_inputs(samples=samples, seed=seed)
    inputs[:, 37] = 40 * inputs[:, 37].abs().mean() * torch.sign(inputs[:, 37])
    return inputs


def kept_and_plain(threshold, gptq=False):
    from compress.solvers.gptq import HessianAccumulator

    weight = mixed_rows(4)
    weight[:, 37] *= 6  # its weights outlying too, as in smollm2-135m (up to 10-28 times the row's RMS)
    inputs = massive_feature_inputs()
    statistics = HessianAccumulator(512)
    statistics.add_batch(inputs[:2048])
    sensitivity = jlcm.input_sensitivity(statistics.hessian)
    config = jlcm.JlcmConfig(**SMALL, outlier_threshold=threshold)
    kept = jlcm.kept_columns(sensitivity, config.outlier_threshold, config.max_kept_columns)
    layer = jlcm.initial_layer(weight, None, sensitivity, config, torch.Generator().manual_seed(0), kept)
    if gptq:
        codes, values = jlcm.gptq_codes(layer, weight, statistics.hessian, damping=0.01)
        layer.set_codes(codes)
        if values is not None:
            layer.column_weights.data.copy_(values)
    return layer, weight, inputs[2048:]


@pytest.mark.parametrize("gptq", [False, True])
def test_massive_input_features_are_kept_and_lower_the_output_error(gptq):
    kept, weight, held_out = kept_and_plain(20.0, gptq)
    plain, _, _ = kept_and_plain(0.0, gptq)
    assert kept.column_indices.tolist() == [37] and plain.column_indices is None
    if not gptq:  # the column is stored as it was; with feedback it holds what the feedback made of it
        assert torch.equal(kept.dequantize()[:, 37], weight[:, 37])
    assert output_error(weight, kept, held_out) < 0.5 * output_error(weight, plain, held_out)
    extra = kept.bits_per_weight() - plain.bits_per_weight()
    assert extra == pytest.approx(16 * (96 + 1) / (96 * 512), rel=1e-6)  # one float16 column and its int16 index


@pytest.mark.parametrize("gptq", [False, True])
def test_refit_lowers_the_held_out_output_error(gptq):
    """Codebooks, scales and kept columns refitted to the calibration inputs' output error (codes fixed) lower the
    error on other inputs of the same kind, with nearest or error-feedback codes; the codes do not change."""
    from compress.solvers.gptq import HessianAccumulator

    layer, weight, held_out = kept_and_plain(20.0, gptq)
    statistics = HessianAccumulator(512)
    statistics.add_batch(massive_feature_inputs()[:2048])
    codes, before = layer.unpacked_codes().clone(), output_error(weight, layer, held_out)
    jlcm.refit_layer(layer, weight, statistics.hessian, damping=0.01)
    assert torch.equal(layer.unpacked_codes(), codes)
    assert output_error(weight, layer, held_out) < 0.95 * before


def test_kept_columns_are_the_most_active_above_the_threshold():
    sensitivity = torch.ones(64)
    sensitivity[[3, 9, 40, 50]] = torch.tensor([30.0, 100.0, 25.0, 19.0])
    assert jlcm.kept_columns(sensitivity, 20.0, 16).tolist() == [3, 9, 40]
    assert jlcm.kept_columns(sensitivity, 20.0, 2).tolist() == [3, 9]
    assert jlcm.kept_columns(sensitivity, 0.0, 16).tolist() == []


def test_group_count_divides_the_rows():
    assert jlcm.group_count(576, 192) == 3
    assert jlcm.group_count(64, 192) == 1
    assert jlcm.group_count(4096, 192) == 16
    assert jlcm.group_count(1536, 192) == 8


def run_jlcm(**options):
    reference = build_model("llama")
    torch.manual_seed(1)
    calibration, held_out = torch.randint(3, 320, (16, 64)), torch.randint(3, 320, (8, 64))
    model = build_model("llama")
    jlcm.apply(model, jlcm.JlcmConfig(**{**SMALL, **options}), Context(calibration))
    return model, block_error(reference, model, held_out)


def test_learning_beats_kmeans_alone_on_held_out_block_output():
    _, kmeans_only = run_jlcm(steps=0)
    model, learned = run_jlcm(steps=32)
    assert learned < 0.95 * kmeans_only
    layers = [m for m in model.modules() if isinstance(m, CodebookLinear)]
    assert len(layers) == 14 and all(layer.code_bits == 4 and layer.vector_dim == 2 for layer in layers)


def test_learning_codebooks_and_scales_alone_keeps_the_mappings():
    """With `latent_learning_rate: 0` learning moves no mapping (compared in the first block: the later blocks see
    other inputs once the first is learned), and still lowers the held-out block error."""
    context = Context(torch.randint(3, 320, (16, 64)))
    original = {n: m.unpacked_codes().clone() for n, m in _kmeans_layers(context).items()}
    model = build_model("llama")
    jlcm.apply(model, jlcm.JlcmConfig(**SMALL, steps=16, latent_learning_rate=0.0), context)
    learned = {n: m.unpacked_codes() for n, m in model.named_modules() if isinstance(m, CodebookLinear)}
    first = [n for n in learned if ".layers.0." in n]
    assert len(first) == 7 and all(torch.equal(learned[n], original[n]) for n in first)
    _, kmeans_only = run_jlcm(steps=0)
    rates = {"codebook_learning_rate": 3e-3, "scale_learning_rate": 3e-3}
    _, learned_error = run_jlcm(steps=32, latent_learning_rate=0.0, **rates)
    assert learned_error < 0.95 * kmeans_only


def test_refit_rounds_lower_the_held_out_block_error():
    _, plain = run_jlcm(steps=0)
    _, refitted = run_jlcm(steps=0, refit_rounds=1)
    assert refitted < 0.95 * plain


def test_proximal_rule_limits_moves():
    """The same learning with the rule moves fewer mappings than plain nearest re-assignment."""
    moves = {}
    for proximal in (True, False):
        model = build_model("llama")
        context = Context(torch.randint(3, 320, (16, 64)))
        original = {n: m.unpacked_codes().clone() for n, m in _kmeans_layers(context).items()}
        jlcm.apply(model, jlcm.JlcmConfig(**SMALL, steps=16, proximal=proximal, penalty=1.0), context)
        learned = {n: m.unpacked_codes() for n, m in model.named_modules() if isinstance(m, CodebookLinear)}
        moves[proximal] = sum(int((learned[n] != original[n]).sum()) for n in learned)
    assert 0 < moves[True] < moves[False]


def _kmeans_layers(context):
    model = build_model("llama")
    jlcm.apply(model, jlcm.JlcmConfig(**SMALL, steps=0), context)
    return {n: m for n, m in model.named_modules() if isinstance(m, CodebookLinear)}


def test_layer_code_bits_give_the_matching_layers_their_bits():
    model, _ = run_jlcm(steps=0, layer_code_bits={r"\.(k_proj|v_proj)$": 6, r"layers\.1\..*proj$": 3, "o_proj": 5})
    bits = {n: m.code_bits for n, m in model.named_modules() if isinstance(m, CodebookLinear)}
    assert bits["model.layers.0.self_attn.k_proj"] == bits["model.layers.1.self_attn.v_proj"] == 6  # first match
    assert bits["model.layers.0.self_attn.o_proj"] == 5 and bits["model.layers.1.self_attn.o_proj"] == 3
    assert bits["model.layers.0.mlp.up_proj"] == SMALL["code_bits"] and bits["model.layers.1.mlp.up_proj"] == 3
    first = model.model.layers[0]
    assert first.self_attn.k_proj.codebooks.shape[1] == 64
    assert first.self_attn.k_proj.bits_per_weight() > first.mlp.up_proj.bits_per_weight()


def test_layer_code_bits_are_checked(model_dirs, tmp_path, capsys):
    with pytest.raises(ValueError, match="not a valid regular expression"):
        jlcm.JlcmConfig(layer_code_bits={"(": 4})
    with pytest.raises(ValueError, match="code_bits 9 is outside 1..8"):
        jlcm.JlcmConfig(layer_code_bits={"k_proj": 9})
    stage = {"stage": "jlcm", **SMALL, "layer_code_bits": {"k_prj": 6}}
    recipe = write(tmp_path / "r.yaml", model_dirs["llama"], [stage], tmp_path / "o")
    assert main(["validate", str(recipe)]) == 2
    assert "stages[0].layer_code_bits: 'k_prj' matches no selected layer" in capsys.readouterr().err
    assert jlcm.JlcmConfig(code_bits=4, layer_code_bits={"k_proj": 6}, proximal=False).mapping_rule().neighbours == 64


def test_a_shape_that_does_not_fit_is_named():
    with pytest.raises(Exception, match="vector_dim 3 does not divide"):
        run_jlcm(vector_dim=3, steps=0)


def test_export_then_load_is_exact(model_dirs, tmp_path):
    out = tmp_path / "out"
    stage = {"stage": "jlcm", **SMALL, "steps": 4, "layer_code_bits": {"v_proj": 6}}  # mixed widths in one model
    result = pipeline.run(tiny_recipe(model_dirs["llama"], out, [stage]))
    ids = torch.randint(3, 320, (2, 24))
    with torch.no_grad():
        expected = result.model(input_ids=ids).logits
        loaded = compress.load(out)
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, CodebookLinear)}
    assert layers and all(layer.permutation is not None for layer in layers.values() if layer.num_groups > 1)
    assert {n for n, layer in layers.items() if layer.code_bits == 6} == {
        f"model.layers.{i}.self_attn.v_proj" for i in (0, 1)
    }


def test_kept_columns_export_and_load_exactly(model_dirs, tmp_path):
    import json

    out = tmp_path / "out"
    stage = {"stage": "jlcm", **SMALL, "steps": 4, "outlier_threshold": 1.5, "max_kept_columns": 2}
    result = pipeline.run(tiny_recipe(model_dirs["llama"], out, [stage]))
    kept = {n: m.column_indices.tolist() for n, m in result.model.named_modules()
            if isinstance(m, CodebookLinear) and m.column_indices is not None}  # fmt: skip
    assert kept and all(len(columns) <= 2 for columns in kept.values())
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format_version"] == 4
    assert {n for n, s in config["layers"].items() if s.get("kept_columns")} == set(kept)
    ids = torch.randint(3, 320, (2, 24))
    with torch.no_grad():
        assert torch.equal(compress.load(out)(input_ids=ids).logits, result.model(input_ids=ids).logits)
    config["format_version"] = 2  # a version-2 reader's checkpoint cannot hold kept columns
    full = json.loads((out / "config.json").read_text())
    full["quantization_config"] = config
    (out / "config.json").write_text(json.dumps(full))
    with pytest.raises(CompressError, match="kept_columns, which needs format version 3"):
        compress.load(out, verify=False)
