"""`jlcm`: jointly learnable codebooks and mappings, format `codebook`.

Block by block on calibration activations:
(0) input features with massive activations (mean squared activation at least `outlier_threshold` times the
    layer's mean; a few per layer in LLMs) are kept: their columns are stored in float16 and left out of everything
    below, since one shared codebook cannot hold their outlying weights and their error dominates the output's;
(1) rows (output neurons) are grouped by the shape of their weight distribution (quantiles of the row divided by
    its RMS, balanced k-means) and reordered so each group is contiguous; the permutation is stored (int16);
(2) each group's codebook is initialised by k-means of its row-normalised weight vectors, weighted by the
    sensitivity of each input feature (its mean squared activation, the input Hessian's diagonal);
(3) with `gptq` (the default), the mappings are chosen by Hessian-aware assignment with error feedback (else each
    vector's nearest entry): vectors are assigned left to right, and each one's output error is compensated in the
    weights not yet assigned (GPTQ's update for vectors, as GPTVQ does);
(4) optionally (`refit_rounds`), with the codes fixed, the codebook entries, row scales and kept columns are
    refitted to the layer's output error by least squares (`refit_codebooks`), the codes assigned again, and so on;
(5) optionally (`steps`), codebook entries, row scales and mappings are learned jointly on the block's output error,
    mappings by the proximal update (a vector moves only to an entry near its current one; see
    `compress.solvers.codebooks`); with `latent_learning_rate: 0` only the entries and scales are learned.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Literal

import torch
from pydantic import Field, field_validator

from compress.calib import run_collecting
from compress.errors import CompressError, NumericError
from compress.formats.codebook import CodebookLinear, nearest_entries
from compress.models import dense_weight, replace_module
from compress.registry import STAGES, register_block_stage
from compress.solvers.codebook_learning import MappingRule, learn_block
from compress.solvers.codebooks import balanced_groups, refit_codebooks, row_features, weighted_kmeans
from compress.solvers.gptq import HessianAccumulator, gptq_round_vectors
from compress.stages.base import LayerSelection, block_linears, check_finite, check_regexes, relative_error

log = logging.getLogger(__name__)


class JlcmConfig(LayerSelection):
    code_bits: int = Field(8, ge=1, le=8, description="bits per code: each codebook has 2**code_bits entries")
    layer_code_bits: dict[str, int] = Field(
        default_factory=dict,
        description="regexes of full layer names -> code_bits for the layers they match (the first match wins; the "
        "rest take code_bits): more bits where the error costs most, e.g. {'k_proj|v_proj': 8}",
    )
    vector_dim: int = Field(4, ge=1, le=16, description="weights per code; code_bits / vector_dim bits per weight")
    rows_per_group: int = Field(
        192, ge=1, description="output neurons per codebook (about: groups are equal, so their count divides the rows)"
    )
    grouping: Literal["cluster", "contiguous", "none"] = Field(
        "cluster",
        description="cluster: rows grouped by alike distributions and reordered (permutation stored); contiguous: "
        "groups of consecutive rows; none: one codebook per layer",
    )
    row_scales: bool = Field(True, description="a float16 scale per output row (its RMS), learned")
    gptq: bool = Field(
        True,
        description="mappings by Hessian-aware assignment with error feedback; false: each vector's nearest entry. "
        "Measured on smollm2-135m (with kept columns), feedback is better on the calibration text's kind and in KL, "
        "nearest entries on text of another kind",
    )
    damping: float = Field(0.01, ge=0.0, description="gptq: damping, a fraction of the mean Hessian diagonal")
    refit_rounds: int = Field(
        0,
        ge=0,
        le=100,
        description="codebook entries, row scales and kept columns refitted to the layer's output error with the "
        "codes fixed (least squares), this many times; with gptq, the codes are assigned again between refits",
    )
    outlier_threshold: float = Field(
        20.0,
        ge=0.0,
        description="input features whose mean squared calibration activation is at least this many times the "
        "layer's mean keep their weights in float16 (kept columns); 0: none",
    )
    max_kept_columns: int = Field(16, ge=0, le=4096, description="kept columns per layer at most (most active first)")
    kmeans_iterations: int = Field(10, ge=0, le=10_000, description="k-means iterations of each codebook's start")
    grouping_iterations: int = Field(10, ge=1, le=1000, description="balanced k-means iterations grouping the rows")
    steps: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="joint learning steps per block (one batch each); 0: none. Learning lowers each "
        "block's error but, measured on smollm2-135m at 2 bits, raised perplexity (errors compound across blocks)",
    )
    batch_size: int = Field(4, ge=1, le=4096, description="calibration windows per batch")
    codebook_learning_rate: float = Field(1e-3, ge=0.0, description="codebook entries (row-normalised units)")
    scale_learning_rate: float = Field(1e-3, ge=0.0, description="log row-scales")
    latent_learning_rate: float = Field(
        3e-3, ge=0.0, description="latent weights (row-normalised units); 0: the mappings stay as assigned"
    )
    proximal: bool = Field(True, description="false: mappings move to the nearest entry of the whole codebook")
    neighbours: int = Field(
        8, ge=1, description="proximal rule: candidate entries of a move, the current included (at most all entries)"
    )
    penalty: float = Field(0.1, ge=0.0, description="proximal rule: cost per squared distance of a move")
    reassign_every: int = Field(4, ge=1, description="steps between mapping updates")

    @field_validator("layer_code_bits")
    @classmethod
    def _patterns_and_bits(cls, mapping: dict[str, int]) -> dict[str, int]:
        check_regexes(mapping)
        for pattern, bits in mapping.items():
            if not 1 <= bits <= 8:
                raise ValueError(f"{pattern!r}: code_bits {bits} is outside 1..8")
        return mapping

    def for_layer(self, full_name: str) -> JlcmConfig:
        """This config with the code_bits of `layer_code_bits`'s first pattern that matches `full_name`."""
        for pattern, bits in self.layer_code_bits.items():
            if re.search(pattern, full_name):
                return self.model_copy(update={"code_bits": bits})
        return self

    def mapping_rule(self) -> MappingRule:
        if not self.proximal:  # every entry of the largest codebook (the count is capped at each codebook's size)
            entries = 1 << max([self.code_bits, *self.layer_code_bits.values()])
            return MappingRule(neighbours=entries, penalty=0.0, reassign_every=self.reassign_every)
        return MappingRule(self.neighbours, self.penalty, self.reassign_every)


