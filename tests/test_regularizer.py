import pytest
import torch

from etformer.pruning import Pattern, ReweightedGroupLasso
from etformer.pruning.patterns import groups


def _formula(w, prev_groups, pat, lam, eps):
    """The penalty written out group by group, straight from its definition."""
    total = 0.0
    for g, gp in zip(groups(w, pat), prev_groups):
        total = total + g.norm() / (gp.norm() + eps)
    return lam * total


@pytest.mark.parametrize("name", ["irregular", "row", "column", "tile", "tile_balanced", "nm"])
def test_gradient_matches_formula(name):
    pat = Pattern(name, tile=(16, 16))
    w = torch.nn.Parameter(torch.randn(48, 40, dtype=torch.float64))
    reg = ReweightedGroupLasso({"w": (w, pat)}, lam=0.3, eps=1e-3)
    prev = groups(w.detach().clone(), pat)
    with torch.no_grad():
        w.add_(0.1 * torch.randn_like(w))  # move away from the refresh point
    reg.penalty().backward()
    got = w.grad.clone()
    w.grad = None
    _formula(w, prev, pat, 0.3, 1e-3).backward()
    assert torch.allclose(got, w.grad, rtol=1e-10, atol=1e-12)
    # closed form: d/dW_g = lam * W_g / (||W_g|| (||W_g^prev|| + eps))
    g = groups(w.detach(), pat)
    closed = 0.3 * g / (g.norm(dim=1, keepdim=True) * (prev.norm(dim=1, keepdim=True) + 1e-3))
    assert torch.allclose(groups(got, pat), closed, rtol=1e-8, atol=1e-12)


def test_refresh_schedule_and_zero_groups():
    w = torch.nn.Parameter(torch.randn(32, 32))
    with torch.no_grad():
        w[:16, :16] = 0  # an all-zero tile: finite penalty, zero gradient
    reg = ReweightedGroupLasso({"w": (w, Pattern("tile", tile=(16, 16)))}, lam=1.0, refresh_every=3)
    p = reg.penalty()
    p.backward()
    assert torch.isfinite(p) and torch.all(torch.isfinite(w.grad))
    assert torch.all(w.grad[:16, :16] == 0)
    assert float(p) == pytest.approx(3.0, rel=1e-3)  # three nonzero tiles at their own norm: ~1 each
    before = reg.prev["w"].clone()
    with torch.no_grad():
        w.mul_(2)
    reg.step(1)
    reg.step(2)
    assert torch.equal(reg.prev["w"], before)
    reg.step(3)
    assert torch.allclose(reg.prev["w"], 2 * before)


@pytest.mark.parametrize("name,s", [("tile", 0.5), ("tile_balanced", 0.75), ("row", 0.3), ("nm", 0.5)])
def test_admm_projection_is_exact_and_closest(name, s):
    from etformer.pruning.patterns import make_mask, mask_sparsity
    from etformer.pruning.regularizers import ADMM

    pat = Pattern(name, tile=(16, 16))
    v = torch.randn(64, 48, dtype=torch.float64)
    z = ADMM.project(v, pat, s)
    m = make_mask(v, pat, s)
    assert torch.equal(z != 0, m) and mask_sparsity(z != 0) == mask_sparsity(m)
    # no other mask of the pattern at this sparsity is closer: try random ones of the same group count
    best = (v - z).norm()
    g = groups(v, pat)
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        other = make_mask(v, pat, s, scores=torch.rand(g.shape[0], generator=gen, dtype=torch.float64)) \
            if name != "nm" else None
        if other is not None and mask_sparsity(other) == mask_sparsity(m):
            assert (v - v * other).norm() >= best - 1e-12


def test_admm_dual_update_and_penalty():
    from etformer.pruning.regularizers import ADMM

    w = torch.nn.Parameter(torch.randn(32, 32))
    pat = Pattern("tile", tile=(16, 16))
    a = ADMM({"w": (w, pat, 0.5)}, rho=0.1, update_every=2)
    z0 = a.Z["w"].clone()
    assert torch.equal(z0, ADMM.project(w.detach(), pat, 0.5))  # U starts at zero
    with torch.no_grad():
        w.add_(0.3)
    a.step(1)  # not on the schedule: nothing moves
    assert torch.equal(a.Z["w"], z0) and torch.all(a.U["w"] == 0)
    a.step(2)
    z1 = ADMM.project(w.detach(), pat, 0.5)
    assert torch.equal(a.Z["w"], z1)
    assert torch.allclose(a.U["w"], w.detach() - z1)
    pen = a.penalty()
    assert float(pen) == pytest.approx(0.05 * float((w.detach() - z1 + a.U["w"]).pow(2).sum()), rel=1e-6)
    pen.backward()
    assert torch.allclose(w.grad, 0.1 * (w.detach() - z1 + a.U["w"]), atol=1e-6)
