"""Layers that read the same input (an attention's q, k and v, an MLP's gate and up) are computed together at
decode, by one operator call, with the results each would give alone; a changed or different input is computed
again."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.formats.codebook import CodebookLinear
from compress.formats.power import PowerLinear
from compress.formats.uniform import UniformLinear
from compress.runtime import kernels, prepare

IN_FEATURES = 192
SIZES = {"q_proj": 96, "k_proj": 32, "v_proj": 48}  # different row counts: each layer's rows end in its own output


def grid(kind: str, bits: int, out_features: int, seed: int, bias: bool):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, IN_FEATURES, generator=generator)
    bias_tensor = torch.randn(out_features, generator=generator) if bias else None
    if kind == "uniform":
        return UniformLinear.from_weight(weight, bias_tensor, bits, 32)
    per_row = torch.rand(out_features, generator=generator) + 0.4
    exponent = torch.tensor([0.5 + 0.1 * seed]) if kind == "power" else per_row
    return PowerLinear.from_weight(weight, bias_tensor, bits, 32, exponent)


def codebook(code_bits: int, dim: int, out_features: int, seed: int, bias: bool):
    generator = torch.Generator().manual_seed(seed)
    groups = out_features // 16
    codes = torch.randint(0, 1 << code_bits, (out_features, IN_FEATURES // dim), generator=generator)
    books = torch.randn(groups, 1 << code_bits, dim, generator=generator)
    kept = 2 + seed  # every layer keeps other columns
    columns = torch.randperm(IN_FEATURES, generator=generator)[:kept].sort().values
    return CodebookLinear.from_parts(
        codes, books, torch.rand(out_features, generator=generator) + 0.5,
        torch.randperm(out_features, generator=generator) if seed != 1 else None,
        torch.randn(out_features, generator=generator) if bias else None,
        (columns, torch.randn(out_features, kept, generator=generator)),
    )  # fmt: skip


KINDS = {
    **{f"{kind}-w{bits}": (lambda size, seed, bias, k=kind, b=bits: grid(k, b, size, seed, bias))
       for kind in ("uniform", "power", "power-channel") for bits in (2, 3, 4)},
    **{f"codebook-k{bits}-d{dim}": (lambda size, seed, bias, b=bits, d=dim: codebook(b, d, size, seed, bias))
       for bits, dim in ((8, 4), (6, 2), (4, 1))},
}  # fmt: skip


class Attention(nn.Module):
    def __init__(self, make) -> None:
        super().__init__()
        for seed, (name, size) in enumerate(SIZES.items()):
            self.add_module(name, make(size, seed, bias=seed != 1))


def counted(group, monkeypatch) -> list[int]:
    calls = [0]
    op = group.op

    def counting(*args):
        calls[0] += 1
        return op(*args)

    monkeypatch.setattr(group, "op", counting)
    return calls


@pytest.fixture(params=["compiled", "reference"])
def path(request, monkeypatch):
    if request.param == "reference":
        monkeypatch.setenv(kernels.SWITCH, "0")
    return request.param


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_group_gives_what_each_layer_gives_alone(kind, path):
    attention = Attention(KINDS[kind])
    expected_weights = {name: getattr(attention, name).dequantize().detach() for name in SIZES}
    prepare(attention)
    assert attention.q_proj.kernel.group is attention.k_proj.kernel.group is attention.v_proj.kernel.group
    for shape in ((1, IN_FEATURES), (2, IN_FEATURES), (1, 7, IN_FEATURES), (3, 1, IN_FEATURES), (1, 512, IN_FEATURES)):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[-2]))
        with torch.no_grad():
            for name in ("v_proj", "q_proj", "k_proj"):  # any of them may come first
                layer = getattr(attention, name)
                expected = F.linear(x, expected_weights[name], layer.bias)
                got = layer(x)
                assert got.shape == expected.shape
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("kind", ["uniform-w4", "codebook-k8-d4"])
def test_one_call_serves_the_group_and_a_changed_input_is_computed_again(kind, monkeypatch):
    attention = prepare(Attention(KINDS[kind]))
    calls = counted(attention.q_proj.kernel.group, monkeypatch)

    def reference(name, x):
        layer = getattr(attention, name)
        return F.linear(x, layer.dequantize(), layer.bias)

    x = torch.randn(1, 1, IN_FEATURES)
    with torch.no_grad():
        outputs = {name: getattr(attention, name)(x) for name in SIZES}
        assert calls[0] == 1
        for name in SIZES:
            torch.testing.assert_close(outputs[name], reference(name, x), rtol=1e-4, atol=1e-4)
        other = torch.randn(1, 1, IN_FEATURES)  # not the tensor the group was computed for
        torch.testing.assert_close(attention.k_proj(other), reference("k_proj", other), rtol=1e-4, atol=1e-4)
        assert calls[0] == 2
        attention.q_proj(x)
        x.mul_(2.0)  # written in place after the group was computed
        torch.testing.assert_close(attention.k_proj(x), reference("k_proj", x), rtol=1e-4, atol=1e-4)
        assert calls[0] == 4
        torch.testing.assert_close(attention.q_proj(x), reference("q_proj", x), rtol=1e-4, atol=1e-4)
        assert calls[0] == 4  # q's output waited since k computed the group
        attention.q_proj(x)  # the same layer again: computed again, an output is taken once
        assert calls[0] == 5


def test_only_layers_a_kernel_can_take_together_are_grouped():
    attention = Attention(lambda size, seed, bias: grid("uniform", 4 if seed != 2 else 3, size, seed, bias))
    prepare(attention)
    assert attention.q_proj.kernel.group is attention.k_proj.kernel.group
    assert attention.v_proj.kernel.group is None  # 3 bits against 4: its own call
    attention = Attention(lambda size, seed, bias: codebook(6 if seed == 0 else 8, 2, size, seed, bias))
    prepare(attention)  # q with 6-bit codes, k and v with 8-bit ones (jlcm 3-bit's recipe): k and v together
    assert attention.k_proj.kernel.group is attention.v_proj.kernel.group is not None
    assert attention.q_proj.kernel.group is None
    mixed = nn.Module()
    mixed.gate_proj = grid("uniform", 4, 64, 0, False)
    mixed.up_proj = codebook(8, 4, 64, 1, False)
    mixed.down_proj = grid("uniform", 4, 64, 2, False)
    prepare(mixed)
    assert all(getattr(mixed, name).kernel.group is None for name in ("gate_proj", "up_proj", "down_proj"))