def shape_problems(config: JlcmConfig, layers: dict[str, tuple[int, int]]) -> list[tuple[str, str]]:
    """`vector_dim` must divide every selected layer's input features; each `layer_code_bits` pattern must match a
    selected layer (a pattern that matches none is a typo that would silently leave the bits unchanged)."""
    problems = _vector_dim_problems(config, layers)
    for pattern in config.layer_code_bits:
        if layers and not any(re.search(pattern, name) for name in layers):
            problems.append(("layer_code_bits", f"{pattern!r} matches no selected layer"))
    return problems


def _vector_dim_problems(config: JlcmConfig, layers: dict[str, tuple[int, int]]) -> list[tuple[str, str]]:
    misfits = [f"{name} ({shape[1]})" for name, shape in layers.items() if shape[1] % config.vector_dim]
    if not misfits:
        return []
    more = f" and {len(misfits) - 3} more" if len(misfits) > 3 else ""
    return [("vector_dim", f"{config.vector_dim} does not divide the input features of {', '.join(misfits[:3])}{more}")]


def group_count(out_features: int, rows_per_group: int) -> int:
    """The number of equal groups nearest (in ratio) to `out_features / rows_per_group`: a divisor of out_features."""
    wanted = math.log(max(out_features / rows_per_group, 1.0))
    divisors = [n for n in range(1, out_features + 1) if out_features % n == 0]
    return min(divisors, key=lambda n: (abs(math.log(n) - wanted), n))


@register_block_stage("jlcm", JlcmConfig, calibration_batch=lambda config: config.batch_size, quantizes=True,
                      check=shape_problems)  # fmt: skip
