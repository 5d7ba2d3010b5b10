"""Message alignment: Procrustes and permutation transports between hidden spaces."""
from __future__ import annotations

import pytest
import torch

from hpcsoup.errors import MergeError
from hpcsoup.merge.align import anchor_nodes, fit_transport, permutation, procrustes


def _orthogonal(d: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    return q


def test_procrustes_recovers_an_orthogonal_map():
    b = torch.randn(300, 12, generator=torch.Generator().manual_seed(1))
    q = _orthogonal(12)
    a = b @ q.t()                     # a = b Q^T  =>  a Q = b
    t = procrustes(a - a.mean(0), b - b.mean(0))
    assert torch.allclose(t, q, atol=1e-4)
    assert torch.allclose(t @ t.t(), torch.eye(12), atol=1e-5)


def test_semi_orthogonal_for_different_widths_round_trips_the_narrow_side():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(200, 6, generator=g)
    b = torch.cat([a @ _orthogonal(6, 3), torch.randn(200, 4, generator=g)], 1)  # 6 -> 10
    transport = fit_transport(a, b, "procrustes")
    assert transport.matrix.shape == (6, 10)
    assert torch.allclose(transport.matrix @ transport.matrix.t(), torch.eye(6), atol=1e-5)
    assert torch.allclose(transport.invert(transport.apply(a)), a, atol=1e-4)
    wide = fit_transport(b, a, "procrustes").matrix  # 10 -> 6: orthonormal columns instead
    assert torch.allclose(wide.t() @ wide, torch.eye(6), atol=1e-5)


def test_permutation_recovers_a_unit_permutation_and_commutes_with_relu():
    b = torch.randn(400, 9, generator=torch.Generator().manual_seed(4)).relu()
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(5))
    a = b[:, perm]
    t = fit_transport(a, b, "permutation").matrix
    assert torch.equal(a @ t, b)
    assert torch.equal((a - 0.3).relu() @ t, ((a @ t) - 0.3).relu())
    assert permutation(a[:, :5], b).shape == (5, 9)  # partial matching for different widths


def test_none_is_the_identity_ablation():
    a = torch.randn(50, 4)
    t = fit_transport(a, torch.randn(50, 6), "none")
    assert torch.equal(t.matrix, torch.eye(4, 6)) and torch.equal(t.apply(a)[:, :4], a)


def test_anchor_nodes_are_seeded_and_sorted():
    first, again = anchor_nodes(1000, 64, seed=3), anchor_nodes(1000, 64, seed=3)
    assert torch.equal(first, again) and first.numel() == 64
    assert bool((first[1:] > first[:-1]).all())
    assert anchor_nodes(1000, 0) is None and anchor_nodes(10, 20) is None


def test_alignment_errors_name_the_problem():
    with pytest.raises(MergeError, match="alignment 'rotate' is unknown"):
        fit_transport(torch.randn(5, 2), torch.randn(5, 2), "rotate")
    with pytest.raises(MergeError, match="same anchor nodes"):
        procrustes(torch.randn(5, 2), torch.randn(6, 2))
    with pytest.raises(MergeError, match="NaN"):
        procrustes(torch.full((4, 2), float("nan")), torch.randn(4, 2))
