"""The inference kernels equal `F.linear(x, dequantize())` for every format and setting, never build the dense
weight, follow parameter changes, and leave training on `dequantize()`."""

import pytest
import torch
import torch.nn.functional as F

from compress.formats.codebook import CodebookLinear
from compress.formats.power import PowerLinear
from compress.formats.uniform import UniformLinear
from compress.runtime import kernels, prepare

TOKENS = [1, 2, 7, 512]


def grid_layer(kind: str, bits: int, group_size: int, bias: bool, out_features=96, in_features=192):
    generator = torch.Generator().manual_seed(bits * 100 + group_size)
    weight = torch.randn(out_features, in_features, generator=generator)
    bias_tensor = torch.randn(out_features, generator=generator) if bias else None
    if kind == "uniform":
        return UniformLinear.from_weight(weight, bias_tensor, bits, group_size)
    exponent = torch.tensor([0.6]) if kind == "power" else torch.rand(out_features, generator=generator) * 0.5 + 0.4
    return PowerLinear.from_weight(weight, bias_tensor, bits, group_size, exponent)


def codebook_layer(code_bits: int, dim: int, scales: bool, permuted: bool, kept: int, bias: bool, in_features=192,
                   out_features=96, groups=4):
    generator = torch.Generator().manual_seed(code_bits * 10 + dim)
    codes = torch.randint(0, 1 << code_bits, (out_features, in_features // dim), generator=generator)
    books = torch.randn(groups, 1 << code_bits, dim, generator=generator)
    columns = None
    if kept:
        indices = torch.randperm(in_features, generator=generator)[:kept].sort().values
        columns = (indices, torch.randn(out_features, kept, generator=generator))
    return CodebookLinear.from_parts(
        codes,
        books,
        torch.rand(out_features, generator=generator) + 0.5 if scales else None,
        torch.randperm(out_features, generator=generator) if permuted else None,
        torch.randn(out_features, generator=generator) if bias else None,
        columns,
    )


LAYERS = {
    **{
        f"{kind}-w{bits}-g{group}-{'bias' if bias else 'nobias'}": (
            lambda k=kind, b=bits, g=group, c=bias: grid_layer(k, b, g, c)
        )
        for kind in ("uniform", "power", "power-channel")
        for bits in (2, 3, 4, 8)
        for group in (32, 64, 24)
        for bias in (False, True)
        if not (kind == "power-channel" and bits == 8)
    },
    **{
        f"codebook-k{bits}-d{dim}-s{int(s)}-p{int(p)}-kept{kept}-b{int(b)}": (
            lambda bits=bits, dim=dim, s=s, p=p, kept=kept, b=b: codebook_layer(bits, dim, s, p, kept, b)
        )
        for bits, dim in ((8, 4), (6, 2), (3, 2), (7, 2), (8, 2), (4, 1), (7, 3), (8, 8))
        for s, p, kept, b in (
            (True, True, 3, False), (False, False, 0, True), (True, False, 0, False), (False, True, 5, True)
        )
    },
    # 90 rows: the 8-bit decode kernel's blocks of four rows leave rows over
    "uniform-w8-g64-odd": lambda: grid_layer("uniform", 8, 64, True, out_features=90),
    # 50 vectors of 4 a row: the decode kernel's eight-code steps leave two vectors over
    "codebook-k8-d4-in200": lambda: codebook_layer(8, 4, True, True, 2, True, in_features=200),
    # 15 rows a group (an odd one left after the row pairs), 100 vectors of 2 (a chunk of 64 codes and a part)
    **{f"codebook-k{bits}-d2-odd": (lambda bits=bits: codebook_layer(bits, 2, True, True, 3, True, in_features=200,
                                                                     out_features=90, groups=6))
       for bits in (6, 7, 8)},
}


@pytest.fixture(params=["compiled", "reference"])
def path(request, monkeypatch):
    if request.param == "reference":
        monkeypatch.setenv(kernels.SWITCH, "0")
    return request.param


def test_the_compiled_kernels_are_built_and_load():
    assert kernels.enabled(), "make setup builds compress/runtime/_kernels.so; the tests run with it"


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_fast_path_equals_dequantized_linear(name, path):
    layer = LAYERS[name]()
    expected_layers = layer.dequantize().detach()
    prepare(layer)
    for tokens in TOKENS:
        x = torch.randn(tokens, layer.in_features, generator=torch.Generator().manual_seed(tokens))
        with torch.no_grad():
            expected = F.linear(x, expected_layers, layer.bias)
            got = layer(x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("name", ["uniform-w4-g64-bias", "power-w3-g32-nobias", "codebook-k8-d4-s1-p1-kept3-b0"])
def test_a_decode_step_never_builds_the_dense_weight(name, monkeypatch):
    layer = prepare(LAYERS[name]())

    def refuse():
        raise AssertionError("the dense weight was built")

    monkeypatch.setattr(layer, "dequantize", refuse)
    with torch.no_grad():
        for tokens in (1, 7, 512):
            layer(torch.randn(3, tokens, layer.in_features))  # batch and sequence dimensions kept
    with pytest.raises(AssertionError, match="dense weight was built"):
        layer(torch.randn(1, layer.in_features))  # with gradients recorded, training's dequantize() path runs


def test_the_kernel_follows_changed_parameters():
    layer = prepare(LAYERS["power-w4-g64-nobias"]())
    x = torch.randn(1, layer.in_features)
    with torch.no_grad():
        layer(x)
        layer.scales.mul_(1.5)
        layer.exponents.fill_(0.8)
        torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize()), rtol=1e-4, atol=1e-4)


def test_training_keeps_exact_gradients_through_dequantize():
    layer = prepare(LAYERS["uniform-w4-g64-nobias"]())
    layer.scales.requires_grad_(True)
    layer(torch.randn(2, layer.in_features)).sum().backward()
    assert layer.scales.grad is not None and layer.scales.grad.abs().sum() > 0


@pytest.mark.parametrize("in_features", [192, 200, 40, 8])  # steps of 32 and 16 values, and what is left after them
@pytest.mark.parametrize("bias", [False, True])
def test_the_float16_kernel_equals_the_widened_product(in_features, bias, path):
    generator = torch.Generator().manual_seed(in_features)
    weight = torch.randn(80, in_features, generator=generator).to(torch.float16)
    bias_tensor = torch.randn(80, generator=generator) if bias else None
    op = kernels.half_linear_op()
    for tokens in TOKENS:
        x = torch.randn(tokens, in_features, generator=generator)
        expected = F.linear(x, weight.float(), bias_tensor)
        torch.testing.assert_close(op(x, weight, bias_tensor), expected, rtol=1e-4, atol=1e-4)
