"""The tile format: a weight W[out, in] stored as a block-row CSR of dense (BM x BK) tiles."""
from .tiles import SUPPORTED_TILES, TileSparseWeight, check_tile, load_tiles, save_tiles

__all__ = ["SUPPORTED_TILES", "TileSparseWeight", "check_tile", "load_tiles", "save_tiles"]
