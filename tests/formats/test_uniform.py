import pytest
import torch

from compress.formats.uniform import UniformLinear


def slow_rtn(weight, bits, group_size):
    """Per-group loop reference of asymmetric min/max round-to-nearest (float16 scales, integer zero)."""
    out = torch.empty_like(weight)
    qmax = 2**bits - 1
    for r in range(weight.shape[0]):
        for g in range(0, weight.shape[1], group_size):
            w = weight[r, g : g + group_size]
            low, high = min(float(w.min()), 0.0), max(float(w.max()), 0.0)
            scale = float(torch.tensor((high - low) / qmax).half()) or 1.0
            zero = min(max(round(-low / scale), 0), qmax)
            q = torch.clamp(torch.round(w / scale) + zero, 0, qmax)
            out[r, g : g + group_size] = (q - zero) * scale
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [16, 64])
def test_matches_slow_reference(bits, group_size):
    torch.manual_seed(bits)
    weight = torch.randn(8, 128)
    module = UniformLinear.from_weight(weight, None, bits, group_size)
    torch.testing.assert_close(module.dequantize(), slow_rtn(weight, bits, group_size), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_error_within_half_a_step(bits):
    torch.manual_seed(0)
    weight = torch.randn(16, 256)
    module = UniformLinear.from_weight(weight, None, bits, 64)
    step = module.scales.repeat_interleave(64, dim=1)
    # float16 rounding of the step can push the extreme value at most a few ulps past the grid's end
    assert ((module.dequantize() - weight).abs() <= step * 0.5 + step * 2**-10 * 2**bits).all()


def test_signal_to_noise_grows_six_db_per_bit():
    torch.manual_seed(0)
    weight = torch.randn(64, 512)
    sqnr = {}
    for bits in (3, 4, 5):
        error = UniformLinear.from_weight(weight, None, bits, 64).dequantize() - weight
        sqnr[bits] = 10 * torch.log10(weight.pow(2).sum() / error.pow(2).sum())
    assert sqnr[4] > 18 and sqnr[4] - sqnr[3] > 5 and sqnr[5] - sqnr[4] > 5


def test_bits_per_weight_counts_scales_and_zeros():
    module = UniformLinear.from_weight(torch.randn(32, 576), None, 4, 64)
    assert module.bits_per_weight() == pytest.approx(4 + (16 + 4) / 64)
    per_channel = UniformLinear.from_weight(torch.randn(32, 576), None, 3, 576)
    assert per_channel.bits_per_weight() == pytest.approx(3 + (16 + 3) / 576)


def test_encode_with_mask_changes_only_masked_codes():
    torch.manual_seed(0)
    weight = torch.randn(8, 64)
    module = UniformLinear.from_weight(weight, None, 4, 32)
    before = module.codes()
    mask = torch.zeros_like(weight, dtype=torch.bool)
    mask[0, :5] = True
    module.encode(-weight, mask)
    after = module.codes()
    assert torch.equal(after[~mask], before[~mask])
    assert not torch.equal(after[mask], before[mask])


def test_forward_is_linear_with_dequantized_weight():
    torch.manual_seed(0)
    weight, bias = torch.randn(8, 64), torch.randn(8)
    module = UniformLinear.from_weight(weight, bias, 4, 32)
    x = torch.randn(3, 64)
    torch.testing.assert_close(module(x), x @ module.dequantize().T + bias)


def test_rejects_group_size_that_does_not_divide():
    with pytest.raises(ValueError, match="does not divide"):
        UniformLinear(100, 8, False, bits=4, group_size=64)
