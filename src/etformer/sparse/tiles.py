"""TileSparseWeight: a block-row CSR of dense tiles, with a balanced form, exact dense round trip and safetensors I/O.

Layout for W[out, in] and tile (BM, BK), after padding W to (ceil(out/BM)*BM, ceil(in/BK)*BK):

    row_ptr  int32 [n_block_rows + 1]   block-row r holds tiles row_ptr[r] : row_ptr[r+1]
    col_idx  int32 [nnz_tiles]          tile column (in units of BK) of each kept tile, increasing within a row
    values   dtype [nnz_tiles, BM, BK]  the tiles, each contiguous, so a kernel reads a tile as one block

A block-row is BM output features; a kernel computing Y = X W^T for an output block of BM columns loops over that
block-row's kept tiles only. In the balanced form every block-row keeps the same number of tiles, so col_idx is
read as [n_block_rows, tiles_per_row] and the work per program is equal.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import torch

from ..errors import EtformerError

FORMAT_VERSION = 1
# Tile shapes the tensor-core kernels take: both sides multiples of 16 (the fp16/bf16 MMA K step), at most 128.
SUPPORTED_TILES = tuple((a, b) for a in (16, 32, 64, 128) for b in (16, 32, 64, 128))
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tile(tile) -> tuple[int, int]:
    """Validate a tile shape for the hardware path; returns it as a tuple."""
    try:
        bm, bk = (int(tile), int(tile)) if isinstance(tile, int) else (int(tile[0]), int(tile[1]))
    except (TypeError, ValueError, IndexError):
        raise EtformerError(f"tile shape {tile!r} must be an int or a pair like (32, 32)") from None
    if (bm, bk) not in SUPPORTED_TILES:
        raise EtformerError(
            f"tile shape {bm}x{bk} cannot run on the tensor-core path: each side must be 16, 32, 64 or 128")
    return bm, bk


def parse_tile(text: str) -> tuple[int, int]:
    """'32' or '32x32' -> (32, 32)."""
    parts = str(text).lower().replace("×", "x").split("x")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise EtformerError(f"tile shape {text!r} must look like 32 or 32x32") from None
    return check_tile(vals[0] if len(vals) == 1 else tuple(vals))


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class TileSparseWeight:
    out_features: int
    in_features: int
    tile: tuple[int, int]
    row_ptr: torch.Tensor  # int32 [n_block_rows + 1]
    col_idx: torch.Tensor  # int32 [nnz]
    values: torch.Tensor  # [nnz, BM, BK]

    def __post_init__(self):
        self.tile = check_tile(self.tile)
        self.validate()

    # ---------------------------------------------------------------- shape facts
    @property
    def n_block_rows(self) -> int:
        return _ceil(self.out_features, self.tile[0])

    @property
    def n_block_cols(self) -> int:
        return _ceil(self.in_features, self.tile[1])

    @property
    def nnz_tiles(self) -> int:
        return int(self.col_idx.numel())

    @property
    def density(self) -> float:
        return self.nnz_tiles / max(1, self.n_block_rows * self.n_block_cols)

    @property
    def tiles_per_row(self) -> torch.Tensor:
        """Kept tiles per block-row, int64 on the CPU."""
        return self._host_counts

    @property
    def max_tiles_per_row(self) -> int:
        c = self._host_counts
        return int(c.max()) if c.numel() else 0

    @property
    def is_balanced(self) -> bool:
        t = self.tiles_per_row
        return bool(t.numel() == 0 or torch.all(t == t[0]))

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, device=None, dtype=None) -> "TileSparseWeight":
        return TileSparseWeight(self.out_features, self.in_features, self.tile, self.row_ptr.to(device),
                                self.col_idx.to(device), self.values.to(device=device, dtype=dtype))

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        bm, bk = self.tile
        nbr, nbc = self.n_block_rows, self.n_block_cols
        if self.out_features <= 0 or self.in_features <= 0:
            raise EtformerError(f"weight shape ({self.out_features}, {self.in_features}) must be positive")
        if self.row_ptr.dtype != torch.int32 or self.col_idx.dtype != torch.int32:
            raise EtformerError(f"row_ptr and col_idx must be int32, got {self.row_ptr.dtype} and {self.col_idx.dtype}")
        if self.values.dtype not in FLOAT_DTYPES:
            raise EtformerError(f"tile values must be fp16, bf16 or fp32, got {self.values.dtype}")
        if tuple(self.row_ptr.shape) != (nbr + 1,):
            raise EtformerError(f"row_ptr has shape {tuple(self.row_ptr.shape)}, expected ({nbr + 1},)")
        nnz = self.col_idx.numel()
        if self.col_idx.dim() != 1 or tuple(self.values.shape) != (nnz, bm, bk):
            raise EtformerError(f"values has shape {tuple(self.values.shape)}, expected ({nnz}, {bm}, {bk})")
        rp = self.row_ptr.cpu().to(torch.int64)
        # host-side facts the launchers need, kept here so no launch ever reads them back from the GPU
        # (a device-to-host read inside CUDA-graph capture is an error)
        self._host_counts = (rp[1:] - rp[:-1]) if rp.numel() > 1 else torch.zeros(0, dtype=torch.int64)
        if int(rp[0]) != 0 or int(rp[-1]) != nnz or bool(torch.any(rp[1:] < rp[:-1])):
            raise EtformerError("row_ptr must start at 0, end at the tile count and never decrease")
        ci = self.col_idx.cpu().to(torch.int64)
        if nnz and (int(ci.min()) < 0 or int(ci.max()) >= nbc):
            raise EtformerError(f"col_idx holds a tile column outside [0, {nbc})")
        # strictly increasing within each block-row (no duplicates)
        if nnz > 1:
            same_row = torch.ones(nnz - 1, dtype=torch.bool)
            starts = rp[1:-1]
            starts = starts[(starts > 0) & (starts < nnz)]
            same_row[starts - 1] = False
            if bool(torch.any((ci[1:] <= ci[:-1]) & same_row)):
                raise EtformerError("col_idx must be strictly increasing within each block-row")

    # ---------------------------------------------------------------- conversions
    @classmethod
    def from_dense(cls, weight: torch.Tensor, tile=(32, 32), mask: torch.Tensor | None = None,
                   balanced: bool = False) -> "TileSparseWeight":
        """Keep every tile that holds a nonzero (or, with `mask`, a kept element). Exact: to_dense() gives W back.

        With balanced=True each block-row is padded with explicit zero tiles up to the largest row's count.
        """
        bm, bk = check_tile(tile)
        if weight.dim() != 2:
            raise EtformerError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        if weight.dtype not in FLOAT_DTYPES:
            raise EtformerError(f"weight must be fp16, bf16 or fp32, got {weight.dtype}")
        out_f, in_f = weight.shape
        nbr, nbc = _ceil(out_f, bm), _ceil(in_f, bk)
        padded = weight.new_zeros(nbr * bm, nbc * bk)
        padded[:out_f, :in_f] = weight
        tiles = padded.view(nbr, bm, nbc, bk).permute(0, 2, 1, 3)  # (nbr, nbc, bm, bk)
        if mask is None:
            keep = tiles.ne(0).flatten(2).any(-1)
        else:
            if mask.shape != weight.shape:
                raise EtformerError(f"mask shape {tuple(mask.shape)} differs from weight shape {tuple(weight.shape)}")
            pm = torch.zeros(nbr * bm, nbc * bk, dtype=torch.bool, device=weight.device)
            pm[:out_f, :in_f] = mask.bool()
            keep = pm.view(nbr, bm, nbc, bk).permute(0, 2, 1, 3).flatten(2).any(-1)
            tiles = tiles * pm.view(nbr, bm, nbc, bk).permute(0, 2, 1, 3).to(weight.dtype)
        if balanced and nbr:
            need = int(keep.sum(1).max())
            keep = keep.clone()
            for r in range(nbr):  # add zero tiles, lowest free columns first, until each row has `need`
                short = need - int(keep[r].sum())
                if short > 0:
                    free = torch.nonzero(~keep[r]).flatten()[:short]
                    keep[r, free] = True
        counts = keep.sum(1)
        row_ptr = torch.zeros(nbr + 1, dtype=torch.int32)
        row_ptr[1:] = torch.cumsum(counts.cpu(), 0).to(torch.int32)
        rows, cols = torch.nonzero(keep, as_tuple=True)  # row-major: sorted by row, then column
        values = tiles[rows, cols].contiguous()
        return cls(out_f, in_f, (bm, bk), row_ptr.to(weight.device), cols.to(torch.int32), values)

    def to_dense(self) -> torch.Tensor:
        bm, bk = self.tile
        nbr, nbc = self.n_block_rows, self.n_block_cols
        rows = torch.repeat_interleave(torch.arange(nbr, device=self.device), self.tiles_per_row.to(self.device))
        tiles = self.values.new_zeros(nbr, nbc, bm, bk)
        tiles[rows, self.col_idx.long()] = self.values
        return tiles.permute(0, 2, 1, 3).reshape(nbr * bm, nbc * bk)[: self.out_features, : self.in_features].clone()

    def tile_mask(self) -> torch.Tensor:
        """Bool [n_block_rows, n_block_cols]: which tiles are stored."""
        m = torch.zeros(self.n_block_rows, self.n_block_cols, dtype=torch.bool)
        rows = torch.repeat_interleave(torch.arange(self.n_block_rows), self.tiles_per_row.cpu())
        m[rows, self.col_idx.cpu().long()] = True
        return m

    def balanced_col_idx(self) -> torch.Tensor:
        """col_idx as [n_block_rows, tiles_per_row]; only for the balanced form."""
        if not self.is_balanced:
            raise EtformerError("this TileSparseWeight is not balanced; build it with balanced=True")
        return self.col_idx.view(self.n_block_rows, -1)

    # ---------------------------------------------------------------- tensors for safetensors
    def state(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {f"{prefix}row_ptr": self.row_ptr.contiguous().cpu(), f"{prefix}col_idx": self.col_idx.contiguous().cpu(),
                f"{prefix}values": self.values.contiguous().cpu()}

    def meta(self) -> dict:
        return {"out_features": self.out_features, "in_features": self.in_features, "tile": list(self.tile)}


def atomic_write(path: str, write) -> None:
    """Write through a temporary file in the same folder, then rename over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write a string to path through atomic_write."""
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text takes a str, not {type(text).__name__}")

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def atomic_write_json(path: str, obj, indent: int = 1) -> None:
    """json.dump obj to path through atomic_write."""
    import json

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)
    atomic_write(path, write)


def save_tiles(path: str, weights: dict[str, TileSparseWeight], extra_meta: dict | None = None) -> None:
    """Save named TileSparseWeights into one safetensors file (written to a temporary name, then renamed)."""
    from safetensors.torch import save_file

    tensors, meta = {}, {}
    for name, w in weights.items():
        if "/" in name:
            raise EtformerError(f"weight name {name!r} may not contain '/'")
        tensors.update(w.state(f"{name}/"))
        meta[name] = w.meta()
    header = {"etformer_format": str(FORMAT_VERSION), "weights": json.dumps(meta)}
    if extra_meta:
        header["extra"] = json.dumps(extra_meta)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def load_tiles(path: str, device="cpu") -> tuple[dict[str, TileSparseWeight], dict]:
    """Load and validate a file written by save_tiles. Raises EtformerError on a missing, truncated or corrupt file."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise EtformerError(f"tile checkpoint {path} does not exist")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except EtformerError:
        raise
    except Exception as e:
        raise EtformerError(f"tile checkpoint {path} is corrupt or truncated: {str(e).splitlines()[0]}") from e
    if header.get("etformer_format") != str(FORMAT_VERSION):
        raise EtformerError(f"{path} is not an etformer tile file (format {header.get('etformer_format')!r})")
    try:
        meta = json.loads(header["weights"])
        extra = json.loads(header.get("extra", "{}"))
    except (KeyError, json.JSONDecodeError) as e:
        raise EtformerError(f"{path}: unreadable metadata ({e})") from e
    out = {}
    for name, m in meta.items():
        try:
            w = TileSparseWeight(int(m["out_features"]), int(m["in_features"]), tuple(m["tile"]),
                                 tensors[f"{name}/row_ptr"], tensors[f"{name}/col_idx"], tensors[f"{name}/values"])
        except KeyError as e:
            raise EtformerError(f"{path}: weight {name!r} lacks {e}") from None
        except EtformerError as e:
            raise EtformerError(f"{path}: weight {name!r}: {e}") from None
        out[name] = w.to(device) if str(device) != "cpu" else w
    return out, extra
