"""What each compressed layer computes at inference, from its packed codes (compress/runtime/kernels.py).

`prepare(model)` gives every compressed linear a kernel, chosen once by its format, keeps the float16 output
head (and a tied input embedding) in float16 as the checkpoint stores it, and fuses the RMS norms (norms.py). A
layer's `forward` uses its kernel when no gradient is being recorded; training keeps `dequantize()`. A kernel
derives small tables from the layer's parameters (unpacked zero points, per-group factors, per-exponent levels)
and derives them again if those parameters change; the codes themselves are read where they are, packed.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from compress.formats.base import QuantizedLinear
from compress.formats.codebook import CodebookLinear
from compress.formats.grid import GroupedGridLinear
from compress.formats.packing import unpack_bits
from compress.formats.power import MIN_EXPONENT, PowerLinear
from compress.runtime import kernels
from compress.runtime.attention import fuse_attention
from compress.runtime.norms import fuse_norms

log = logging.getLogger(__name__)


def _in_float32(compute, x: torch.Tensor) -> torch.Tensor:
    """`compute(x)` for the operators, which take float32; other input dtypes go through float32 and back."""
    return compute(x) if x.dtype == torch.float32 else compute(x.float()).to(x.dtype)


class Kernel:
    """What a format's kernel shares: the tables it derives from some of the layer's tensors (`watched`), derived
    again when one of them is replaced or written in place (`_version`, data pointer); the operator takes the input
    as it comes (float32, any leading shape) and adds the bias. Kept lean: it runs for every layer at every token."""

    watched: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.seen: list[tuple[str, torch.Tensor | None, int, int]] | None = None
        self.group: Group | None = None  # the layers reading the same input, computed together at decode

    def refresh(self, module: QuantizedLinear) -> None:
        raise NotImplementedError

    def run(self, module: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def current(self, module: QuantizedLinear) -> bool:
        if self.seen is None:
            return False
        parameters, buffers = module._parameters, module._buffers
        for name, tensor, version, pointer in self.seen:
            now = parameters[name] if name in parameters else buffers.get(name)
            if now is not tensor or (now is not None and (now._version != version or now.data_ptr() != pointer)):
                return False
        return True

    def ensure(self, module: QuantizedLinear) -> None:
        """Derive the tables again if one of the tensors they come from changed."""
        if not self.current(module):
            self.refresh(module)
            tensors = [(name, getattr(module, name, None)) for name in self.watched]
            self.seen = [(n, t, 0 if t is None else t._version, 0 if t is None else t.data_ptr()) for n, t in tensors]

    def __call__(self, module: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
        group = self.group
        if group is not None and x.numel() <= DECODE_TOKENS * module.in_features:
            return group(module, x)
        self.ensure(module)
        return _in_float32(lambda flat: self.run(module, flat), x)


class GridKernel(Kernel):
    """`uniform` and `power`: `w = factor[r, g] * level[q - z]`. For `uniform` the levels are the integers and the
    factor the scale; for `power`, `(q - z) s` decoded is `sign(s) |s|^(1/a) * sign(q - z) |q - z|^(1/a)`, so the
    levels depend on the exponent alone (one table per layer, or per row for per-channel exponents)."""

    watched = ("scales", "qzeros", "exponents")

    def __init__(self) -> None:
        super().__init__()
        self.op = kernels.grid_linear_op()

    def refresh(self, module: GroupedGridLinear) -> None:
        qmax = (1 << module.bits) - 1
        self.zeros = unpack_bits(module.qzeros, module.bits, module.out_features * module.num_groups).contiguous()
        scales = module.scales.detach().float()
        steps = torch.arange(-qmax, qmax + 1, dtype=torch.float32, device=scales.device).unsqueeze(0)
        if isinstance(module, PowerLinear):
            inverse = 1.0 / module.exponents.detach().float().clamp_min(MIN_EXPONENT).reshape(-1, 1)
            table = torch.sign(steps) * steps.abs().pow(inverse)
            self.factors = (torch.sign(scales) * scales.abs().pow(inverse)).contiguous()
        else:
            table = steps
            self.factors = scales.contiguous()
        # at least 32 columns: the kernel reads the levels of grids up to 4 bits as two registers of 16
        self.table = F.pad(table, (0, max(0, 32 - table.shape[1]))).contiguous()
        self.bits, self.group_size = module.bits, module.group_size

    def run(self, module: GroupedGridLinear, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, module._buffers["qweight"], self.zeros, self.factors, self.table, self.bits, self.group_size,
                       module._parameters["bias"])  # fmt: skip


class Group:
    """Compressed layers of one format that read the same input, as an attention's q, k and v projections and an
    MLP's gate and up projections do (`SIBLINGS`). At decode the first of them to be called computes all of them in
    one operator call (one loop over all their rows: the threads meet once instead of once per layer) and keeps the
    others' outputs; each of the others takes its own when it is called with that same tensor, unchanged since
    (`_version`). Called with any other input, a layer computes the group again: grouping changes how many calls
    make a result, never the result."""

    def __init__(self, members: list[QuantizedLinear], op) -> None:
        self.members = members
        self.op = op
        # member -> (the input, its version then, the member's output); each entry is taken once, by one dict pop,
        # so two threads running the model cannot take each other's outputs
        self.waiting: dict[nn.Module, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def arguments(self) -> tuple:
        """The operator's arguments between the input and the biases."""
        raise NotImplementedError

    def __call__(self, module: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
        entry = self.waiting.pop(module, None)
        if entry is not None and entry[0] is x and entry[1] == x._version:
            return entry[2]
        members = self.members
        for member in members:
            member.kernel.ensure(member)
        flat = x if x.dtype == torch.float32 else x.float()
        outputs = self.op(flat, *self.arguments(), [member._parameters["bias"] for member in members])
        if x.dtype != torch.float32:
            outputs = [output.to(x.dtype) for output in outputs]
        pairs = list(zip(members, outputs, strict=True))
        self.waiting = {member: (x, x._version, output) for member, output in pairs if member is not module}
        return next(output for member, output in pairs if member is module)


class GridGroup(Group):
    def __init__(self, members: list[GroupedGridLinear]) -> None:
        super().__init__(members, kernels.grid_linear_group_op())

    def arguments(self) -> tuple:
        found = [member.kernel for member in self.members]
        return ([member._buffers["qweight"] for member in self.members], [k.zeros for k in found],
                [k.factors for k in found], [k.table for k in found], found[0].bits, found[0].group_size)  # fmt: skip


class CodebookGroup(Group):
    def __init__(self, members: list[CodebookLinear]) -> None:
        super().__init__(members, kernels.codebook_linear_group_op())

    def arguments(self) -> tuple:
        found = [member.kernel for member in self.members]
        return ([member._buffers["codes"] for member in self.members], [k.codebooks for k in found],
                [k.scales for k in found], [k.permutation for k in found], [k.columns for k in found],
                [k.column_weights for k in found], found[0].code_bits, [k.rows_per_group for k in found])  # fmt: skip


class CodebookKernel(Kernel):
    """`codebook`: rows decoded from their group's codebook in stored order and written to their original rows;
    kept columns are left out of the coded product and added from their float16 weights (all inside the op)."""

    watched = ("codebooks", "scales", "permutation", "column_indices", "column_weights")

    def __init__(self) -> None:
        super().__init__()
        self.op = kernels.codebook_linear_op()

    def refresh(self, module: CodebookLinear) -> None:
        self.codebooks = module.codebooks.detach().float().contiguous()
        self.scales = None if module.scales is None else module.scales.detach().float().contiguous()
        self.permutation = None if module.permutation is None else module.permutation.to(torch.int64)
        self.columns = None if module.column_indices is None else module.column_indices.to(torch.int64)
        self.column_weights = None if module.column_weights is None else module.column_weights.detach().float()
        self.code_bits, self.rows_per_group = module.code_bits, module.rows_per_group

    def run(self, module: CodebookLinear, x: torch.Tensor) -> torch.Tensor:
        bias = module._parameters["bias"]
        return self.op(x, module._buffers["codes"], self.codebooks, self.scales, self.permutation, self.columns,
                       self.column_weights, self.code_bits, self.rows_per_group, bias)  # fmt: skip


class HalfLinear(nn.Module):
    """An `nn.Linear` whose weight stays float16, as the checkpoint stores it (the output head above all: at 2
    bits it is the largest tensor a small model reads per token). Its `weight` is the same parameter as before,
    so ties and state_dict keys are unchanged."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.op = kernels.half_linear_op()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or self.weight.device.type != "cpu":
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        bias = None if self.bias is None else self.bias.float()
        return _in_float32(lambda flat: self.op(flat, self.weight, bias), x)


KERNELS = {GroupedGridLinear: GridKernel, CodebookLinear: CodebookKernel}
DECODE_TOKENS = 8  # kernels.cpp's kDecodeTokens: up to this many tokens, layers of a group are computed together
# children of one module that read the same input in transformers' architectures (Llama, Mistral, Qwen, Gemma: the
# attention's projections and the MLP's gate and up; Mixtral's experts: w1 and w3; BERT-like encoders: query, key,
# value). Architectures that fuse them into one linear (Phi-3's qkv_proj) have nothing to group.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"), ("query", "key", "value"))


def prepare(model: nn.Module, *, half_head: bool = True) -> nn.Module:
    """Give every compressed linear of `model` its inference kernel; with `half_head`, keep the output head (and
    the input embedding it is tied to) in float16 when its values are float16 already (no value changes); make
    each Llama-like RMS norm of a model with compressed layers one operator call (compress/runtime/norms.py) and its
    Llama attention's decode step free of transformers' wrappers (compress/runtime/attention.py).
    Returns `model`."""
    count = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            _own_buffers(module)
            kind = next((kernel for base, kernel in KERNELS.items() if isinstance(module, base)), None)
            if kind is not None:
                module.kernel = kind()
                count += 1
    groups = _group_siblings(model)
    if half_head:
        _keep_head_in_half(model)
    # only a model with compressed layers: it is what compress.load gives back (a dense result loads without us)
    norms = fuse_norms(model) if count else 0
    attention = fuse_attention(model) if count else 0
    kind = "compiled" if kernels.enabled() else "reference"
    log.info("runtime: %d compressed layers use %s kernels (%d groups of layers sharing an input); %d norms and %d "
             "attentions fused", count, kind, groups, norms, attention)  # fmt: skip
    return model


def _group_siblings(model: nn.Module) -> int:
    """Group the compressed layers among `SIBLINGS` that a decode kernel can take together: grids of at most 4 bits
    of one width and group size, codebooks of one code width and vector size (`Group`). Returns the number of
    groups."""
    count = 0
    for parent in model.modules():
        for names in SIBLINGS:
            alike: dict[tuple, list[nn.Module]] = {}  # e.g. k and v with 8-bit codes, q with 6-bit: two groups
            for module in (parent._modules.get(name) for name in names):
                key = None if module is None else _group_key(module)
                if key is not None:
                    alike.setdefault(key, []).append(module)
            for members in alike.values():
                if len(members) < 2:
                    continue
                group = GridGroup(members) if isinstance(members[0].kernel, GridKernel) else CodebookGroup(members)
                for member in members:
                    member.kernel.group = group
                count += 1
    return count


def _group_key(module: nn.Module) -> tuple | None:
    """What layers must share to be computed together; None where a layer is not grouped."""
    kernel = module.__dict__.get("kernel")
    if type(kernel) is GridKernel and module.bits <= 4 and module.qweight.device.type == "cpu":
        return "grid", module.in_features, module.bits, module.group_size
    if type(kernel) is CodebookKernel and module.codes.device.type == "cpu":
        return "codebook", module.in_features, module.code_bits, module.codebooks.shape[2]
    return None


def _own_buffers(module: nn.Module) -> None:
    """Give the layer's integer buffers memory of their own. Loading leaves them as views into the mapped
    checkpoint file, which then stays mapped whole, with every page loading touched (the float tensors' too, though
    they were copied) counted as resident."""
    for name, buffer in module._buffers.items():
        if buffer is not None and not buffer.is_floating_point() and buffer.device.type == "cpu":
            module._buffers[name] = buffer.clone()


def _keep_head_in_half(model: nn.Module) -> None:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if type(head) is not nn.Linear or head.weight.dtype != torch.float32 or head.weight.device.type != "cpu":
        return
    weight = head.weight.detach()
    half = weight.to(torch.float16)
    if not torch.equal(half.float(), weight):
        return  # values that float16 cannot hold exactly: keep the head as it is
    head.weight.data = half
    model.set_output_embeddings(HalfLinear(head))
    embedding = model.get_input_embeddings()
    if embedding is not None and embedding.weight is head.weight:
        model._half_embedding_hook = embedding.register_forward_hook(_widen)


def _widen(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    return output.to(torch.float32)


def release(model: nn.Module) -> nn.Module:
    """Undo `prepare`'s float16 head (training wants float32 parameters); the layers' kernels stay, unused while
    gradients are recorded. Returns `model`."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if isinstance(head, HalfLinear):
        linear = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
        head.weight.data = head.weight.data.float()
        linear.weight, linear.bias = head.weight, head.bias
        model.set_output_embeddings(linear)
    hook = model.__dict__.pop("_half_embedding_hook", None)
    if hook is not None:
        hook.remove()
    return model
