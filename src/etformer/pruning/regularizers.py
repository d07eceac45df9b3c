"""The reweighted group lasso: lambda * sum_g ||W_g||_2 / (||W_g^prev||_2 + eps), over each pattern's groups.

The denominators are frozen copies of the group norms, refreshed every `refresh_every` steps: groups that are
already small get a large weight and are pushed to exactly zero, large groups are left nearly alone. This is the
reweighted l1 idea (Candes, Wakin and Boyd) applied to groups, as E.T. uses it for tensor tiles.
"""
from __future__ import annotations

import torch

from .patterns import group_norms


def _get(src) -> torch.Tensor:
    """A weight given as a tensor, or as something with .weight() (a Matrix: possibly a row slice)."""
    return src.weight() if hasattr(src, "weight") and callable(src.weight) else src


class ReweightedGroupLasso:
    def __init__(self, params: dict[str, tuple], lam: float, eps: float = 1e-3,
                 refresh_every: int = 50):
        if lam < 0 or eps <= 0 or refresh_every < 1:
            raise ValueError("need lam >= 0, eps > 0 and refresh_every >= 1")
        self.params = params
        self.lam, self.eps, self.refresh_every = float(lam), float(eps), int(refresh_every)
        self.prev: dict[str, torch.Tensor] = {}
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        self.prev = {n: group_norms(_acc(_get(p).detach()), pat) for n, (p, pat) in self.params.items()}

    def step(self, step: int) -> None:
        """Call once per optimizer step (0-based) before computing the penalty."""
        if step > 0 and step % self.refresh_every == 0:
            self.refresh()

    def penalty(self) -> torch.Tensor:
        total = None
        for n, (p, pat) in self.params.items():
            term = (group_norms(_acc(_get(p)), pat) / (self.prev[n] + self.eps)).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return self.lam * total


def _acc(p: torch.Tensor) -> torch.Tensor:
    """At least fp32 for the norms (fp16/bf16 weights), and fp64 kept as it is."""
    return p.to(torch.promote_types(p.dtype, torch.float32))


class ADMM:
    """ADMM pruning (E.T. used it for its Transformer): minimise loss + rho/2 * ||W - Z + U||^2 where Z is the
    Euclidean projection of W + U onto the pattern's sparse set, and the scaled dual U accumulates W - Z.

    Every `update_every` steps: Z <- project(W + U), then U <- U + W - Z. After training, the hard prune keeps
    exactly Z's support.
    """

    def __init__(self, params: dict[str, tuple], rho: float = 1e-3,
                 update_every: int = 25):
        if rho <= 0 or update_every < 1:
            raise ValueError("need rho > 0 and update_every >= 1")
        self.params, self.rho, self.update_every = params, float(rho), int(update_every)
        self.U = {n: torch.zeros_like(_get(p), dtype=torch.float32) for n, (p, _, _) in params.items()}
        self.Z: dict[str, torch.Tensor] = {}
        self.project_all()

    @staticmethod
    def project(v: torch.Tensor, pattern, sparsity: float) -> torch.Tensor:
        """Closest matrix to v (Frobenius) with the pattern's sparsity: keep the largest groups, zero the rest."""
        from .patterns import make_mask

        return v * make_mask(v, pattern, sparsity)

    @torch.no_grad()
    def project_all(self) -> None:
        for n, (p, pat, s) in self.params.items():
            self.Z[n] = self.project(_get(p).detach().float() + self.U[n], pat, s)

    @torch.no_grad()
    def dual_update(self) -> None:
        self.project_all()
        for n, (p, _, _) in self.params.items():
            self.U[n] += _get(p).detach().float() - self.Z[n]

    def step(self, step: int) -> None:
        if step > 0 and step % self.update_every == 0:
            self.dual_update()

    def penalty(self) -> torch.Tensor:
        total = None
        for n, (p, _, _) in self.params.items():
            term = (_get(p).float() - self.Z[n] + self.U[n]).pow(2).sum()
            total = term if total is None else total + term
        return 0.5 * self.rho * total if total is not None else torch.zeros(())
