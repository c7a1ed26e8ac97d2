import pytest
import torch

from compress.formats.power import PowerLinear, decode, inverse_power, nearest_codes, power
from compress.formats.uniform import UniformLinear


def bell_weights(rows=16, cols=128, seed=0):
    torch.manual_seed(seed)
    weight = torch.randn(rows, cols) * 0.05
    return weight + torch.randn_like(weight) * 0.3 * (torch.rand_like(weight) < 0.01)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_exponent_one_is_the_uniform_grid(bits):
    weight = bell_weights()  # every group spans zero, so the min/max ranges of both formats agree
    uniform = UniformLinear.from_weight(weight, None, bits, 32)
    powered = PowerLinear.from_weight(weight, None, bits, 32, torch.tensor([1.0]))
    torch.testing.assert_close(powered.dequantize(), uniform.dequantize(), rtol=0, atol=1e-7)


def test_every_level_is_a_distinct_value():
    weight = bell_weights(rows=4, cols=256)
    layer = PowerLinear.from_weight(weight, None, 2, 256, torch.tensor([0.6]))
    levels = decode(torch.arange(4).repeat(4, 64), layer.scales, layer.zeros(), layer.exponents, 256)
    assert all(len(torch.unique(levels[r])) == 4 for r in range(4))  # no level is wasted on a duplicate value


def test_power_round_trip_and_finite_exponent_gradient():
    values = torch.tensor([[-0.5, 0.0, 0.25, 1e-12]])
    exponent = torch.tensor([0.5], requires_grad=True)
    torch.testing.assert_close(inverse_power(power(values, exponent), exponent), values)
    inverse_power(values, exponent).sum().backward()
    assert torch.isfinite(exponent.grad).all()


def test_nearest_codes_are_nearest_in_the_weight_domain():
    weight = bell_weights(rows=8, cols=64)
    layer = PowerLinear.from_weight(weight, None, 3, 64, torch.tensor([0.5]))
    codes, decoded = nearest_codes(weight, layer.scales, layer.zeros(), layer.exponents, 3, 64)
    all_levels = torch.stack([decode(torch.full_like(codes, q), layer.scales, layer.zeros(), layer.exponents, 64)
                              for q in range(8)])  # fmt: skip
    best = (all_levels - weight).abs().min(dim=0).values
    torch.testing.assert_close((decoded - weight).abs(), best)


def test_bits_per_weight_and_mask():
    weight = bell_weights(rows=32, cols=128)
    layer = PowerLinear.from_weight(weight, None, 3, 64, torch.full((32,), 0.7))
    assert layer.bits_per_weight() == pytest.approx(3 + (16 + 3) / 64 + 16 / 128)
    before = layer.codes()
    mask = torch.zeros_like(weight, dtype=torch.bool)
    mask[3] = True
    layer.encode(weight.flip(1), mask)
    assert torch.equal(layer.codes()[~mask], before[~mask]) and not torch.equal(layer.codes()[mask], before[mask])


def test_small_exponent_beats_uniform_on_bell_shaped_weights():
    weight = bell_weights(rows=64, cols=256)
    uniform = (UniformLinear.from_weight(weight, None, 3, 64).dequantize() - weight).pow(2).sum()
    powered = (PowerLinear.from_weight(weight, None, 3, 64, torch.tensor([0.7])).dequantize() - weight).pow(2).sum()
    assert powered < 0.8 * uniform
