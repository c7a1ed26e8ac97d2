import torch

from compress.solvers.codebooks import (
    balanced_groups,
    neighbour_table,
    proximal_assign,
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
