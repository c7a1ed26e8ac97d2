import pytest
import torch

from compress.formats.codebook import nearest_entries
from compress.solvers.codebooks import (
    balanced_groups,
    neighbour_table,
    proximal_assign,
    refit_codebooks,
    row_features,
    weighted_kmeans,
)


def test_kmeans_recovers_well_separated_centers():
    generator = torch.Generator().manual_seed(0)
    centers = torch.tensor([[-3.0, -3.0], [-3.0, 3.0], [3.0, -3.0], [3.0, 3.0]])
    labels = torch.randint(0, 4, (2000,), generator=generator)
    points = centers[labels] + 0.1 * torch.randn(2000, 2, generator=generator)
    found, codes = weighted_kmeans(points, torch.ones_like(points), 4, 50, generator)
    order = found.sum(dim=1).argsort(stable=True)  # match found to true centers by position
    matched = found[torch.tensor([int((found - c).pow(2).sum(1).argmin()) for c in centers])]
    torch.testing.assert_close(matched, centers, atol=0.02, rtol=0)
    assert len(order) == 4
    # the partition is the true one, up to naming the clusters
    for true in range(4):
        assert len(torch.unique(codes[labels == true])) == 1


def test_kmeans_weights_pull_an_entry_towards_sensitive_points():
    """Two points, one entry: the center is the weighted mean, (1*0 + 3*4) / 4 = 3."""
    points = torch.tensor([[0.0], [4.0]])
    weights = torch.tensor([[1.0], [3.0]])
    center, _ = weighted_kmeans(points, weights, 1, 5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(center, torch.tensor([[3.0]]))


def test_kmeans_uses_every_entry():
    generator = torch.Generator().manual_seed(1)
    points = torch.randn(500, 1, generator=generator)
    codebook, codes = weighted_kmeans(points, torch.ones_like(points), 16, 30, generator)
    assert len(torch.unique(codes)) == 16 and len(torch.unique(codebook)) == 16


def test_proximal_update_moves_only_to_near_entries():
    codebook = torch.arange(8.0).unsqueeze(1)  # entries 0, 1, ..., 7 on a line
    table = neighbour_table(codebook, 3)  # itself and its two nearest
    assert table[0].tolist()[0] == 0 and sorted(table[4].tolist()) == [3, 4, 5]
    current = torch.tensor([4, 4, 4, 0])
    targets = torch.tensor([[4.2], [5.4], [7.0], [6.0]])
    # without a penalty: the best of the neighbours, never the far entry nearest the target
    assert proximal_assign(targets, current, codebook, table, 0.0).tolist() == [4, 5, 5, 2]
    # a move costs its squared distance: 5.4 is 0.16 from 5 but 1.96 from 4, and 0.16 + 1 < 1.96
    assert proximal_assign(targets, current, codebook, table, 1.0).tolist() == [4, 5, 5, 2]
    # a heavy penalty: moving 4 -> 5 costs 10 and no longer pays; from 0, the one-step move still does (25 + 10 < 36)
    assert proximal_assign(targets, current, codebook, table, 10.0).tolist() == [4, 4, 4, 1]
    # every entry a neighbour and no penalty: plain nearest assignment
    everything = neighbour_table(codebook, 8)
    assert proximal_assign(targets, current, codebook, everything, 0.0).tolist() == [4, 5, 7, 6]


def test_proximal_update_weighs_dimensions_by_sensitivity():
    codebook = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    table = neighbour_table(codebook, 2)
    target = torch.tensor([[0.9, 0.2]])
    current = torch.tensor([0])
    # unweighted, (1, 1) is nearer (0.65 < 0.85); an error in the second dimension costing 10x flips it (6.41 > 1.21)
    assert proximal_assign(target, current, codebook, table, 0.0, torch.tensor([[1.0, 1.0]])).tolist() == [1]
    assert proximal_assign(target, current, codebook, table, 0.0, torch.tensor([[1.0, 10.0]])).tolist() == [0]


def test_balanced_groups_are_equal_and_separate_distinct_rows():
    generator = torch.Generator().manual_seed(0)
    narrow = torch.randn(12, 256, generator=generator)  # gaussian rows
    heavy = torch.randn(12, 256, generator=generator).pow(3)  # heavy-tailed rows
    order = torch.randperm(24, generator=generator)
    rows = torch.cat([narrow, heavy])[order]
    is_heavy = order >= 12
    groups = balanced_groups(row_features(rows), 2, 10, generator)
    assert torch.bincount(groups).tolist() == [12, 12]
    assert len(torch.unique(groups[is_heavy])) == 1 and len(torch.unique(groups[~is_heavy])) == 1


def refit_problem(kept=(), seed=0, out=48, features=32, d=2, groups=2, entries=8):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, features, generator=generator)
    row_groups = torch.arange(out) // (out // groups)
    codebooks = torch.randn(groups, entries, d, generator=generator)
    scales = weight.pow(2).mean(dim=1).sqrt() * (0.8 + 0.4 * torch.rand(out, generator=generator))
    vectors = (weight / scales.unsqueeze(1)).reshape(-1, d)
    codes = nearest_entries(vectors, codebooks, row_groups.repeat_interleave(features // d)).view(out, -1)
    factors = torch.randn(4 * features, features, generator=generator)
    hessian = factors.T @ factors / len(factors) + 0.1 * torch.eye(features)
    coded = torch.ones(features, dtype=torch.bool)
    coded[list(kept)] = False
    return weight, codes, row_groups, codebooks, scales, coded, hessian


def refit_objective(weight, codes, groups, codebooks, scales, coded, kept_weights, hessian):
    out, features = weight.shape
    decoded = codebooks[groups.unsqueeze(1), codes].reshape(out, features) * scales.unsqueeze(1)
    decoded[:, ~coded] = kept_weights
    error = weight - decoded
    return (error @ hessian * error).sum()


def test_refit_with_identity_hessian_gives_each_entry_the_mean_of_its_vectors():
    weight, codes, groups, codebooks, _, coded, _ = refit_problem(seed=1)
    entries, _, _ = refit_codebooks(weight, codes, groups, codebooks, None, coded, torch.eye(32), damping=0.0,
                                    rounds=1, iterations=50)  # fmt: skip
    vectors = weight.reshape(48, 16, 2)
    for group in range(2):
        for entry in range(8):
            members = vectors[groups == group][codes[groups == group] == entry]
            if len(members):
                torch.testing.assert_close(entries[group, entry], members.mean(dim=0).half().float(), atol=2e-3, rtol=0)


@pytest.mark.parametrize("kept", [(), (3, 17)])
def test_refit_is_the_least_squares_optimum_of_the_output_error(kept):
    """The objective's gradient in the entries and the kept weights is (about) zero after the refit, and the error
    is below the starting one; with kept columns, their weights are the exact optimum for the coded part."""
    weight, codes, groups, codebooks, scales, coded, hessian = refit_problem(kept)
    initial = codebooks.clone().requires_grad_(True)
    start_kept = weight[:, ~coded].clone().requires_grad_(True)
    start = refit_objective(weight, codes, groups, initial, scales, coded, start_kept, hessian)
    start.backward()
    entries, new_scales, kept_weights = refit_codebooks(
        weight, codes, groups, codebooks, scales, coded, hessian, damping=0.0, rounds=1, iterations=200
    )
    assert torch.equal(new_scales, new_scales.half().float()) and torch.equal(entries, entries.half().float())
    assert kept_weights.shape == (48, len(kept))
    entries = entries.clone().requires_grad_(True)
    kept_weights = kept_weights.clone().requires_grad_(True)
    # the entries are optimal for the scales they were fitted with, the kept weights for the final scales
    fitted = refit_objective(weight, codes, groups, entries, scales, coded, kept_weights.detach(), hessian)
    fitted.backward()
    final = refit_objective(weight, codes, groups, entries.detach(), new_scales, coded, kept_weights, hessian)
    final.backward()
    assert float(final.detach()) < 0.9 * float(start.detach())
    assert float(entries.grad.norm()) < 0.01 * float(initial.grad.norm())  # not 0: entries are rounded to float16
    if kept:
        assert float(kept_weights.grad.norm()) < 1e-4 * float(start_kept.grad.norm())
    # scales: each is its row's closed-form best; nudging any either way raises the error
    for row, factor in [(row, factor) for row in range(0, 48, 7) for factor in (0.98, 1.02)]:
        nudged = new_scales.clone()
        nudged[row] *= factor
        worse = refit_objective(weight, codes, groups, entries.detach(), nudged, coded, kept_weights.detach(), hessian)
        assert float(worse) > float(final)
