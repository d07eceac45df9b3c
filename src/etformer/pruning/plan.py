"""A pruning plan: the pattern and sparsity of each matrix kind, and the tile shape, saved with the checkpoint."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import EtformerError
from ..models import MATRIX_KINDS
from ..sparse.tiles import check_tile
from .patterns import Pattern, check_sparsity

# 128 output features x 64 inputs. On the H200 this shape is the fastest of 16x16 ... 128x128 for the tile-sparse
# kernel (benchmarks/results/h200/tune.json, kernels.md), while pruning MiniLM to 50% on STS-B scored the same with
# 16x16, 32x32, 64x64 and 128x64 tiles within 0.4 Spearman (benchmarks/results/h200/tile_accuracy.md).
DEFAULT_TILE = (128, 64)


@dataclass(frozen=True)
class MatrixPlan:
    pattern: str
    sparsity: float


@dataclass
class PruningPlan:
    matrices: dict[str, MatrixPlan]
    tile: tuple[int, int] = DEFAULT_TILE
    nm: tuple[int, int] = (2, 4)
    name: str = "custom"

    def __post_init__(self):
        self.tile = check_tile(self.tile)
        missing = set(MATRIX_KINDS) - set(self.matrices)
        extra = set(self.matrices) - set(MATRIX_KINDS)
        if missing or extra:
            raise EtformerError(f"a plan names each of {MATRIX_KINDS}; missing {sorted(missing)}, unknown {sorted(extra)}")
        for kind, mp in self.matrices.items():
            check_sparsity(mp.sparsity, self.pattern(kind))

    def pattern(self, kind: str) -> Pattern:
        return Pattern(self.matrices[kind].pattern, tile=self.tile, n=self.nm[0], m=self.nm[1])

    def sparsity(self, kind: str) -> float:
        return self.matrices[kind].sparsity

    @classmethod
    def uniform(cls, pattern: str, sparsity: float, tile=DEFAULT_TILE, nm=(2, 4)) -> "PruningPlan":
        Pattern(pattern, tile=tile, n=nm[0], m=nm[1])  # validates the name early
        return cls({k: MatrixPlan(pattern, float(sparsity)) for k in MATRIX_KINDS}, tile, nm, name=f"{pattern}")

    @classmethod
    def attention_aware(cls, sparsity: float, tile=DEFAULT_TILE, v_sparsity: float | None = None) -> "PruningPlan":
        """E.T.'s attention-aware plan: V loses whole rows (whole per-head columns of V vanish), the rest tiles."""
        m = {k: MatrixPlan("tile", float(sparsity)) for k in MATRIX_KINDS}
        m["v"] = MatrixPlan("row", float(sparsity if v_sparsity is None else v_sparsity))
        return cls(m, tile, name="attention_aware")

    def with_sparsities(self, spec: str) -> "PruningPlan":
        """This plan with some kinds' sparsity replaced, from "kind=value,...": kinds of MATRIX_KINDS, or
        "attention" (q, k, v, o) and "ffn" (ffn_in, ffn_out). E.g. "attention=0.3,ffn=0.6" keeps half of a BERT
        layer's weights (the FFN holds two thirds of them) while pruning attention less."""
        groups = {"attention": ("q", "k", "v", "o"), "ffn": ("ffn_in", "ffn_out")}
        m = dict(self.matrices)
        for item in (p.strip() for p in spec.split(",") if p.strip()):
            kind, sep, value = item.partition("=")
            kind = kind.strip()
            if not sep or (kind not in MATRIX_KINDS and kind not in groups):
                raise EtformerError(f"bad sparsity entry {item!r}: expected KIND=VALUE with KIND one of "
                                    f"{', '.join(MATRIX_KINDS)}, attention or ffn")
            try:
                v = float(value)
            except ValueError:
                raise EtformerError(f"bad sparsity value in {item!r}") from None
            for k in groups.get(kind, (kind,)):
                m[k] = MatrixPlan(m[k].pattern, v)
        return PruningPlan(m, self.tile, self.nm, name=self.name)

    def to_json(self) -> dict:
        return {"name": self.name, "tile": list(self.tile), "nm": list(self.nm),
                "matrices": {k: {"pattern": v.pattern, "sparsity": v.sparsity} for k, v in self.matrices.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "PruningPlan":
        try:
            return cls({k: MatrixPlan(v["pattern"], float(v["sparsity"])) for k, v in d["matrices"].items()},
                       tuple(d["tile"]), tuple(d.get("nm", (2, 4))), name=d.get("name", "custom"))
        except (KeyError, TypeError, ValueError) as e:
            raise EtformerError(f"malformed pruning plan: {e}") from None


def make_plan(pattern: str, sparsity: float, tile=DEFAULT_TILE) -> PruningPlan:
    """Plan from CLI words: a pattern name applied to every matrix, or 'attention_aware'."""
    if pattern in ("attention_aware", "attention-aware"):
        return PruningPlan.attention_aware(sparsity, tile)
    return PruningPlan.uniform(pattern, sparsity, tile)