def compress_block(block, index: int, name: str, inputs, config: JlcmConfig, context) -> dict | None:
    linears = block_linears(block, name, config)
    if not linears:
        return None
    generator = torch.Generator().manual_seed(context.recipe.seed + index)
    outputs, hessians = run_collecting(
        block, inputs, linears, lambda linear: HessianAccumulator(dense_weight(linear).shape[1])
    )
    for output in outputs:
        check_finite(output, f"jlcm: block {name} output")
    weights, sensitivity, layers = {}, {}, {}
    for relative, linear in linears.items():
        weight = dense_weight(linear).float()
        check_finite(weight, f"jlcm: layer {name}.{relative} weight")
        _check_shape(f"{name}.{relative}", weight, config)
        weights[relative] = weight
        hessian = hessians[relative].hessian
        sensitivity[relative] = input_sensitivity(hessian)
        kept = kept_columns(sensitivity[relative], config.outlier_threshold, config.max_kept_columns)
        layer_config = config.for_layer(f"{name}.{relative}")
        layers[relative] = initial_layer(weight, linear.bias, sensitivity[relative], layer_config, generator, kept)
        if config.gptq:
            assign_codes(layers[relative], weight, hessian, config.damping)
        for round_ in range(config.refit_rounds):
            refit_layer(layers[relative], weight, hessian, config.damping)
            if config.gptq and round_ < config.refit_rounds - 1:
                assign_codes(layers[relative], weight, hessian, config.damping)
        replace_module(block, relative, layers[relative])
    try:
        losses, moves = (
            learn_block(
                block,
                layers,
                weights,
                sensitivity,
                inputs,
                outputs,
                steps=config.steps,
                codebook_learning_rate=config.codebook_learning_rate,
                scale_learning_rate=config.scale_learning_rate,
                latent_learning_rate=config.latent_learning_rate,
                rule=config.mapping_rule(),
                seed=context.recipe.seed + index,
            )  # fmt: skip
            if config.steps
            else ([], 0)
        )
    except NumericError as error:
        raise NumericError(f"jlcm: block {name}: {error}; the stage stopped and nothing was written") from error
    for relative, weight in weights.items():
        layer = block.get_submodule(relative)
        context.record_layer(f"{name}.{relative}", layer, relative_error(weight, layer.dequantize()))
    if losses:
        log.info("block %s: relative output error %.5f -> %.5f, %d mapping moves", name, losses[0], losses[-1], moves)
        return {"error": f"{losses[0]:.4f}->{losses[-1]:.4f}", "moves": moves}
    return None


apply = STAGES["jlcm"].apply  # the whole model, block by block


def input_sensitivity(hessian: torch.Tensor) -> torch.Tensor:
    """Each input feature's mean squared activation (the input Hessian's diagonal, up to 2), scaled to mean 1; a
    feature never active gets a small floor, not zero."""
    energy = torch.diag(hessian).float()
    return (energy / energy.mean().clamp_min(1e-30)).clamp_min(1e-6)


def kept_columns(sensitivity: torch.Tensor, threshold: float, most: int) -> torch.Tensor:
    """The input features kept in float16: sensitivity (relative energy) at least `threshold`, at most `most` of the
    largest, ascending; int64 `[k]`, empty when `threshold` is 0."""
    if threshold <= 0 or most == 0:
        return torch.empty(0, dtype=torch.int64)
    above = (sensitivity >= threshold).nonzero(as_tuple=True)[0]
    if len(above) > most:
        above = above[sensitivity[above].topk(most).indices]
    return torch.sort(above).values


