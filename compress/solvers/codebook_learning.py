"""Joint learning of codebooks and mappings on a block's output error (JLCM, step 3).

Each `codebook` layer gets a training stand-in: its codebook entries and log row-scales are parameters with exact
gradients; each weight also has a continuous latent value (in the row-normalised, stored-order domain) that the
forward adds with a straight-through estimator, `w = C[a] + (latent - stop_grad(latent))`, so the latent receives
`dL/dw` while the forward uses the decoded weight. Every `reassign_every` steps the mappings follow the latents
through the proximal update (`proximal_assign`): a vector may move only to one of the `neighbours` entries nearest
its current one, paying `penalty` times the squared distance of the move.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compress.formats.codebook import CodebookLinear
from compress.solvers.codebooks import neighbour_table, proximal_assign
from compress.solvers.reconstruct import train_block


@dataclass(frozen=True)
class MappingRule:
    neighbours: int  # candidate entries per move (the current one included); K = every entry
    penalty: float  # times the squared distance of a move, in units of the sensitivity-weighted fit
    reassign_every: int  # steps between mapping updates


class LatentCodebookLinear(nn.Module):
    """Training stand-in for a `CodebookLinear` (see the module docstring). `target` is the original dense weight
    (original row order), the latent's starting point; `sensitivity [in]` weighs each input feature."""

    def __init__(self, layer: CodebookLinear, target: torch.Tensor, sensitivity: torch.Tensor) -> None:
        super().__init__()
        self.layer = layer
        self.codebooks = nn.Parameter(layer.codebooks.detach().clone())
        scales = layer.scales.detach() if layer.scales is not None else torch.ones(layer.out_features)
        self.register_buffer("base_scales", scales.clone())
        self.log_scales = nn.Parameter(torch.zeros_like(scales), requires_grad=layer.scales is not None)
        stored = layer.stored_order(target.detach().float())
        self.latent = nn.Parameter(stored / torch.where(scales != 0, scales, 1.0).unsqueeze(1))
        self.register_buffer("mapping", layer.unpacked_codes().clone())
        self.register_buffer("groups", layer.row_groups())
        inverse = layer.inverse_permutation() if layer.permutation is not None else torch.empty(0)
        self.register_buffer("inverse", inverse)
        d = layer.vector_dim
        weights = sensitivity.float() * layer.coded_mask()  # kept columns are not coded: no weight in assignments
        self.register_buffer("weights", weights.reshape(1, -1, d).expand(layer.out_features, -1, -1))

    def learnable(self) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
        """(codebooks, log-scales, latents): the three learning-rate groups."""
        scales = [self.log_scales] if self.layer.scales is not None else []
        return [self.codebooks], scales, [self.latent]

    def stored_weight(self) -> torch.Tensor:
        layer = self.layer
        decoded = self.codebooks[self.groups.unsqueeze(1), self.mapping].reshape(layer.out_features, layer.in_features)
        weight = decoded + (self.latent - self.latent.detach())
        weight = weight * (self.base_scales * torch.exp(self.log_scales)).unsqueeze(1)
        if layer.column_indices is not None:  # kept columns stay as stored
            weight = weight.index_copy(1, layer.column_indices.to(torch.int64), layer.column_weights.detach())
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.stored_weight()
        if len(self.inverse):
            weight = weight[self.inverse]
        bias = None if self.layer.bias is None else self.layer.bias.to(x.dtype)
        return F.linear(x, weight.to(x.dtype), bias)

    @torch.no_grad()
    def reassign(self, rule: MappingRule) -> int:
        """Proximal mapping update of every vector, group by group. Returns how many vectors changed entry."""
        layer = self.layer
        d = layer.vector_dim
        latent = self.latent.reshape(layer.out_features, layer.vectors_per_row, d)
        changed = 0
        for group in range(layer.num_groups):
            rows = slice(group * layer.rows_per_group, (group + 1) * layer.rows_per_group)
            codebook = self.codebooks[group]
            table = neighbour_table(codebook, rule.neighbours)
            current = self.mapping[rows].reshape(-1)
            new = proximal_assign(
                latent[rows].reshape(-1, d), current, codebook, table, rule.penalty, self.weights[rows].reshape(-1, d)
            )
            changed += int((new != current).sum())
            self.mapping[rows] = new.view(layer.rows_per_group, -1)
        return changed

    @torch.no_grad()
    def write_back(self) -> CodebookLinear:
        layer = self.layer
        layer.codebooks.copy_(self.codebooks.half().float())
        if layer.scales is not None:
            layer.scales.copy_((self.base_scales * torch.exp(self.log_scales)).half().float())
        layer.set_codes(self.mapping)
        return layer


def learn_block(
    block: nn.Module,
    layers: dict[str, CodebookLinear],
    targets_by_layer: dict[str, torch.Tensor],
    sensitivity: dict[str, torch.Tensor],
    inputs,
    outputs: list[torch.Tensor],
    *,
    steps: int,
    codebook_learning_rate: float,
    scale_learning_rate: float,
    latent_learning_rate: float,
    rule: MappingRule,
    seed: int,
) -> tuple[list[float], int]:
    """Learn the codebooks, row scales and mappings of `layers` (names relative to `block`) so that the block
    reproduces `outputs`; with `latent_learning_rate` 0 the mappings stay as they are (codebooks and scales only).
    Returns the per-step relative output errors and the number of mapping changes."""
    latents = {
        name: LatentCodebookLinear(layer, targets_by_layer[name], sensitivity[name]) for name, layer in layers.items()
    }
    codebooks, scales, latent_values = ([p for m in latents.values() for p in m.learnable()[i]] for i in range(3))
    learn_mappings = latent_learning_rate > 0
    groups = [{"params": codebooks, "lr": codebook_learning_rate}]
    if learn_mappings:
        groups.append({"params": latent_values, "lr": latent_learning_rate})
    if scales:
        groups.append({"params": scales, "lr": scale_learning_rate, "clip": True})
    moves = 0

    def after_step(step: int) -> None:
        nonlocal moves
        if learn_mappings and (step + 1) % rule.reassign_every == 0:
            moves += sum(latent.reassign(rule) for latent in latents.values())

    losses = train_block(block, latents, groups, inputs, outputs, steps, seed, after_step)
    return losses, moves
