import pytest
import torch

from etformer.errors import EtformerError
from etformer.pruning import Pattern, make_mask, mask_sparsity
from etformer.pruning.patterns import group_norms

SHAPES = [(64, 64), (384, 384), (1536, 384), (96, 160)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.75, 0.9])
def test_irregular_row_column_exact(shape, s):
    w = torch.randn(shape)
    for name, groups in (("irregular", w.numel()), ("row", shape[0]), ("column", shape[1])):
        m = make_mask(w, Pattern(name), s)
        assert m.shape == w.shape
        assert mask_sparsity(m) == pytest.approx(round(s * groups) / groups, abs=1e-9)
    rm = make_mask(w, Pattern("row"), s)
    assert torch.all(rm.all(1) | (~rm).all(1))  # whole rows
    cm = make_mask(w, Pattern("column"), s)
    assert torch.all(cm.all(0) | (~cm).all(0))


def _tiles(m, bm, bk):
    o, i = m.shape
    return m.view(o // bm, bm, i // bk, bk).permute(0, 2, 1, 3).flatten(2)


@pytest.mark.parametrize("tile", [(16, 16), (32, 32), (64, 64), (32, 64)])
@pytest.mark.parametrize("s", [0.25, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("name", ["tile", "tile_balanced"])
def test_tile_exact_and_whole(tile, s, name):
    w = torch.randn(384, 768)
    m = make_mask(w, Pattern(name, tile=tile), s)
    t = _tiles(m, *tile)
    assert torch.all(t.all(-1) | (~t).all(-1)), "a tile is partly pruned"
    nbr, nbc = t.shape[:2]
    if name == "tile":
        assert mask_sparsity(m) == pytest.approx(round(s * nbr * nbc) / (nbr * nbc))
    else:
        per_row = (~t.all(-1)).sum(1)
        assert torch.all(per_row == round(s * nbc))


def test_tile_keeps_largest_tiles():
    w = torch.randn(64, 64) * 0.01
    w[:32, 32:] += 5  # one big tile must survive
    m = make_mask(w, Pattern("tile", tile=(32, 32)), 0.75)
    assert m[:32, 32:].all() and not m[32:, :].any() and not m[:32, :32].any()


def test_tile_padding_not_dropped():
    w = torch.randn(100, 70)  # 32x32 tiles overhang both dims
    m = make_mask(w, Pattern("tile", tile=(32, 32)), 0.5)
    assert m.shape == w.shape
    assert 0.3 < mask_sparsity(m) < 0.7


def test_nm_2_4():
    w = torch.randn(128, 256)
    m = make_mask(w, Pattern("nm"), 0.5)
    assert torch.all(m.view(128, -1, 4).sum(-1) == 2)
    kept = (w.abs() * m).view(128, -1, 4)
    dropped = (w.abs() * ~m).view(128, -1, 4)
    assert torch.all(kept.max(-1).values >= dropped.max(-1).values)
    with pytest.raises(EtformerError, match="sparsity 0.5"):
        make_mask(w, Pattern("nm"), 0.7)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_sparsity(bad):
    with pytest.raises(EtformerError, match="sparsity"):
        make_mask(torch.randn(8, 8), Pattern("row"), bad)


def test_bad_pattern_and_tile():
    with pytest.raises(EtformerError, match="unknown pattern"):
        Pattern("diagonal")
    with pytest.raises(EtformerError, match="tensor-core"):
        Pattern("tile", tile=(24, 24))
    with pytest.raises(EtformerError, match="tensor-core"):
        Pattern("tile", tile=(8, 8))


def test_group_norms_match_tiles():
    w = torch.randn(64, 96)
    g = group_norms(w, Pattern("tile", tile=(32, 32)))
    assert g.shape == (6,)
    assert g[1].item() == pytest.approx(w[:32, 32:64].norm().item(), rel=1e-5)
