import pytest
import torch

from kvdistill.errors import KvdistillError
from kvdistill.fuse.latent import LatentSpace, kv_features, pca_whitener, procrustes


def test_kv_features_layout():
    k = torch.arange(2 * 3 * 4 * 5, dtype=torch.float).view(2, 3, 4, 5)  # (B, H, T, D)
    v = -k
    f = kv_features(k, v)  # (B, T, 2·H·D)
    assert f.shape == (2, 4, 30)
    assert torch.equal(f[1, 2, :15], k[1, :, 2, :].reshape(-1))
    assert torch.equal(f[1, 2, 15:], v[1, :, 2, :].reshape(-1))


def test_pca_whitener_gives_identity_covariance_on_kept_directions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=g) @ torch.randn(8, 8, generator=g) + 3.0
    mean, proj = pca_whitener(x, torch.ones(500), dim=5)
    z = (x - mean) @ proj  # (N, 5)
    cov = z.T @ z / 500
    torch.testing.assert_close(cov, torch.eye(5), atol=1e-4, rtol=0)
    torch.testing.assert_close(mean, x.mean(0), atol=1e-4, rtol=0)


def test_pca_whitener_weights_equal_repeating_samples():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=g)
    w = torch.randint(1, 4, (40,), generator=g).float()
    repeated = torch.repeat_interleave(x, w.long(), dim=0)
    m1, p1 = pca_whitener(x, w, dim=6)
    m2, p2 = pca_whitener(repeated, torch.ones(len(repeated)), dim=6)
    torch.testing.assert_close(m1, m2, atol=1e-5, rtol=0)
    torch.testing.assert_close(p1.abs(), p2.abs(), atol=1e-4, rtol=1e-3)  # directions up to sign


def test_pca_whitener_rank_deficient_leaves_zero_columns():
    x = torch.randn(100, 2) @ torch.randn(2, 6)  # rank 2 in 6 dims
    _, proj = pca_whitener(x, torch.ones(100), dim=4)
    assert proj[:, 2:].abs().max() == 0
    assert proj[:, :2].abs().max() > 0


def test_pca_whitener_needs_tokens():
    with pytest.raises(KvdistillError, match="two real tokens"):
        pca_whitener(torch.randn(1, 4), torch.ones(1), dim=2)


def test_procrustes_recovers_rotation():
    g = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    a = torch.randn(50, 6, generator=g)
    r = procrustes(a, a @ q, torch.ones(50))
    torch.testing.assert_close(r, q, atol=1e-5, rtol=0)
    torch.testing.assert_close(r @ r.T, torch.eye(6), atol=1e-5, rtol=0)


def test_latent_space_makes_linearly_related_teachers_agree():
    """Teacher b's features are an invertible linear map of teacher a's (+ offset), in another width:
    after fitting, both encode the same token to the same point of Z."""
    g = torch.Generator().manual_seed(3)
    n, d = 400, 6
    base = torch.randn(n, d, generator=g) * torch.linspace(3, 0.5, d)
    xa = base @ torch.randn(d, 10, generator=g)  # width 10, rank 6
    xb = base @ torch.randn(d, 7, generator=g) + 1.5  # width 7, rank 6
    space = LatentSpace({"a": {0: 10}, "b": {0: 7}}, dim=d)
    w = torch.ones(n)
    space.fit({("a", 0): (xa, w), ("b", 0): (xb, w)}, {("b", 0): (xb, xa, w)}, reference="a")
    za, zb = space.encode("a", 0, xa), space.encode("b", 0, xb)
    torch.testing.assert_close(zb, za, atol=2e-3, rtol=0)
    assert torch.allclose(za.T @ za / n, torch.eye(d), atol=1e-3)


def test_latent_space_refuses_before_fit_and_checkpoints_its_maps():
    space = LatentSpace({"a": {1: 4}}, dim=2)
    with pytest.raises(KvdistillError, match="before it was fitted"):
        space.encode("a", 1, torch.zeros(1, 3, 4))
    state = space.state_dict()
    assert {"a__1__mean", "a__1__proj", "fitted"} <= set(state)
