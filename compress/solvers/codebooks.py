"""Pure math of JLCM: grouping rows by their weight distributions, sensitivity-weighted k-means, and the proximal
mapping update.

Notation: points `x [N, d]` (weight vectors), weights `h [N, d]` (the sensitivity of each element: the mean
squared activation of its input feature, the diagonal of the layer's input Hessian), a codebook `C [K, d]`.
The k-means objective is `sum_n sum_j h_nj (x_nj - C[a_n, j])^2`; its center update is the h-weighted mean.
"""

from __future__ import annotations

import torch

from compress.formats.codebook import squared_distances
from compress.solvers.gptq import damped_hessian


def row_features(weight: torch.Tensor, count: int = 16) -> torch.Tensor:
    """The shape of each row's distribution: `count` quantiles of the row divided by its RMS, `[out, count]`."""
    rms = weight.pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(1e-12)
    levels = torch.linspace(0.02, 0.98, count, device=weight.device, dtype=weight.dtype)
    return torch.quantile(weight / rms, levels, dim=1).t().contiguous()


def balanced_groups(
    features: torch.Tensor, num_groups: int, iterations: int, generator: torch.Generator
) -> torch.Tensor:
    """Rows into `num_groups` groups of equal size whose features are alike: k-means on the features, each round
    assigning rows greedily by distance to a center with room left. Returns the group of each row, int64 `[out]`."""
    rows = len(features)
    size = rows // num_groups
    if num_groups == 1:
        return torch.zeros(rows, dtype=torch.int64, device=features.device)
    centers = features[torch.randperm(rows, generator=generator)[:num_groups].to(features.device)].clone()
    groups = torch.zeros(rows, dtype=torch.int64, device=features.device)
    for _ in range(max(iterations, 1)):
        distances = squared_distances(features, centers)  # [rows, G]
        order = distances.flatten().argsort()
        groups.fill_(-1)
        room = [size] * num_groups
        left = rows
        for flat in order.tolist():
            row, group = divmod(flat, num_groups)
            if groups[row] >= 0 or not room[group]:
                continue
            groups[row] = group
            room[group] -= 1
            left -= 1
            if not left:
                break
        centers = torch.stack([features[groups == g].mean(dim=0) for g in range(num_groups)])
    return groups


