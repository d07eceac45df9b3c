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
