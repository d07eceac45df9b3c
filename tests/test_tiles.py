import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from etformer.errors import EtformerError
from etformer.pruning import Pattern, make_mask
from etformer.sparse import TileSparseWeight, load_tiles, save_tiles

TILES = [(16, 16), (32, 32), (64, 64), (16, 64), (64, 32)]


@settings(max_examples=60, deadline=None)
@given(out=st.integers(1, 200), inn=st.integers(1, 200), tile=st.sampled_from(TILES),
       density=st.floats(0.0, 1.0), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       balanced=st.booleans(), seed=st.integers(0, 2**16))
def test_round_trip_exact(out, inn, tile, density, dtype, balanced, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g).to(dtype)
    nbr, nbc = -(-out // tile[0]), -(-inn // tile[1])
    keep_tiles = torch.rand(nbr, nbc, generator=g) < density
    full = keep_tiles.repeat_interleave(tile[0], 0).repeat_interleave(tile[1], 1)[:out, :inn]
    w = w * full
    t = TileSparseWeight.from_dense(w, tile, balanced=balanced)
    assert torch.equal(t.to_dense(), w)
    assert t.to_dense().dtype == dtype
    assert t.values.shape[1:] == tile
    if balanced:
        assert t.is_balanced
        assert t.balanced_col_idx().shape[0] == nbr
    else:
        expected = keep_tiles & _nonzero_tiles(w, tile)  # a kept tile of all zeros is not stored
        assert torch.equal(t.tile_mask(), expected) and t.nnz_tiles == int(expected.sum())


def _nonzero_tiles(w, tile):
    out, inn = w.shape
    nbr, nbc = -(-out // tile[0]), -(-inn // tile[1])
    p = torch.zeros(nbr * tile[0], nbc * tile[1])
    p[:out, :inn] = w.float()
    return p.view(nbr, tile[0], nbc, tile[1]).ne(0).any(3).any(1)


def test_empty_block_row_and_dense():
    w = torch.randn(96, 64)
    w[32:64] = 0
    t = TileSparseWeight.from_dense(w, (32, 32))
    assert t.tiles_per_row.tolist() == [2, 0, 2]
    assert torch.equal(t.to_dense(), w)
    d = TileSparseWeight.from_dense(torch.randn(64, 64), (16, 16))
    assert d.density == 1.0
    z = TileSparseWeight.from_dense(torch.zeros(64, 64), (16, 16))
    assert z.nnz_tiles == 0 and torch.equal(z.to_dense(), torch.zeros(64, 64))


def test_from_mask_matches_pattern():
    w = torch.randn(384, 384)
    m = make_mask(w, Pattern("tile_balanced", tile=(32, 32)), 0.5)
    t = TileSparseWeight.from_dense(w, (32, 32), mask=m)
    assert t.is_balanced and t.density == 0.5
    assert torch.equal(t.to_dense(), w * m)


def test_save_load(tmp_path):
    ws = {"a": TileSparseWeight.from_dense(torch.randn(64, 96) * (torch.rand(64, 96) > 0.9), (16, 16)),
          "b": TileSparseWeight.from_dense(torch.randn(40, 33).half(), (32, 32))}
    p = tmp_path / "t.safetensors"
    save_tiles(str(p), ws, {"plan": "x"})
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
    back, extra = load_tiles(str(p))
    assert extra == {"plan": "x"}
    for k in ws:
        assert torch.equal(back[k].to_dense(), ws[k].to_dense()) and back[k].tile == ws[k].tile


def test_corrupt_and_truncated(tmp_path):
    p = tmp_path / "t.safetensors"
    save_tiles(str(p), {"a": TileSparseWeight.from_dense(torch.randn(64, 64), (32, 32))})
    data = p.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(EtformerError, match="corrupt or truncated"):
        load_tiles(str(tmp_path / "trunc.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(EtformerError, match="corrupt or truncated"):
        load_tiles(str(tmp_path / "junk.safetensors"))
    with pytest.raises(EtformerError, match="does not exist"):
        load_tiles(str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize("field,value,message", [
    ("col_idx", [0, 5, 0, 1], "outside"),
    ("row_ptr", [0, 3, 2], "row_ptr"),
    ("col_idx", [1, 0, 0, 1], "increasing"),
    ("values", "int32", "fp16, bf16 or fp32"),
])
def test_validation_catches_bad_fields(tmp_path, field, value, message):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    p = tmp_path / "t.safetensors"
    save_tiles(str(p), {"a": TileSparseWeight.from_dense(torch.randn(64, 64), (32, 32))})
    with safe_open(str(p), "pt") as f:
        meta = f.metadata()
    bad = load_file(str(p))
    key = f"a/{field}"
    bad[key] = bad[key].to(torch.int32) if value == "int32" else torch.tensor(value, dtype=torch.int32)
    save_file(bad, str(p), metadata=meta)
    with pytest.raises(EtformerError, match=message):
        load_tiles(str(p))


def test_bad_inputs():
    with pytest.raises(EtformerError, match="2-D"):
        TileSparseWeight.from_dense(torch.randn(4, 4, 4), (16, 16))
    with pytest.raises(EtformerError, match="tensor-core"):
        TileSparseWeight.from_dense(torch.randn(64, 64), (8, 8))
    with pytest.raises(EtformerError, match="fp16"):
        TileSparseWeight.from_dense(torch.ones(64, 64, dtype=torch.int64), (16, 16))


def test_atomic_write_json_keeps_the_old_file_on_failure(tmp_path):
    """A failed write leaves the previous file whole and no temporary file behind; a good one replaces it."""
    import json

    from etformer.sparse.tiles import atomic_write_json

    p = tmp_path / "r.json"
    atomic_write_json(str(p), {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(str(p), {"a": object()})  # not serialisable: fails mid-write
    assert json.loads(p.read_text()) == {"a": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["r.json"]
    atomic_write_json(str(p), {"b": [2, 3]}, indent=2)
    assert json.loads(p.read_text()) == {"b": [2, 3]}


def test_atomic_write_text_replaces_whole_and_rejects_non_text(tmp_path):
    """atomic_write_text writes the string exactly, replaces an older file, and refuses bytes without touching it."""
    from etformer.sparse.tiles import atomic_write_text

    p = tmp_path / "r.md"
    atomic_write_text(str(p), "| a |\n|---|\n")
    atomic_write_text(str(p), "second\n")
    assert p.read_text() == "second\n"
    with pytest.raises(TypeError, match="str"):
        atomic_write_text(str(p), b"bytes")
    assert p.read_text() == "second\n"
    assert [f.name for f in tmp_path.iterdir()] == ["r.md"]
