"""Sparsity patterns: which groups of weights are pruned together, and the exact-sparsity masks they give.

Every pattern views W[out, in] as groups (rows of a [G, group_size] matrix):

    irregular      one weight per group (magnitude pruning)
    row            a row of W: one output feature (for W_V, a column of V that vanishes)
    column         a column of W: one input feature
    tile           a (BM x BK) tile; the lowest-norm tiles of the whole matrix go
    tile_balanced  a (BM x BK) tile; every block-row loses the same number of tiles
    nm             N:M, e.g. 2:4 — in each run of M weights along the input dim, N are kept

The same grouping drives the reweighted group lasso (regularizers.py) and the hard prune (make_mask), so the
regularizer pushes to zero exactly what the prune will remove.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import EtformerError
from ..sparse.tiles import check_tile

PATTERNS = ("irregular", "row", "column", "tile", "tile_balanced", "nm")


@dataclass(frozen=True)
class Pattern:
    name: str
    tile: tuple[int, int] = (32, 32)
    n: int = 2
    m: int = 4

    def __post_init__(self):
        if self.name not in PATTERNS:
            raise EtformerError(f"unknown pattern {self.name!r}; choose one of: {', '.join(PATTERNS)}")
        if self.name.startswith("tile"):
            object.__setattr__(self, "tile", check_tile(self.tile))
        if self.name == "nm" and not (0 < self.n < self.m):
            raise EtformerError(f"N:M pattern needs 0 < N < M, got {self.n}:{self.m}")

    @property
    def fixed_sparsity(self) -> float | None:
        return 1 - self.n / self.m if self.name == "nm" else None


def check_sparsity(sparsity: float, pattern: Pattern | None = None) -> float:
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise EtformerError(f"sparsity {sparsity!r} is not a number") from None
    if not 0.0 <= s < 1.0:
        raise EtformerError(f"sparsity must be in [0, 1), got {s}")
    if pattern is not None and pattern.fixed_sparsity is not None and s != 0.0 and abs(s - pattern.fixed_sparsity) > 1e-9:
        raise EtformerError(f"pattern {pattern.n}:{pattern.m} has sparsity {pattern.fixed_sparsity:g}, not {s:g}")
    return s


def _pad_to(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    r, c = w.shape
    if r == rows and c == cols:
        return w
    return torch.nn.functional.pad(w, (0, cols - c, 0, rows - r))


def groups(w: torch.Tensor, p: Pattern) -> torch.Tensor:
    """W viewed as [G, group_size]; differentiable, zero-padded where a tile or N:M run overhangs."""
    if w.dim() != 2:
        raise EtformerError(f"weight must be 2-D, got shape {tuple(w.shape)}")
    o, i = w.shape
    if p.name == "irregular":
        return w.reshape(-1, 1)
    if p.name == "row":
        return w
    if p.name == "column":
        return w.t()
    if p.name == "nm":
        ip = -(-i // p.m) * p.m
        return _pad_to(w, o, ip).reshape(-1, p.m)
    bm, bk = p.tile
    nbr, nbc = -(-o // bm), -(-i // bk)
    wp = _pad_to(w, nbr * bm, nbc * bk)
    return wp.view(nbr, bm, nbc, bk).permute(0, 2, 1, 3).reshape(nbr * nbc, bm * bk)


def group_norms(w: torch.Tensor, p: Pattern) -> torch.Tensor:
    """L2 norm of each group, [G]."""
    return torch.linalg.vector_norm(groups(w, p), dim=1)


def _expand(keep: torch.Tensor, w: torch.Tensor, p: Pattern) -> torch.Tensor:
    """Per-group keep [G] (or [G, group_size] for nm) -> element mask shaped like w."""
    o, i = w.shape
    if p.name == "irregular":
        return keep.view(o, i)
    if p.name == "row":
        return keep.view(o, 1).expand(o, i).clone()
    if p.name == "column":
        return keep.view(1, i).expand(o, i).clone()
    if p.name == "nm":
        ip = -(-i // p.m) * p.m
        return keep.view(o, ip)[:, :i].clone()
    bm, bk = p.tile
    nbr, nbc = -(-o // bm), -(-i // bk)
    full = keep.view(nbr, nbc, 1, 1).expand(nbr, nbc, bm, bk).permute(0, 2, 1, 3).reshape(nbr * bm, nbc * bk)
    return full[:o, :i].clone()


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k lowest scores (ties broken by position, deterministic)."""
    off = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        order = torch.argsort(scores, stable=True)
        off[order[:k]] = True
    return off


@torch.no_grad()
def make_mask(w: torch.Tensor, p: Pattern, sparsity: float, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Bool keep-mask shaped like w that prunes `sparsity` of w's groups by the pattern, lowest group norm first.

    The count of pruned groups is round(sparsity * G) (per block-row for tile_balanced), so the element sparsity is
    exact whenever the pattern's groups divide the matrix evenly.
    """
    s = check_sparsity(sparsity, p)
    wf = w.detach().float()
    if p.name == "nm":
        if s == 0.0:
            return torch.ones_like(w, dtype=torch.bool)
        g = groups(wf.abs(), p)  # [G, m]
        order = torch.argsort(g, dim=1, descending=True, stable=True)
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(1, order[:, : p.n], True)
        return _expand(keep, w, p)
    sc = group_norms(wf, p) if scores is None else scores.float()
    if p.name.startswith("tile"):
        size = group_sizes(w.shape, p).to(sc.device)
        sc = sc / size.sqrt()  # RMS: an overhanging edge tile is judged by its real weights, not its padding
    if p.name == "tile_balanced":
        bm, bk = p.tile
        nbr, nbc = -(-w.shape[0] // bm), -(-w.shape[1] // bk)
        sc2 = sc.view(nbr, nbc)
        k = int(round(s * nbc))
        off = torch.stack([_lowest(sc2[r], k) for r in range(nbr)]) if nbr else sc2.bool()
        return _expand(~off.flatten(), w, p)
    if p.name == "tile":  # prune lowest-RMS tiles until the pruned element count is nearest the target
        order = torch.argsort(sc, stable=True)
        cum = torch.cumsum(size[order], 0)
        target = s * w.numel()
        k = int(torch.argmin((torch.cat([cum.new_zeros(1), cum]) - target).abs()))
        off = torch.zeros_like(sc, dtype=torch.bool)
        off[order[:k]] = True
        return _expand(~off, w, p)
    k = int(round(s * sc.numel()))
    return _expand(~_lowest(sc, k), w, p)


def group_sizes(shape, p: Pattern) -> torch.Tensor:
    """Number of real (unpadded) weights in each tile group, [G] float."""
    o, i = shape
    bm, bk = p.tile
    nbr, nbc = -(-o // bm), -(-i // bk)
    rows = torch.full((nbr,), float(bm))
    rows[-1] = o - bm * (nbr - 1)
    cols = torch.full((nbc,), float(bk))
    cols[-1] = i - bk * (nbc - 1)
    return (rows[:, None] * cols[None, :]).flatten()


def mask_sparsity(mask: torch.Tensor) -> float:
    return 1.0 - int(mask.count_nonzero()) / max(1, mask.numel())