def weighted_kmeans(
    points: torch.Tensor,
    weights: torch.Tensor,
    entries: int,
    iterations: int,
    generator: torch.Generator,
    sample_per_entry: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sensitivity-weighted k-means (Lloyd). points, weights `[N, d]` -> codebook `[entries, d]`, codes int64 `[N]`.

    Starts from k-means++ seeds; the Lloyd iterations run on a random sample of at most `sample_per_entry` points
    per entry (then every point gets its nearest entry); an entry left without points is moved to the sampled
    point with the largest weighted error."""
    everything = (points, weights)
    if len(points) > sample_per_entry * entries:
        chosen = torch.randperm(len(points), generator=generator)[: sample_per_entry * entries].to(points.device)
        points, weights = points[chosen], weights[chosen]
    count = len(points)
    centers = _seed(points, weights, entries, generator)
    codes = squared_distances(points, centers, weights).argmin(dim=1)
    for _ in range(iterations):
        mass = torch.zeros(entries, points.shape[1], dtype=points.dtype, device=points.device)
        total = torch.zeros_like(mass)
        mass.index_add_(0, codes, weights)
        total.index_add_(0, codes, weights * points)
        filled = mass > 0
        centers = torch.where(filled, total / mass.clamp_min(1e-30), centers)
        empty = (~filled.any(dim=1)).nonzero(as_tuple=True)[0]
        if len(empty):
            errors = (weights * (points - centers[codes]).pow(2)).sum(dim=1)
            worst = errors.topk(min(len(empty), count)).indices
            centers[empty[: len(worst)]] = points[worst]
        new_codes = squared_distances(points, centers, weights).argmin(dim=1)
        if torch.equal(new_codes, codes) and not len(empty):
            break
        codes = new_codes
    return centers, squared_distances(everything[0], centers, everything[1]).argmin(dim=1)


def _seed(points: torch.Tensor, weights: torch.Tensor, entries: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on a random sample of at most 8 points per entry (distances weighted by the mean
    sensitivity of each dimension)."""
    sample = points[torch.randperm(len(points), generator=generator)[: 8 * entries].to(points.device)]
    if len(sample) < entries:
        extra = torch.randint(len(sample), (entries - len(sample),), generator=generator).to(points.device)
        sample = torch.cat([sample, sample[extra]])
    scale = weights.mean(dim=0)
    chosen = [int(torch.randint(len(sample), (1,), generator=generator))]
    nearest = (scale * (sample - sample[chosen[0]]).pow(2)).sum(dim=1)
    for _ in range(entries - 1):
        total = float(nearest.sum())
        if total > 0:
            index = int(torch.multinomial(nearest.cpu() / total, 1, generator=generator))
        else:
            index = int(torch.randint(len(sample), (1,), generator=generator))
        chosen.append(index)
        nearest = torch.minimum(nearest, (scale * (sample - sample[index]).pow(2)).sum(dim=1))
    return sample[chosen].clone()


def neighbour_table(codebook: torch.Tensor, count: int) -> torch.Tensor:
    """For each entry of `codebook [K, d]`, its `count` nearest entries (itself first), int64 `[K, count]`."""
    distances = squared_distances(codebook, codebook)
    distances.fill_diagonal_(-1.0)
    return distances.topk(min(count, len(codebook)), dim=1, largest=False).indices


def proximal_assign(
    targets: torch.Tensor,
    current: torch.Tensor,
    codebook: torch.Tensor,
    neighbours: torch.Tensor,
    penalty: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The proximal mapping update: each point may move from its entry `current[n]` only to one of that entry's
    `neighbours` (rows of `neighbour_table`), choosing

        argmin_{e in N(current)}  sum_j h_nj (t_nj - C[e, j])^2  +  penalty * ||C[e] - C[current]||^2

    so a gradient step towards `t` (the latent target) cannot jump to a far entry, and the pull of an entry decays
    with its distance from the current one. `penalty = 0` with every entry as a neighbour is plain re-assignment.
    targets, weights `[N, d]`, current int64 `[N]`, codebook `[K, d]` -> int64 `[N]`."""
    candidates = neighbours[current]  # [N, n]
    fit = squared_distances(targets, codebook, weights).gather(1, candidates)
    move = squared_distances(codebook, codebook)[current.unsqueeze(1), candidates]
    best = (fit + penalty * move).argmin(dim=1)
    return candidates.gather(1, best.unsqueeze(1)).squeeze(1)


def refit_codebooks(
    weight: torch.Tensor,
    codes: torch.Tensor,
    groups: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor | None,
    coded: torch.Tensor,
    hessian: torch.Tensor,
    damping: float,
    rounds: int = 2,
    iterations: int = 25,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """With the codes fixed, the codebook entries, row scales and kept columns that minimise the layer's output
    error `sum_r (W_r - What_r) H (W_r - What_r)^T` on the calibration inputs (`H`: the input Hessian, damped as
    for GPTQ). `What_r = s_r * C[g_r, codes_r]` on coded inputs and free values on the kept ones.

    The kept columns are eliminated exactly: for any coded error `E_U`, their best error is
    `E_K = -H_KK^-1 H_KU E_U`, which leaves `E_U S E_U^T` with `S = H_UU - H_UK H_KK^-1 H_KU` (Schur complement).
    Each round then solves for the entries (a linear least squares, block-diagonal over groups) by conjugate
    gradients from the current entries, rounds them to float16, and sets each row's scale to its closed-form best
    `s_r = W_r S Q_r^T / Q_r S Q_r^T` (float16). Rows are in stored order.

    weight `[out, in]`, codes `[out, in/d]` (int64), groups `[out]`, codebooks `[G, K, d]`, scales `[out]` or None,
    coded `[in]` bool (False on kept columns), hessian `[in, in]` -> (codebooks, scales, kept weights `[out, k]`).
    """
    weight = weight.float()
    out_features, in_features = weight.shape
    num_groups, entries, d = codebooks.shape
    hessian, _ = damped_hessian(hessian.float(), damping)
    coded_index = coded.nonzero(as_tuple=True)[0]
    kept_index = (~coded).nonzero(as_tuple=True)[0]
    schur, elimination = hessian[coded_index][:, coded_index], None
    if len(kept_index):
        elimination = torch.linalg.solve(hessian[kept_index][:, kept_index], hessian[kept_index][:, coded_index])
        schur = schur - hessian[coded_index][:, kept_index] @ elimination
    slots = (groups.unsqueeze(1) * entries + codes).reshape(-1)
    target = weight[:, coded_index]

    def decoded(entries_now: torch.Tensor) -> torch.Tensor:
        return entries_now[groups.unsqueeze(1), codes].reshape(out_features, in_features)[:, coded_index]

    def gather(rows: torch.Tensor) -> torch.Tensor:  # [out, coded] -> summed per entry [G, K, d]
        full = torch.zeros(out_features, in_features, dtype=rows.dtype, device=rows.device)
        full[:, coded_index] = rows
        total = torch.zeros(num_groups * entries, d, dtype=rows.dtype, device=rows.device)
        return total.index_add_(0, slots, full.reshape(-1, d)).view(num_groups, entries, d)

    entries_now = codebooks.detach().float().clone()
    row_scale = torch.ones(out_features, device=weight.device) if scales is None else scales.detach().float().clone()

    def normal(c: torch.Tensor, square: torch.Tensor) -> torch.Tensor:  # the least squares' normal operator
        return gather((square * decoded(c)) @ schur)

    for _ in range(rounds):
        square = row_scale.pow(2).unsqueeze(1)
        residual = gather((row_scale.unsqueeze(1) * target) @ schur) - normal(entries_now, square)
        direction, norm = residual.clone(), float(residual.pow(2).sum())
        for _ in range(iterations):
            if norm <= 1e-24:
                break
            product = normal(direction, square)
            step = norm / max(float((direction * product).sum()), 1e-30)
            entries_now = entries_now + step * direction
            residual = residual - step * product
            new_norm = float(residual.pow(2).sum())
            direction, norm = residual + (new_norm / norm) * direction, new_norm
        entries_now = entries_now.half().float()
        if scales is not None:
            values = decoded(entries_now)
            projected = values @ schur
            best = (target * projected).sum(dim=1) / (values * projected).sum(dim=1).clamp_min(1e-30)
            row_scale = torch.where(best > 0, best, row_scale).half().float()
    coded_error = target - row_scale.unsqueeze(1) * decoded(entries_now)
    kept = weight[:, kept_index] + (coded_error @ elimination.t() if elimination is not None else 0.0)
    return entries_now, (row_scale if scales is not None else None), kept