def gptq_codes(
    layer: CodebookLinear, weight: torch.Tensor, hessian: torch.Tensor, damping: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes `[out, in / d]` (stored row order) for `weight` (original order) in the layer's codebooks, scales and
    permutation, chosen left to right with error feedback (`gptq_round_vectors`). Kept columns are not quantized:
    they take the value the feedback has brought them to (as SpQR keeps its outliers), returned as the layer's new
    `column_weights` (None without kept columns)."""
    weight = layer.stored_order(weight.float())
    if layer.scales is not None:
        scales = layer.scales.detach().unsqueeze(1)
        weight = torch.where(scales != 0, weight / torch.where(scales != 0, scales, 1.0), 0.0)
    codebooks = layer.codebooks.detach().float()
    groups = layer.row_groups()
    d = layer.vector_dim
    coded = layer.coded_mask().view(-1, d)  # [in / d, d]
    kept = torch.zeros_like(weight)

    def quantize(values: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        mask = coded[index // d]
        if bool(mask.all()):
            codes = nearest_entries(values, codebooks, groups)
            return codes, codebooks[groups, codes]
        codes = nearest_entries(values, codebooks, groups, mask.expand_as(values))
        kept[:, index : index + d] = values
        return codes, torch.where(mask.bool(), codebooks[groups, codes], values)

    codes = gptq_round_vectors(weight, hessian.float(), quantize, d, damping=damping, block_size=d * max(1, 128 // d))
    if layer.column_indices is None:
        return codes, None
    values = kept[:, layer.column_indices.to(torch.int64)]
    return codes, values * (layer.scales.detach().unsqueeze(1) if layer.scales is not None else 1.0)


def assign_codes(layer: CodebookLinear, weight: torch.Tensor, hessian: torch.Tensor, damping: float) -> None:
    """The layer's codes (and kept columns) by error-feedback assignment (`gptq_codes`)."""
    codes, kept_values = gptq_codes(layer, weight, hessian, damping)
    layer.set_codes(codes)
    if kept_values is not None:
        layer.column_weights.data.copy_(kept_values)


def refit_layer(layer: CodebookLinear, weight: torch.Tensor, hessian: torch.Tensor, damping: float) -> None:
    """The layer's codebooks, row scales and kept columns refitted to its output error, codes fixed
    (`refit_codebooks`); `weight` in original row order."""
    codebooks, scales, kept = refit_codebooks(
        layer.stored_order(weight.float()), layer.unpacked_codes(), layer.row_groups(), layer.codebooks, layer.scales,
        layer.coded_mask().bool(), hessian, damping,
    )  # fmt: skip
    layer.codebooks.data.copy_(codebooks)
    if scales is not None:
        layer.scales.data.copy_(scales)
    if layer.column_weights is not None:
        layer.column_weights.data.copy_(kept)


def initial_layer(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    sensitivity: torch.Tensor,
    config: JlcmConfig,
    generator: torch.Generator,
    kept: torch.Tensor | None = None,
) -> CodebookLinear:
    """Steps (1) and (2): row scales, grouping and permutation, sensitivity-weighted k-means per group; the `kept`
    input features (step 0) are left out of all three and stored as they are."""
    out_features, in_features = weight.shape
    d = config.vector_dim
    kept = torch.empty(0, dtype=torch.int64) if kept is None else kept
    coded = torch.ones(in_features)
    coded[kept] = 0.0
    if config.row_scales:
        energy = (weight.pow(2) * coded).sum(dim=1) / coded.sum().clamp_min(1.0)
        scales = energy.sqrt().half().float()
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    else:
        scales = torch.ones(out_features)
    normalised = weight / scales.unsqueeze(1)
    num_groups = 1 if config.grouping == "none" else group_count(out_features, config.rows_per_group)
    permutation = None
    if config.grouping == "cluster" and num_groups > 1:
        features = row_features(normalised[:, coded.bool()] if len(kept) < in_features else normalised)
        groups = balanced_groups(features, num_groups, config.grouping_iterations, generator)
        permutation = torch.sort(groups, stable=True).indices
        normalised, scales = normalised[permutation], scales[permutation]
    rows_per_group = out_features // num_groups
    vectors = normalised.reshape(out_features, in_features // d, d)
    point_weights = (sensitivity * coded).reshape(1, -1, d).expand(rows_per_group, -1, -1).reshape(-1, d)
    codebooks, codes = [], []
    for group in range(num_groups):
        points = vectors[group * rows_per_group : (group + 1) * rows_per_group].reshape(-1, d)
        codebook, assignment = weighted_kmeans(
            points, point_weights, 1 << config.code_bits, config.kmeans_iterations, generator
        )
        codebooks.append(codebook)
        codes.append(assignment.view(rows_per_group, -1))
    return CodebookLinear.from_parts(
        torch.cat(codes),
        torch.stack(codebooks).half().float(),
        scales if config.row_scales else None,
        permutation,
        bias,
        (kept, weight[permutation][:, kept] if permutation is not None else weight[:, kept]) if len(kept) else None,
    )


def _check_shape(name: str, weight: torch.Tensor, config: JlcmConfig) -> None:
    problems = _vector_dim_problems(config, {name: tuple(weight.shape)})
    if problems:
        field, problem = problems[0]
        raise CompressError(f"jlcm: {field} {problem}")
