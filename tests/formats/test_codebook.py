import pytest
import torch

from compress.formats.codebook import CodebookLinear, nearest_entries, squared_distances
from compress.formats.packing import packed_length


def random_layer(out=24, inp=32, code_bits=3, vector_dim=2, num_groups=3, scales=True, permuted=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << code_bits, (out, inp // vector_dim), generator=generator)
    codebooks = torch.randn(num_groups, 1 << code_bits, vector_dim, generator=generator).half().float()
    row_scales = (torch.rand(out, generator=generator) + 0.5).half().float() if scales else None
    permutation = torch.randperm(out, generator=generator) if permuted else None
    bias = torch.randn(out, generator=generator) if seed % 2 == 0 else None
    return (
        CodebookLinear.from_parts(codes, codebooks, row_scales, permutation, bias),
        codes,
        codebooks,
        row_scales,
        permutation,
    )


def slow_dequantize(codes, codebooks, scales, permutation):
    """Row by row, element by element, straight from the format's definition."""
    out, vectors = codes.shape
    num_groups, _, d = codebooks.shape
    weight = torch.zeros(out, vectors * d)
    for i in range(out):
        row = permutation[i] if permutation is not None else i
        for v in range(vectors):
            entry = codebooks[i // (out // num_groups), codes[i, v]]
            weight[row, v * d : (v + 1) * d] = entry * (scales[i] if scales is not None else 1.0)
    return weight


@pytest.mark.parametrize("scales,permuted", [(True, True), (False, False), (True, False)])
def test_dequantize_matches_the_definition(scales, permuted):
    layer, codes, codebooks, row_scales, permutation = random_layer(scales=scales, permuted=permuted)
    torch.testing.assert_close(layer.dequantize(), slow_dequantize(codes, codebooks, row_scales, permutation))
    assert torch.equal(layer.unpacked_codes(), codes)


def test_encode_of_a_decoded_weight_is_exact_and_nearest_elsewhere():
    layer, codes, *_ = random_layer()
    weight = layer.dequantize()
    fresh, *_ = random_layer()
    fresh.set_codes(torch.zeros_like(codes))
    fresh.encode(weight)
    torch.testing.assert_close(fresh.dequantize(), weight)  # every vector sits on an entry: recovered exactly

    noisy = weight + 0.3 * torch.randn_like(weight)
    fresh.encode(noisy)
    decoded = fresh.dequantize()
    # no other entry is closer, vector by vector (brute force over every entry of the row's group)
    order = fresh.permutation.long()
    for stored_row in range(0, 24, 5):
        row = order[stored_row]
        group = stored_row // fresh.rows_per_group
        scale = fresh.scales[stored_row]
        for v in range(16):
            target = noisy[row, 2 * v : 2 * v + 2]
            best = min(float((scale * e - target).pow(2).sum()) for e in fresh.codebooks[group])
            assert float((decoded[row, 2 * v : 2 * v + 2] - target).pow(2).sum()) == pytest.approx(best, abs=1e-6)


def test_masked_encode_changes_only_vectors_touched_by_the_mask():
    layer, codes, *_ = random_layer()
    before = layer.dequantize()
    mask = torch.zeros(24, 32, dtype=torch.bool)
    mask[5, 7] = True  # vector 3 of original row 5 (elements 6, 7)
    layer.encode(-before, mask)
    after = layer.dequantize()
    assert torch.equal(after[:5], before[:5]) and torch.equal(after[6:], before[6:])
    assert torch.equal(after[5, :6], before[5, :6]) and torch.equal(after[5, 8:], before[5, 8:])
    assert not torch.equal(after[5, 6:8], before[5, 6:8])


def test_bits_per_weight_counts_codes_codebooks_scales_and_permutation():
    layer, *_ = random_layer(out=24, inp=32, code_bits=3, vector_dim=2, num_groups=3)
    weights = 24 * 32
    expected = (24 * packed_length(16, 3) * 8 + 3 * 8 * 2 * 16 + 24 * 16 + 24 * 16) / weights
    assert layer.bits_per_weight() == pytest.approx(expected)
    assert packed_length(16, 3) * 8 == 16 * 3  # codes cost exactly code_bits / vector_dim per weight here


def test_settings_rebuild_an_identical_layer():
    layer, *_ = random_layer()
    empty = CodebookLinear.empty(32, 24, True, layer.settings())
    empty.load_state_dict(layer.state_dict())
    torch.testing.assert_close(empty.dequantize(), layer.dequantize())
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == {
        "bias": (24,), "codes": (24, packed_length(16, 3)), "codebooks": (3, 8, 2), "scales": (24,),
        "permutation": (24,),
    }  # fmt: skip
    assert layer.state_dict()["permutation"].dtype == torch.int16


@pytest.mark.parametrize("settings", [
    {"code_bits": 9, "vector_dim": 2, "num_groups": 3, "row_scales": True, "permuted": True},
    {"code_bits": 3, "vector_dim": 5, "num_groups": 3, "row_scales": True, "permuted": True},
    {"code_bits": 3, "vector_dim": 2, "num_groups": 5, "row_scales": True, "permuted": True},
    {"code_bits": 3, "vector_dim": 2, "num_groups": 3, "row_scales": "yes", "permuted": True},
])  # fmt: skip
def test_invalid_settings_are_refused(settings):
    with pytest.raises(ValueError):
        CodebookLinear.empty(32, 24, False, settings)


def test_gradients_reach_codebooks_and_scales():
    layer, *_ = random_layer()
    for parameter in layer.continuous_parameters():
        parameter.requires_grad_(True)
    layer(torch.randn(4, 32)).pow(2).sum().backward()
    assert layer.codebooks.grad.abs().sum() > 0 and layer.scales.grad.abs().sum() > 0


def test_weighted_distances_equal_the_direct_sum():
    points, entries, weights = torch.randn(50, 3), torch.randn(7, 3), torch.rand(50, 3)
    direct = (weights.unsqueeze(1) * (points.unsqueeze(1) - entries).pow(2)).sum(dim=2)
    torch.testing.assert_close(squared_distances(points, entries, weights), direct, rtol=1e-5, atol=1e-5)
    groups = torch.randint(0, 2, (50,))
    codebooks = torch.stack([entries, entries.flip(0)])
    codes = nearest_entries(points, codebooks, groups)
    for n in range(50):
        brute = (points[n] - codebooks[groups[n]]).pow(2).sum(dim=1).argmin()
        assert int(codes[n]) == int(brute)


def kept_layer(seed=0):
    layer, codes, codebooks, scales, permutation = random_layer(seed=seed)
    indices = torch.tensor([3, 10, 11])
    values = torch.randn(24, 3, generator=torch.Generator().manual_seed(seed + 7)).half().float()
    kept = CodebookLinear.from_parts(codes, codebooks, scales, permutation, layer.bias, (indices, values))
    return kept, layer, indices, values


def test_kept_columns_replace_the_decoded_values():
    kept, layer, indices, values = kept_layer()
    expected = layer.dequantize().clone()
    order = layer.permutation.long()
    expected[order.unsqueeze(1), indices] = values  # stored row i is original row permutation[i]
    torch.testing.assert_close(kept.dequantize(), expected)
    extra = kept.bits_per_weight() - layer.bits_per_weight()
    assert extra == pytest.approx((24 * 3 * 16 + 3 * 16) / (24 * 32))
    assert kept.settings()["kept_columns"] == 3 and "kept_columns" not in layer.settings()
    rebuilt = CodebookLinear.empty(32, 24, True, kept.settings())
    rebuilt.load_state_dict(kept.state_dict())
    assert torch.equal(rebuilt.dequantize(), kept.dequantize())
    assert kept.state_dict()["column_indices"].dtype == torch.int16


def test_encode_leaves_kept_columns_out_of_the_distance():
    kept, _, indices, values = kept_layer()
    target = kept.dequantize() + 0.3 * torch.randn(24, 32, generator=torch.Generator().manual_seed(3))
    spoiled = target.clone()
    spoiled[:, indices] = 1e3  # whatever the kept columns hold, the codes follow the coded elements only
    kept.encode(target)
    codes = kept.unpacked_codes().clone()
    kept.encode(spoiled)
    assert torch.equal(kept.unpacked_codes(), codes)
    assert torch.equal(kept.column_weights, values)  # encode keeps the continuous parameters


def test_gradients_reach_kept_columns():
    kept, *_ = kept_layer()
    for parameter in kept.continuous_parameters():
        parameter.requires_grad_(True)
    kept(torch.randn(4, 32)).pow(2).sum().backward()
    assert kept.column_weights.grad.abs().sum() > 0 and kept.codebooks.grad.abs().sum() > 0
