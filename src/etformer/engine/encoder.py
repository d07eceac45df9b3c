"""ETEncoder: a BERT-family encoder run as fused etformer operators, padding-free, CUDA-graphed for small batches.

    input_ids, attention_mask (B, S)
      -> unpad once: packed tokens (T,), cu_seqlens (B+1,), max_seqlen        [host: B lengths; indices on device]
      -> embeddings: word + position + type, then LayerNorm                    # (T, d)
      -> per layer (post-LN, as BERT):
           qkv = X W_qkv^T + b      one tile-sparse launch into a (T, 3d) buffer (V compact if row-pruned)
           ctx = attention(qkv)     on the fly, varlen, heads read in place   # (T, H*DV)
           h   = LN(ctx W_O^T + b_O + X)                                      # fused add + LayerNorm
           f   = GELU(h W_1^T + b_1)                                          # GELU in the GEMM epilogue
           X   = LN(f W_2^T + b_2 + h)
           (optionally, up to FUSED_FFN_MAX_TOKENS tokens, the last two lines are one fused FFN launch + add&LN)
           (on the small-batch kernel path, ATTN_PROJ: the second and third lines are attention with the O projection
            as per-head partial sums in one launch, then add&LN; SMALL_DEFERRED_LN: h stays un-normalised, FFN-in
            applies its LayerNorm folded into W_1, and the last add&LN normalises the residual h itself)
      -> pad once: last_hidden_state (B, S, d), zeros at padded positions

Each matrix runs on the tile-sparse kernel when it is sparse enough to win, and on cuBLAS otherwise (the cut-off
is measured: DENSE_CUTOFF). Without a GPU every operator runs its PyTorch reference.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import EtformerError
from ..kernels._common import pdl_on, switch_generation, switch_module
from ..kernels.attention import attention
from ..kernels.attention_proj import attention_proj_partials
from ..kernels.embedding import embed_layernorm
from ..kernels.encoder_layer import MAX_ROWS as LAYER_MAX_ROWS, encoder_layer
from ..kernels.fused_ffn import fused_ffn_partials
from ..kernels.layernorm import add_layernorm
from ..kernels.padded import finish_padded
from ..kernels.tile_linear import (DeferredLN, _dense_bucket, _tma_on, apply_activation, fold_layernorm, tile_linear,
                                   tile_linear_partials)
from ..sparse.tiles import TileSparseWeight

# Tile density at or above which a matrix runs on cuBLAS instead: on the H200 the TMA tile kernel is 0.87-0.93x cuBLAS
# when dense and 1.33-1.49x at half density for 128x64 tiles at M >= 4096 (tune.json), so the crossover sits near 0.85.
DENSE_CUTOFF = 0.8
# Below this many rows (tokens) a sparse matrix runs on cuBLAS from a dense copy kept beside the tiles: small GEMMs are
# latency-bound and too few tile programs fill the GPU. Measured on the H200 (benchmarks/results/h200/probe_*):
# BERT-base 50% tiles, GPU time per forward, tiles vs all-cuBLAS: 584 vs 437 us at 128 tokens, 982 vs 580 at 512,
# 1208 vs 935 at ~2048 (varlen 32x128), 1651 vs 1722 at 4096.
SPARSE_MIN_TOKENS = 4096
# Sparser matrices pay off earlier: SPARSE_TIERS lists (up to tile density, from rows) in increasing density; a matrix
# leaves its dense copy from the rows of the first tier its density falls in (never later than SPARSE_MIN_TOKENS).
# Same-run A/Bs on the H200
# (benchmarks/results/h200/sparse_min_tokens/, BERT-base, every matrix pruned in 128x64 tiles, GPU time per forward,
# dense copy -> tiles). With the polynomial-erf GELU epilogue (after_gelu/): at half density 953 -> 855 us at 16x128
# and 1070 -> 973 at 4x512 (2048 tokens), 652 -> 711 at 8x128; at a quarter 648 -> 548 at 1024 tokens, 504 -> 501 at
# 512. Before it (libdevice erf, the first file), half density still lost at 2048 tokens (957 -> 1096 at 16x128).
# With a block-row of tiles split over several programs at few rows (tile_linear.TILE_SUB), a quarter density wins at
# every batch (tile_sub/tile_sub_ab_913531c.json, part c, GPU time per forward, dense copy -> tiles): 283 -> 258 us at
# 1x128, 337 -> 325 at 2x128, 510 -> 432 at 4x128; half density still loses there (283 -> 312, 337 -> 409, 512 ->
# 570). So a quarter density takes its tiles from 0 rows, and a matrix that never leaves its tiles keeps no dense copy.
# Between them (sparse_min_tokens/density_tiers/, 60-70% tiles, dense copy -> tiles): density 0.30 and 0.35 win from
# 512 tokens (4x128: 511 -> 466 and 510 -> 491 us; 8x128 649 -> 560 and 649 -> 587) but not at 256 (336 -> 345, 338
# -> 363); 0.40 wins from 1024 (8x128 649 -> 613; 4x128 512 -> 517). Each tier's density bound sits between the
# measured densities, above a uniform plan's (0.25, 0.30, 0.35, 0.40, 0.50: a plan lands a tile or so either side).
SPARSE_TIERS: tuple[tuple[float, int], ...] = ((0.27, 0), (0.37, 512), (0.42, 1024), (0.55, 2048))
# Under SPARSE_MIN_TOKENS rows, "triton" runs every matrix on etformer's kernels, reading a dense weight in place: the
# FFN-in GEMM then carries the GELU, and the output projection and FFN-out write split-K partial sums that the
# following add+LayerNorm reduces (7 launches a layer instead of 9). "cublas" keeps F.linear there. Same-run A/B on
# the H200, BERT-base, GPU time per forward (benchmarks/results/h200/small_batch_ab.json): 425 vs 438 us at B=1, S=128
# (the kernels' summed time is equal, 396 us; the two launches saved are the gain), but 615 vs 570 at B=1, S=512,
# 776 vs 649 at B=8, S=128 and 729 vs 652 at B=2, S=384.
# With programmatic dependent launch (each kernel scheduled while its predecessor runs) and the GEMMs' L2 weight
# prefetch issued before their wait (kernels/_common.py, tile_linear.PREFETCH_MAX_ROWS), the kernels pull ahead at the
# smallest batches: same-run A/B (benchmarks/results/h200/pdl_ab.json) 356 vs 442 us for cuBLAS at B=1, S=128, but
# 661 vs 573 at B=1, S=512 and 845 vs 650 at B=8, S=128; with the prefetch from the first row block only
# (small_batch_sweep.json) 334 vs 412 at B=1, S=128, 420 vs 468 at 1 x 256, 416 vs 460 at 2 x 128, and at 1 x 512
# only even at its best split (581 vs 579). "auto" (the default) therefore takes the kernels up to
# SMALL_KERNEL_MAX_TOKENS rows where PDL is available, and cuBLAS above.
SMALL_PATH = "auto"
SMALL_KERNEL_MAX_TOKENS = 256
# A dense matrix followed by an activation (FFN-in) runs on the tile kernel reading its dense weight in place
# (DENSE_W) from SPARSE_MIN_TOKENS rows, with the GELU in its epilogue, instead of cuBLAS and a separate GELU kernel.
# Same-run on the H200 (benchmarks/results/h200/tile_sub/tile_sub_ab_913531c.json, part b: BERT-base FFN-in with bias,
# graphs of 20 calls): 35.8 against 51.1 us at 4096 rows and 165.9 against 198.5 at 16384, in 128x64 blocks at
# (128, 4, 2) (tile_linear.DENSE_LAUNCH). That launch keeps two 32 KB pipeline buffers; at 4 stages the in-place read
# kept four (128 KB, one program an SM) and took 50.9 us, so a density-1 tile copy of the matrix served here before
# (38.2 us in the same run). False: cuBLAS.
DENSE_ACT_KERNEL = True
# Whether that small-batch path runs a sparse matrix on its tiles (True) or on its dense copy (False). Tiles were
# slower at every small shape in the same A/B (463 vs 426 us at B=1, S=128 for 50% tiles), hence False.
SMALL_SPARSE = False
# Post-LN layers with at most this many tokens run the FFN block as one fused launch (kernels/fused_ffn.py: both GEMMs
# and the activation, partial sums reduced in the following add+LayerNorm with b2), on the dense weights; 0 turns it off.
# Off by default: same-run A/B on the H200, BERT-base GPU time per forward (benchmarks/results/h200/fused_ffn_ab.json):
# 501 vs 438 us at B=1, S=128 and worse at every larger shape. The fused launch takes 17 us against 15 us for the four
# launches it replaces: 48 programs each stream 384 KB of weights one after another, too few to draw the bandwidth.
FUSED_FFN_MAX_TOKENS = 0
# On the small-batch kernel path, a post-LN layer whose four matrices have dense weights can run as one persistent
# launch (kernels/encoder_layer.py: six phases behind grid barriers, the O projection folded into attention) instead
# of seven. Off by default: same-run A/B on the H200, BERT-base GPU time per forward, both with PDL: 443 us against
# 331 for the seven launches at B=1, S=128 at its first launch shape (benchmarks/results/h200/layer_ab.json; 1.6-2.5x
# slower at every larger shape), and 362-366 against 333 at B=1, S=128 and 578-616 against 415 at 2 x 128 with the
# swept one (layer_ab_tuned.json). Its GEMM items run their K loops at ~0.45 us a step between barriers
# (layer_phases.json), where the separate kernels overlap one kernel's tail with the next one's weight fetch.
FUSED_LAYER = False
# On the small-batch kernel path, a post-LN layer runs attention and its output projection as one launch
# (kernels/attention_proj.py: per-head fp32 partial sums of ctx_h W_O[:, h]^T, reduced by the add+LayerNorm with b_O),
# 6 launches a layer instead of 7, on W_O's dense weight (a sparse one uses its dense copy). Off by default: same-run
# A/B on the H200, BERT-base GPU time per forward with its best swept launch (benchmarks/results/h200/attn_proj/
# attn_proj_ab.json): 337.6 us against 310.6 at B=1, S=128, 297.0 against 279.2 at S=32, 429.9 against 370.2 at
# 2 x 128, 454.0 against 384.2 at 1 x 256. The launch saved is worth ~0.6 us under PDL (84 trivial PDL launches take
# 49 us in a graph, same file), while each fused program runs attention and a projection back to back where the two
# kernels overlap.
ATTN_PROJ = False
# With the finite-output check on (ETEncoder.check_finite, the default), batches of at most this many (B*S) tokens with
# an integer or boolean mask run padded, without the host read of their lengths: attention reads the mask as a key
# mask, padded rows are computed, then zeroed by one kernel that also counts non-finite values and each sequence's
# tokens (kernels/padded.py), and the one device-to-host read is that status after the replay, instead of the lengths
# before it and the finite flag after it. The per-encoder knob is ETEncoder.sync_free_max_tokens (this value on a GPU,
# 0 elsewhere). Same-run A/B on the H200, BERT-base, full masks (benchmarks/results/h200/host_overhead.json), end to
# end with the check: 423-441 vs 541-546 us at B=1, S=128 and 488-499 vs 563-575 at B=2, S=128 (GPU time 339 vs 332
# and 420 vs 415). Without the check the packed path reads nothing after its replay and stays ahead (390 and 465 us),
# so it is taken there.
SYNC_FREE_MAX_TOKENS = 256
NONFINITE_MESSAGE = ("the encoder produced NaN or inf; check the weights and the inputs (token ids must be below the "
                     "vocabulary size and token types below the number of types)")
# Masked batches of a (batch, length) shape whose last batch had no padding replay that shape's graph before their
# lengths are known (module switch): the lengths are copied to the host behind the launch, and only if they show
# padding is the batch run again through the graph of its real tokens (the first run's output is dropped). Fixed-
# length traffic then pays no host round trip before its launch; a shape whose traffic turns padded pays one wasted
# forward, after which it is read first again.
SPECULATE_FULL = True
# The embeddings' gathers, sums and LayerNorm in one launch (kernels/embedding.py), instead of three gathers, two adds
# and the LayerNorm kernel. Module switch, for A/Bs.
FUSED_EMBED = True
# Batches up to this many (B*S) tokens replay a captured CUDA graph; larger ones run eagerly. Above the old bound of
# 16384 the eager tile path was host-bound for small models: all-MiniLM-L6-v2 with 50% tiles at 64x512 spent 6.4 ms
# end to end on 2.3 ms of kernels (scripts/eager_host_probe.py). Same-run A/B of 16384 against 65536 on the H200
# (benchmarks/results/h200/graph_max_tokens/, end to end, finite check off): MiniLM 50% tiles 64x512 3898/5629 ->
# 2294/2270 us, 128x512 variable length 4449/4330 -> 2533/2538, dense variable length 3270/3304 -> 3052/3075;
# BERT-base within the spread at every shape (its GPU work hides the host's), one slow eager outlier gone
# (128x512 variable length, 50% tiles: 13895 -> 11103); the allocator's peak reservation +0.0-0.1 GiB.
GRAPH_MAX_TOKENS = 65536
GRAPH_CACHE = 32  # graphs kept (least recently used dropped)
# Graphs for a (batch, length) shape are captured for the exact token count for the first GRAPH_EXACT_PER_SHAPE
# counts seen; after that a new count reuses or captures the graph of its bucket (graph_bucket), so variable-length
# traffic stops capturing new graphs. A bucket graph runs up to 1/8 extra ghost rows (measured: BERT-base, B=32,
# S=512, 8786 tokens in a 9216-row graph: 4298 us GPU+host against 3977 in an earlier run with the exact graph).
GRAPH_EXACT_PER_SHAPE = 4
# A graph on the small-batch kernels runs its packed rows rounded up to a multiple of GRAPH_ROW_MULTIPLE (the extra
# rows are ghosts, as in a bucket graph): on the packed path only for batches with padding (they build the unpad
# indices anyway), and on the padded path always. A probe on the H200 (BERT-base, GPU time of one graphed forward,
# benchmarks/results/h200/small_varlen/) found a partly empty last 64-row block slow: with no padding, 383 us at 129
# tokens against 348.5 at 192, 425.7 at 193 against 380.5 at 256. Same-run A/B of the rounding (small_rows_ab.json):
# packed path with padding, B=2, S=128, 66 + 127 tokens 474.0 -> 401.4 us, B=1, S=256, 213 tokens 442.6 -> 417.2;
# padded path (the default with the finite check) 400.2 -> 377.2 at 129 tokens, 447.7 -> 413.0 at 193, 433.7 ->
# 412.7 at 208, 423.1 -> 413.0 at 224, but 315.2 -> 320.8 at 120 and 406.5 -> 413.5 at 255 (a nearly full block
# gains nothing and the padding ops cost ~6 us). Forcing the indices on an unpadded batch to round it cost more than
# it saved (small_rows_ab_forced.json: 255 tokens 379.6 -> 413.2, 120: 309.5 -> 336.8), so those keep their rows.
# 1 turns the rounding off.
GRAPH_ROW_MULTIPLE = 64
# ... and only where the last block holds at most this many rows, by row bucket (tile_linear._dense_bucket; other
# buckets always round). Same-run A/B on the padded path, one full sequence of each length (attn_proj/attn_proj_ab.json,
# "rows", GPU µs exact -> rounded): up to 128 tokens rounding wins with 8 to 48 rows in the last block (72: 416.8 ->
# 319.0, 104: 356.7 -> 319.8, 112: 339.4 -> 320.2) and loses with 56 (120: 317.3 -> 320.7); from 129 to 256 it wins
# with 1 to 32 (129: 405.6 -> 378.2, 160: 383.7 -> 378.9, 213: 429.4 -> 412.8) and loses with 40 to 63 (168: 375.4 ->
# 379.1, 184: 371.8 -> 378.5, 240: 410.3 -> 413.8, 255: 407.2 -> 413.2).
GRAPH_ROW_ROUND_MAX_FILL = {128: 48, 256: 32}
# Deferred LayerNorm: where every matrix of a post-LN stack runs on its tiles and the batch has DEFERRED_LN_TOKENS
# tokens (a range, both ends included), no LayerNorm after the embeddings' runs as a pass of its own until the last.
# The output projection and FFN-out write the un-normalised sum X and each row's partial moments (sum, sum of squares
# per column block) from their epilogues; the next GEMM reads X with the LayerNorm folded into its weight
# (W diag(gamma), tile pattern unchanged; the mean subtracted and 1/std applied per row in its epilogue, W beta + b as
# its bias), and the next residual is normalised as it is loaded. 23 of the 25 add+LayerNorm launches of a 12-layer
# forward go, and with them a write and a read of every hidden state. The folded QKV and FFN-in tiles are a second
# copy of those matrices (built on first use). Same-run A/Bs on the H200 (benchmarks/results/h200/deferred_ln/;
# BERT-base, GPU time of the graphed forward, applied -> deferred): 50% tiles 801 -> 773 us at 16x128, 1205 ->
# 1149-1163 at 32x128, 1363 -> 1313 at 8x512; 70% tiles 983 -> 921-925 at 32x128, 1138 -> 1075 at 8x512. Above
# 4096 tokens it loses (range/deferred_ln_8192.json: 50% tiles 2307 -> 2498 at 64x128 and 2586 -> 2762 at 16x512,
# 30% tiles 10% slower; at 16384 tokens 0-1% slower): there the output projection and FFN-out run 128-row blocks,
# whose deferred epilogue takes 255 registers. Hidden-state error against HF fp32 1.117e-3 against 1.106e-3 applied
# (HF's own fp16: 1.499e-3). None turns it off.
DEFERRED_LN_TOKENS: tuple[int, int] | None = (2048, 4096)
# The same idea on the small-batch kernel path (dense weights, up to SMALL_KERNEL_MAX_TOKENS rows): a post-LN layer's
# first LayerNorm gets no launch of its own. The output projection runs whole (no split-K) and writes h = ctx W_O^T +
# b_O + X un-normalised with its row moments; FFN-in reads h with that LayerNorm folded into a copy of W_1 (made on
# first use: one more FFN-in matrix per layer in memory); FFN-out's split-K partial sums go to the add+LayerNorm that
# normalises the residual h from its own row before adding it (add_layernorm's residual_ln). 6 launches a layer
# instead of 7, and off by default: same-run A/B on the H200 (benchmarks/results/h200/small_deferred/, GPU time of the
# graphed forward, applied -> deferred) BERT-base dense 228 -> 252 us at 1x32, 269 -> 284 at 1x128, 326 -> 325 at
# 2x128, 337 -> 334 at 1x256, 316 -> 311 at 4x64; all-MiniLM-L6-v2 97.0 -> 100.8 at 1x128, 119.2 -> 120.0 at 1x256.
# The output projection run whole (48 programs of 6 K steps at 128 rows) costs more than the launch it saves; its
# split-K partial sums are what the add+LayerNorm pass exists to reduce. Hidden-state error against HF fp32 the same
# (1.09e-3 both at 1x128, BERT-base; HF's own fp16 1.52e-3).
SMALL_DEFERRED_LN = False


def tile_min_rows(density: float) -> int:
    """Rows from which a sparse matrix of this tile density runs on its tiles rather than its dense copy: its
    SPARSE_TIERS entry's, never later than SPARSE_MIN_TOKENS."""
    rows = next((r for dens, r in SPARSE_TIERS if density <= dens), SPARSE_MIN_TOKENS)
    return min(SPARSE_MIN_TOKENS, rows)


def graph_rows(T: int, x: torch.Tensor) -> int:
    """The packed rows of the graph that runs T real tokens on x's device: T rounded up to GRAPH_ROW_MULTIPLE where
    the small-batch kernels take it (never past SMALL_KERNEL_MAX_TOKENS) and the last block holds at most
    GRAPH_ROW_ROUND_MAX_FILL rows, else T."""
    m = GRAPH_ROW_MULTIPLE
    if m <= 1 or T > SMALL_KERNEL_MAX_TOKENS or not _small_kernels(T, x):
        return T
    fill = T % m
    if fill == 0 or fill > GRAPH_ROW_ROUND_MAX_FILL.get(_dense_bucket(T), m):
        return T
    return min(T - fill + m, SMALL_KERNEL_MAX_TOKENS)


def _small_kernels(rows: int, x: torch.Tensor) -> bool:
    """Whether rows (under SPARSE_MIN_TOKENS) on x's device run etformer's kernels on the dense weights, per
    SMALL_PATH."""
    if SMALL_PATH == "auto":
        return rows <= SMALL_KERNEL_MAX_TOKENS and pdl_on(x)
    return SMALL_PATH == "triton"


def _small_on_kernels(x: torch.Tensor) -> bool:
    """_small_kernels for the rows of x."""
    return _small_kernels(x.shape[0], x)


def _on_kernels(x: torch.Tensor, backend: str) -> bool:
    """Whether this call runs etformer's Triton kernels: "triton" always, "auto" on a GPU tensor."""
    return backend == "triton" or (backend == "auto" and x.is_cuda)


def choose_graph_key(cache, B: int, S: int, T: int, max_len: int, extra: tuple, rows=None, *, padded: bool) -> tuple:
    """The key (B, S, rows, longest row, *extra, padded) of the graph to replay or capture for a batch of T real
    tokens. rows: rounds a row count up (graph_rows); None keeps it. padded: whether the batch has padding, i.e. the
    graph unpads through device-side indices built from the mask. A graph captured without them ignores the mask, so
    a padded batch must never replay it, even where its bucket's rows and longest row come out as the full shape's
    (T near B*S, or rounded up to it)."""
    rows = rows or (lambda t: t)
    extra = (*extra, bool(padded))
    exact = (B, S, rows(T), max_len, *extra)
    if exact in cache:
        return exact
    Tb, Lb = ETEncoder.graph_bucket(T, max_len, B, S)
    bucket = (B, S, rows(Tb), Lb, *extra)
    if bucket in cache:
        return bucket
    same_shape = sum(1 for k in cache if k[:2] == (B, S) and k[4:] == extra)
    return exact if same_shape < GRAPH_EXACT_PER_SHAPE else bucket


@dataclass
class EncoderConfig:
    hidden: int
    heads: int
    layers: int
    intermediate: int
    max_positions: int
    eps: float = 1e-12
    activation: str = "gelu"
    position_offset: int = 0  # RoBERTa numbers positions from padding_idx + 1
    token_types: bool = True
    causal: bool = False
    norm_first: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def capture_graph(run):
    """(CUDA graph, its output) for the no-argument callable run: two warm-up calls on a side stream (compile the
    kernels, settle the allocator), then one captured call. Replaying the graph recomputes the output in place."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph, out


def replay_graph(cache: OrderedDict, key, inputs, run):
    """Copy inputs into the static inputs of the graph kept in cache under key and replay it; on first use capture
    run(*static copies of inputs) (None stays None). Returns the graph's output (overwritten by the next replay).
    At most GRAPH_CACHE graphs are kept, the least recently used dropped; all of them when a module switch or launch
    table has changed since they were captured (kernels._common.switch_generation), since a graph bakes in what the
    switches said at its capture."""
    gen = switch_generation()
    if getattr(cache, "switch_generation", gen) != gen:  # a switch changed since these graphs were captured
        cache.clear()
    cache.switch_generation = gen
    g = cache.get(key)
    if g is None:
        static = [None if t is None else t.clone() for t in inputs]
        graph, out = capture_graph(lambda: run(*static))
        g = cache[key] = (graph, static, out)
        if len(cache) > GRAPH_CACHE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    graph, static, out = g
    for dst, src in zip(static, inputs):
        if dst is not None:
            dst.copy_(src)
    graph.replay()
    return out


class Linear:
    """One matrix: the tile-sparse kernel when sparse enough, cuBLAS when dense. Knows its own bias.

    force=None chooses by density and, for a sparse matrix, keeps a dense copy for batches under tile_min_rows(density)
    rows on the GPU (the thresholds when it is built decide whether it keeps one); "tile" always runs the tile kernel
    (no dense copy); "dense" always cuBLAS."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, tile: tuple[int, int],
                 force: str | None = None):
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.sparse = TileSparseWeight.from_dense(weight, tile)
        dense = self.sparse.density >= DENSE_CUTOFF if force is None else force == "dense"
        # a sparse matrix keeps a dense copy for the batches under tile_min_rows (none when that is 0)
        keep = dense or (force is None and tile_min_rows(self.sparse.density) > 0)
        self.dense_weight = weight.contiguous() if keep else None
        if dense:
            self.sparse = None
        self.forced = force

    @property
    def density(self) -> float:
        return 1.0 if self.sparse is None else self.sparse.density

    def _operand(self, x, backend, activation=None):
        """What runs this call: a TileSparseWeight or a dense tensor for the Triton kernels, or None for F.linear.

        backend "auto" on a GPU: tiles when sparse and at least tile_min_rows(density) rows (or no dense copy is
        kept); under that, the small-batch path (SMALL_PATH, SMALL_SPARSE) or cuBLAS on the dense copy; a dense matrix
        at scale goes to cuBLAS, or, called with an activation, to the tile kernel reading it in place
        (DENSE_ACT_KERNEL, where the kernel takes TMA loads; not when forced dense). "triton" always takes the kernels
        (tiles when sparse), so the CPU interpreter covers the same code."""
        if not _on_kernels(x, backend):
            return self.sparse  # None when dense (F.linear); else tile_linear runs its own reference
        small = x.shape[0] < (SPARSE_MIN_TOKENS if self.sparse is None else tile_min_rows(self.sparse.density))
        if self.sparse is not None and (backend == "triton" or self.dense_weight is None or not small):
            return self.sparse
        if small and _small_on_kernels(x):
            return self.sparse if (self.sparse is not None and SMALL_SPARSE) else self.dense_weight
        # A dense matrix with an activation at scale: one tile-kernel launch reading the weight in place with the
        # activation fused, instead of cuBLAS and an activation kernel. With TMA loads only: the pointer-load form
        # (before sm_90, unaligned x, USE_TMA off) stays on cuBLAS.
        if (activation is not None and self.sparse is None and self.forced is None and DENSE_ACT_KERNEL and not small
                and _tma_on(x, self.dense_weight)):
            return self.dense_weight
        return None

    def small_weight(self, x, backend="auto"):
        """The dense weight a fused small-batch operator reads for this matrix (attention with the O projection),
        or None where this call would not run the small-batch kernels on a dense weight: a sparse matrix gives its
        dense copy unless SMALL_SPARSE keeps it on its tiles."""
        if x.shape[0] >= SPARSE_MIN_TOKENS or not _on_kernels(x, backend) or not _small_on_kernels(x):
            return None
        if self.sparse is not None and SMALL_SPARSE:
            return None
        return self.dense_weight

    def partial_sums(self, x, backend="auto"):
        """fp32 split-K partial sums of x W^T (no bias) when this call would run the small-batch kernels, else None:
        the caller then hands them to add_layernorm with this layer's bias."""
        if x.shape[0] >= SPARSE_MIN_TOKENS or not _small_on_kernels(x) or not _on_kernels(x, backend):
            return None
        w = self._operand(x, backend)
        return None if w is None else tile_linear_partials(x, w, backend=backend)

    def __call__(self, x, activation=None, residual=None, out=None, out_col=0, backend="auto"):
        w = self._operand(x, backend, activation)
        if w is not None:
            return tile_linear(x, w, self.bias, activation=activation, residual=residual, out=out,
                               out_col=out_col, backend=backend)
        y = F.linear(x, self.dense_weight, self.bias)
        y = apply_activation(y, activation)
        if residual is not None:
            y = y + residual
        if out is None:
            return y
        out[:, out_col:out_col + self.out_features] = y
        return out

    def to(self, device, dtype):
        if self.sparse is not None:
            self.sparse = self.sparse.to(device, dtype)
        if self.dense_weight is not None:
            self.dense_weight = self.dense_weight.to(device, dtype)
        if self.bias is not None:
            self.bias = self.bias.to(device, dtype)
        return self


@dataclass
class Layer:
    qkv: Linear  # (3d or 2d + H*C) x d
    o: Linear
    ffn_in: Linear
    ffn_out: Linear
    ln1: tuple[torch.Tensor, torch.Tensor]
    ln2: tuple[torch.Tensor, torch.Tensor]
    v_width: int  # V head dim as attention sees it: D, or C for compact pruned V


class ETEncoder(torch.nn.Module):
    def __init__(self, cfg: EncoderConfig, embeddings: dict, layers: list[Layer], dtype: torch.dtype,
                 device: torch.device, final_norm: tuple | None = None):
        super().__init__()
        self.cfg, self.emb, self.layers = cfg, embeddings, layers
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.dtype, self.device = dtype, device
        self.final_norm = final_norm
        self.use_graphs = self.device.type == "cuda"
        self.backend = "auto"  # "reference" forces the PyTorch references, "triton" the kernels
        self.check_finite = True
        self.sync_free_max_tokens = SYNC_FREE_MAX_TOKENS if self.device.type == "cuda" else 0
        self._graphs: OrderedDict = OrderedDict()
        self._const_cache: dict = {}
        self._full_shapes: set = set()  # (B, S, token types given) whose last masked batch had no padding
        self._lengths_host: dict = {}  # batch size -> page-locked buffer the speculated lengths are copied into
        self._lengths_done = None  # CUDA event recorded behind that copy
        self._folds: list | None = None  # per layer (QKV folded with the previous layer's LN2, FFN-in with its LN1)
        self._small_folds: list | None = None  # per layer, FFN-in's dense weight folded with LN1 (SMALL_DEFERRED_LN)

    # ------------------------------------------------------------------ inputs
    def _validate(self, input_ids, attention_mask, token_type_ids):
        """Check the inputs; the mask as given (None without one): its nonzero entries are the real tokens."""
        self._check(input_ids, attention_mask, token_type_ids)
        return attention_mask

    @staticmethod
    def _keep(mask):
        """The boolean keep mask of a batch with padding (the unpad indices are built from it)."""
        return mask if mask.dtype == torch.bool else mask.ne(0)

    def _check(self, input_ids, attention_mask, token_type_ids):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise EtformerError("input_ids must be a 2-D (batch, seq) tensor")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise EtformerError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        B, S = input_ids.shape
        if B == 0 or S == 0:
            raise EtformerError(f"empty batch: input_ids has shape {(B, S)}")
        if input_ids.device != self.device:
            raise EtformerError(f"input_ids is on {input_ids.device}, the encoder on {self.device}; move the inputs")
        if S > self.cfg.max_positions:
            raise EtformerError(f"sequence length {S} exceeds the model's {self.cfg.max_positions} positions")
        if attention_mask is None:
            return
        if attention_mask.shape != input_ids.shape or attention_mask.device != self.device:
            raise EtformerError(f"attention_mask must be {(B, S)} on {self.device}, got {tuple(attention_mask.shape)} "
                                f"on {attention_mask.device}")
        if attention_mask.is_floating_point() and not bool(torch.isfinite(attention_mask).all()):
            raise EtformerError("attention_mask holds NaN or inf")
        if token_type_ids is not None and (token_type_ids.shape != input_ids.shape or token_type_ids.device != self.device):
            raise EtformerError(f"token_type_ids must be {(B, S)} on {self.device}")

    def _lengths(self, mask, B, S) -> tuple[int, int]:
        """(T, max_len) on the host: the only values the launch shapes need. One copy of B lengths (each mask row's
        nonzero entries, counted in one launch), none without a mask."""
        if mask is None:
            return B * S, S
        return self._totals(torch.count_nonzero(mask, dim=1).tolist())

    @staticmethod
    def _totals(lens: list) -> tuple[int, int]:
        """(T, max_len) of the sequence lengths; an all-padding row is refused."""
        if 0 in lens:
            raise EtformerError(f"row {lens.index(0)} of the batch is all padding")
        return sum(lens), max(lens)

    @staticmethod
    def _rows(keep, x):
        """The packed path's row rounding (graph_rows) for a batch: only when it has padding (keep not None)."""
        return None if keep is None else (lambda t: graph_rows(t, x))

    def _keep_if_padded(self, mask, T, B, S):
        """The keep mask of a batch of T real tokens, None when nothing is padded (nothing to unpad)."""
        return None if T == B * S else self._keep(mask)

    def _unpadding(self, mask, B, S):
        """(T, max_len, keep) of a validated mask, read first (the packed path without speculation)."""
        T, max_len = self._lengths(mask, B, S)
        return T, max_len, self._keep_if_padded(mask, T, B, S)

    def _graph_key(self, input_ids, token_type_ids, keep, T, max_len):
        """The packed path's graph key for a batch (choose_graph_key)."""
        return choose_graph_key(self._graphs, *input_ids.shape, T, max_len, (token_type_ids is not None,),
                                self._rows(keep, input_ids), padded=keep is not None)

    def _consts(self, B, S, device):
        """Positions and cu_seqlens of a batch without padding, made once per (B, S) and kept."""
        key = (B, S, str(device))
        c = self._const_cache.get(key)
        if c is None:
            pos = torch.arange(S, device=device).repeat(B) + self.cfg.position_offset
            cu = torch.arange(0, (B + 1) * S, S, device=device, dtype=torch.int32)
            c = self._const_cache[key] = (pos, cu)
        return c

    @staticmethod
    def graph_bucket(T: int, max_len: int, B: int, S: int) -> tuple[int, int]:
        """The (rows, longest row) a CUDA graph is captured for: T rounded up to its top four bits (at most 1/8
        extra rows, never past B*S) and max_len to a power of two (never past S). Batches of one (B, S) then share a
        few dozen graphs at most instead of one per distinct token count; the extra rows are ghosts (below)."""
        if T == B * S:
            return T, max_len
        e = max(0, T.bit_length() - 4)
        return min(B * S, -(-T >> e) << e), min(S, 1 << max(0, (max_len - 1).bit_length()))

    def _indices(self, keep, B, S, T):
        """Device side of the unpad, with no host sync (it runs inside the CUDA graph): (flat, positions, cu_seqlens).

        T is the number of packed rows, at least the real token count (graph buckets round it up). flat[i] is the
        (b*S + s) source of packed row i; rows past the real tokens are ghosts: flat = B*S (a discard row for the
        pad), they belong to no sequence (cu_seqlens covers real tokens only), so attention never reads them and
        every other operator is row-wise. flat is None when nothing is padded (T == B*S and no mask)."""
        if keep is None:
            pos, cu = self._consts(B, S, self.device)
            return None, pos, cu
        m = keep.reshape(-1).to(torch.int32)
        cs = torch.cumsum(m, 0)
        dest = torch.where(m.bool(), cs - 1, T).to(torch.int64)  # slot of each real token; padding goes to slot T
        src = torch.arange(B * S, device=keep.device)
        flat = torch.full((T + 1,), B * S, dtype=torch.int64, device=keep.device).scatter_(0, dest, src)[:T]
        cu = torch.zeros(B + 1, dtype=torch.int32, device=keep.device)
        cu[1:] = cs.view(B, S)[:, -1]
        if self.cfg.position_offset:  # RoBERTa counts positions over real tokens, from padding_idx + 1
            rowpos = (torch.cumsum(keep.to(torch.int32), 1) - 1).reshape(-1)[self._gather_index(flat, B, S)]
            pos = rowpos + self.cfg.position_offset
        else:
            pos = flat % S
        return flat, pos, cu

    @staticmethod
    def _gather_index(flat, B, S):
        """flat with ghost rows pointed at a real (ignored) token, for gathers."""
        return flat.clamp(max=B * S - 1)

    def _prepare(self, input_ids, token_type_ids, keep, B, S, T):
        """Gather the real tokens (inside the CUDA graph): ids, positions, token types, cu_seqlens, flat."""
        flat, pos, cu = self._indices(keep, B, S, T)
        g = None if flat is None else self._gather_index(flat, B, S)
        ids = input_ids.reshape(-1) if g is None else input_ids.reshape(-1)[g]
        tt = None
        if token_type_ids is not None:
            tt = token_type_ids.reshape(-1) if g is None else token_type_ids.reshape(-1)[g]
        return ids, pos, tt, cu, flat

    # ------------------------------------------------------------------ compute
    def _layers(self, ids, pos, tt, cu, max_len, key_mask=None):
        return self._stack(self._embed(ids, pos, tt), cu, max_len, key_mask=key_mask)

    def _ln(self, a, r, wb):
        return add_layernorm(a, r, wb[0], wb[1], self.cfg.eps, backend=self.backend)

    def _ffn_ln(self, L: Layer, h):
        """LN(FFN(h) + h) of a post-LN layer: one fused FFN launch up to FUSED_FFN_MAX_TOKENS tokens on the kernels
        (dense weights of both matrices; a sparse one uses its dense copy), else FFN-in (+act) then FFN-out + add&LN."""
        bk = self.backend
        w1, w2 = L.ffn_in.dense_weight, L.ffn_out.dense_weight
        if w1 is not None and w2 is not None and 0 < h.shape[0] <= FUSED_FFN_MAX_TOKENS and _on_kernels(h, bk):
            ws = fused_ffn_partials(h, w1, L.ffn_in.bias, w2, self.cfg.activation, backend=bk)
            return add_layernorm(ws, h, L.ln2[0], L.ln2[1], self.cfg.eps, backend=bk, x_bias=L.ffn_out.bias)
        f = L.ffn_in(h, activation=self.cfg.activation, backend=bk)
        return self._linear_ln(L.ffn_out, f, h, L.ln2)

    def _fused_layers(self, x, causal) -> bool:
        """Whether this batch runs each layer as one persistent launch (FUSED_LAYER)."""
        cfg = self.cfg
        if not FUSED_LAYER or cfg.norm_first or causal or SMALL_SPARSE or cfg.activation not in ("gelu", "relu"):
            return False
        if not (_on_kernels(x, self.backend) and x.shape[0] < SPARSE_MIN_TOKENS and x.shape[0] <= LAYER_MAX_ROWS
                and _small_on_kernels(x)):
            return False
        return all(lin.dense_weight is not None and lin.bias is not None
                   for L in self.layers for lin in (L.qkv, L.o, L.ffn_in, L.ffn_out))

    def _layer(self, L: Layer, x, cu, max_len, counter):
        cfg = self.cfg
        return encoder_layer(x, cu, max_len, cfg.heads, cfg.head_dim, L.qkv.dense_weight, L.qkv.bias,
                             L.o.dense_weight, L.o.bias, L.ln1, L.ffn_in.dense_weight, L.ffn_in.bias,
                             L.ffn_out.dense_weight, L.ffn_out.bias, L.ln2, eps=cfg.eps, v_head_dim=L.v_width,
                             activation=cfg.activation, counter=counter, backend=self.backend)

    def _deferred_folds(self, x) -> list | None:
        """The folded weights when this batch runs with its LayerNorms deferred (DEFERRED_LN_TOKENS), else None:
        a post-LN stack whose every matrix runs on its tiles for x. Built on first use (never inside a graph capture:
        the warm-up calls before it build them)."""
        cfg, bk = self.cfg, self.backend
        if (DEFERRED_LN_TOKENS is None or not DEFERRED_LN_TOKENS[0] <= x.shape[0] <= DEFERRED_LN_TOKENS[1]
                or cfg.norm_first or not _on_kernels(x, bk)):
            return None
        for L in self.layers:
            for lin, act in ((L.qkv, None), (L.o, None), (L.ffn_in, cfg.activation), (L.ffn_out, None)):
                if lin.sparse is None or lin._operand(x, bk, act) is not lin.sparse:
                    return None
        if self._folds is None:
            if x.is_cuda and torch.cuda.is_current_stream_capturing():
                return None
            prev = [None] + [L.ln2 for L in self.layers[:-1]]
            self._folds = [(None if p is None else fold_layernorm(L.qkv.sparse, L.qkv.bias, *p),
                            fold_layernorm(L.ffn_in.sparse, L.ffn_in.bias, *L.ln1)) for L, p in zip(self.layers, prev)]
        return self._folds

    def _small_deferred_folds(self, x) -> list | None:
        """FFN-in's dense weights folded with each layer's first LayerNorm when this batch runs the small-batch
        path's deferred LayerNorm (SMALL_DEFERRED_LN), else None: a post-LN stack whose output projection, FFN-in and
        FFN-out all run the small-batch kernels on dense weights for x. Built on first use, never inside a capture."""
        cfg, bk = self.cfg, self.backend
        if (not SMALL_DEFERRED_LN or cfg.norm_first or ATTN_PROJ or 0 < x.shape[0] <= FUSED_FFN_MAX_TOKENS
                or not _on_kernels(x, bk)):
            return None
        for L in self.layers:  # small_weight: None unless this call runs the small-batch kernels on a dense weight
            for lin in (L.o, L.ffn_in, L.ffn_out):
                if lin.small_weight(x, bk) is None:
                    return None
        if self._small_folds is None:
            if x.is_cuda and torch.cuda.is_current_stream_capturing():
                return None
            self._small_folds = [fold_layernorm(L.ffn_in.dense_weight, L.ffn_in.bias, *L.ln1) for L in self.layers]
        return self._small_folds

    def _small_deferred_layer(self, L: Layer, x, ctx, fold):
        """A post-LN layer's output projection and FFN on the small-batch path with its first LayerNorm deferred
        (SMALL_DEFERRED_LN): 3 launches after attention instead of 4. x: the layer's (normalised) input, ctx:
        attention's output."""
        cfg, bk = self.cfg, self.backend
        h, stats = tile_linear(ctx, L.o.dense_weight, L.o.bias, residual=x, row_stats=True, backend=bk)
        n = DeferredLN(stats, cfg.hidden, cfg.eps)
        f = tile_linear(h, fold.weight, fold.bias, activation=cfg.activation, x_norm=n, x_colsum=fold.colsum,
                        backend=bk)
        ws = L.ffn_out.partial_sums(f, bk)
        return add_layernorm(ws, h, L.ln2[0], L.ln2[1], cfg.eps, backend=bk, x_bias=L.ffn_out.bias,
                             residual_ln=L.ln1)

    def _deferred_stack(self, x, folds, attend):
        """The post-LN layer stack with deferred LayerNorms (DEFERRED_LN_TOKENS): x normalised on entry (the
        embeddings' LayerNorm), normalised on exit; in between each hidden state exists only un-normalised, with its
        row moments."""
        cfg, bk = self.cfg, self.backend
        d, eps = cfg.hidden, cfg.eps
        n = None  # the pending LayerNorm of x; None: x is normalised
        for i, (L, (qkv_f, ffn_f)) in enumerate(zip(self.layers, folds)):
            if n is None:
                qkv = tile_linear(x, L.qkv.sparse, L.qkv.bias, backend=bk)
            else:
                qkv = tile_linear(x, qkv_f.weight, qkv_f.bias, x_norm=n, x_colsum=qkv_f.colsum, backend=bk)
            x1, s1 = tile_linear(attend(qkv, L), L.o.sparse, L.o.bias, residual=x, residual_norm=n, row_stats=True,
                                 backend=bk)
            n1 = DeferredLN(s1, d, eps, *L.ln1)
            f = tile_linear(x1, ffn_f.weight, ffn_f.bias, activation=cfg.activation, x_norm=n1, x_colsum=ffn_f.colsum,
                            backend=bk)
            last = i == len(self.layers) - 1
            y = tile_linear(f, L.ffn_out.sparse, L.ffn_out.bias, residual=x1, residual_norm=n1, row_stats=not last,
                            backend=bk)
            if last:
                return self._ln(y, None, L.ln2)
            x, s2 = y
            n = DeferredLN(s2, d, eps, *L.ln2)
        return x

    def _linear_ln(self, lin: Linear, a, r, wb):
        """LN(lin(a) + r): through split-K partial sums on the small-batch path, else one linear then add+LN."""
        ws = lin.partial_sums(a, self.backend)
        if ws is None:
            return self._ln(lin(a, backend=self.backend), r, wb)
        return add_layernorm(ws, r, wb[0], wb[1], self.cfg.eps, backend=self.backend, x_bias=lin.bias)

    def _embed(self, ids, pos, tt):
        e = self.emb
        if FUSED_EMBED:
            types = self.cfg.token_types
            return embed_layernorm(ids, pos, e["word"], e["pos"], e["ln_w"], e["ln_b"], self.cfg.eps,
                                   token_types=tt if types else None, type_table=e["type"] if types else None,
                                   backend=self.backend)
        x = F.embedding(ids, e["word"]) + F.embedding(pos, e["pos"])
        if self.cfg.token_types:  # no token_type_ids means type 0 everywhere: one broadcast row, no gather
            x = x + (F.embedding(tt, e["type"]) if tt is not None else e["type"][0])
        return self._ln(x.contiguous(), None, (e["ln_w"], e["ln_b"]))  # (T, d)

    def _stack(self, x, cu, max_len, causal=None, key_mask=None):
        """The layer stack on packed tokens x (T, d); key_mask: [B, max_len], zeros not attended (the padded
        layout's attention_mask)."""
        cfg = self.cfg
        causal = cfg.causal if causal is None else causal
        bk = self.backend
        ln = self._ln
        H, D = cfg.heads, cfg.head_dim

        def attend(qkv, L):  # (T, 2*H*D + H*DV) -> (T, H*DV)
            return attention(qkv, cu, max_len, H, D, v_head_dim=L.v_width, causal=causal, key_mask=key_mask,
                             backend=bk)

        folds = self._deferred_folds(x)
        if folds is not None:
            x = self._deferred_stack(x, folds, attend)
            return x if self.final_norm is None else ln(x, None, self.final_norm)
        if key_mask is None and self._fused_layers(x, causal):  # one zeroed barrier counter a layer, one memset for all
            counters = torch.zeros(len(self.layers), dtype=torch.int32, device=x.device)
            for i, L in enumerate(self.layers):
                x = self._layer(L, x, cu, max_len, counters[i:i + 1])
            return x if self.final_norm is None else ln(x, None, self.final_norm)
        small_folds = self._small_deferred_folds(x)
        for i, L in enumerate(self.layers):
            if small_folds is not None:
                x = self._small_deferred_layer(L, x, attend(L.qkv(x, backend=bk), L), small_folds[i])
                continue
            if cfg.norm_first:
                x = L.o(attend(L.qkv(ln(x, None, L.ln1), backend=bk), L), residual=x, backend=bk)
                f = L.ffn_in(ln(x, None, L.ln2), activation=cfg.activation, backend=bk)
                x = L.ffn_out(f, residual=x, backend=bk)
            else:
                qkv = L.qkv(x, backend=bk)
                w_o = L.o.small_weight(x, bk) if ATTN_PROJ else None
                if w_o is not None:  # attention and the O projection in one launch, as per-head partial sums
                    ws = attention_proj_partials(qkv, cu, max_len, H, D, w_o, v_head_dim=L.v_width, causal=causal,
                                                 key_mask=key_mask, backend=bk)
                    h = add_layernorm(ws, x, L.ln1[0], L.ln1[1], cfg.eps, backend=bk, x_bias=L.o.bias)
                else:
                    h = self._linear_ln(L.o, attend(qkv, L), x, L.ln1)
                x = self._ffn_ln(L, h)
        if self.final_norm is not None:
            x = ln(x, None, self.final_norm)
        return x

    @staticmethod
    def _pad(x, flat, B, S):
        if flat is None:  # nothing was padded
            return x.view(B, S, -1)
        out = x.new_zeros(B * S + 1, x.shape[1])  # the last row takes the ghost rows
        out[flat] = x
        return out[: B * S].view(B, S, -1)

    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **_ignored):
        if self._sync_free(input_ids, attention_mask):
            self._check(input_ids, attention_mask, token_type_ids)
            return EncoderOutput(self._padded(input_ids, attention_mask, token_type_ids))
        mask = self._validate(input_ids, attention_mask, token_type_ids)
        B, S = input_ids.shape
        graphed = self.use_graphs and B * S <= GRAPH_MAX_TOKENS
        shape = (B, S, token_type_ids is not None)
        y = None
        if graphed and mask is not None and SPECULATE_FULL and shape in self._full_shapes:
            y, lens = self._speculate(input_ids, token_type_ids, mask, B, S)
            T, max_len = self._totals(lens)
            if T != B * S:
                y = None  # padded after all: the real tokens' graph below
        else:
            T, max_len = self._lengths(mask, B, S)
        if mask is not None:
            (self._full_shapes.add if T == B * S else self._full_shapes.discard)(shape)
        if y is None:
            keep = self._keep_if_padded(mask, T, B, S)
            if graphed:
                y = self._graphed(input_ids, token_type_ids, keep, T, max_len, B, S)
            else:
                y = self._run(input_ids, token_type_ids, keep, T, max_len, B, S)
        if self.check_finite and not bool(torch.isfinite(y).all()):
            raise EtformerError(NONFINITE_MESSAGE)
        return EncoderOutput(y)

    def _speculate(self, input_ids, token_type_ids, mask, B, S):
        """(output of the full-length graph, sequence lengths): the lengths' copy to the host is queued first, the
        replay of the (B, S) graph without unpadding behind it, and the host waits for the copy alone
        (SPECULATE_FULL)."""
        buf = self._lengths_host.get(B)
        if buf is None:
            buf = self._lengths_host[B] = torch.empty(B, dtype=torch.int64, pin_memory=True)
        if self._lengths_done is None:
            self._lengths_done = torch.cuda.Event()
        buf.copy_(torch.count_nonzero(mask, dim=1), non_blocking=True)
        self._lengths_done.record()
        y = self._graphed(input_ids, token_type_ids, None, B * S, S, B, S)
        self._lengths_done.synchronize()
        return y, buf.tolist()

    def _sync_free(self, input_ids, attention_mask) -> bool:
        """Whether this batch runs padded, with no host read before its replay: under sync_free_max_tokens tokens, with
        the finite check on (SYNC_FREE_MAX_TOKENS)."""
        return (self.check_finite and self.cfg.position_offset == 0 and isinstance(input_ids, torch.Tensor)
                and input_ids.dim() == 2 and input_ids.numel() <= self.sync_free_max_tokens
                and isinstance(attention_mask, torch.Tensor) and not attention_mask.is_floating_point())

    def _run_padded(self, input_ids, token_type_ids, mask):
        """(last_hidden_state, status) of a batch run padded: every (b, s) row is computed, attention reads the mask
        as a key mask, padded rows come out as zeros. status (on the device, kernels/padded.py): [non-finite values
        in real rows, real tokens of each sequence...]."""
        B, S = input_ids.shape
        pos, cu = self._consts(B, S, self.device)
        ids = input_ids.reshape(-1)
        tt = None if token_type_ids is None else token_type_ids.reshape(-1)
        ghosts = graph_rows(B * S, input_ids) - B * S if self.use_graphs else 0
        if ghosts:  # rows past every sequence (GRAPH_ROW_MULTIPLE): row-wise work only, dropped below
            ids, pos = F.pad(ids, (0, ghosts)), F.pad(pos, (0, ghosts))
            tt = None if tt is None else F.pad(tt, (0, ghosts))
        x = self._layers(ids, pos, tt, cu, S, key_mask=mask)[: B * S]
        y, status = finish_padded(x, mask, backend=self.backend)
        return y.view(B, S, -1), status

    def _padded(self, input_ids, attention_mask, token_type_ids):
        """Run a batch padded (eager, or its captured graph on a GPU); one read of the status, then the errors."""
        B, S = input_ids.shape
        if self.use_graphs:
            out, status = replay_graph(self._graphs, ("padded", B, S, token_type_ids is not None),
                                       (input_ids, token_type_ids, attention_mask), self._run_padded)
            y = out.clone()
        else:
            y, status = self._run_padded(input_ids, token_type_ids, attention_mask)
        bad, *lens = status.tolist()
        if 0 in lens:
            raise EtformerError(f"row {lens.index(0)} of the batch is all padding")
        if self.check_finite and bad:
            raise EtformerError(NONFINITE_MESSAGE)
        return y

    def _run(self, input_ids, token_type_ids, keep, T, max_len, B, S):
        ids, pos, tt, cu, flat = self._prepare(input_ids, token_type_ids, keep, B, S, T)
        return self._pad(self._layers(ids, pos, tt, cu, max_len), flat, B, S)

    def _graphed(self, input_ids, token_type_ids, keep, T, max_len, B, S):
        """Replay the graph for this batch (choose_graph_key: its exact token count, or its bucket's), capturing it on
        first use. Its inputs are the ids, the token types and (when something is padded) the mask; the index work
        runs inside the graph, so a bucket graph serves every token count up to its rows."""
        key = self._graph_key(input_ids, token_type_ids, keep, T, max_len)
        T, max_len = key[2], key[3]
        return replay_graph(self._graphs, key, (input_ids, token_type_ids, keep),
                            lambda ids, tt, kp: self._run(ids, tt, kp, T, max_len, B, S)).clone()

    def graph_replay_fn(self, input_ids, attention_mask=None, token_type_ids=None):
        """The captured graph for these inputs' shape, as a no-argument callable: times the GPU work alone."""
        self(input_ids, attention_mask, token_type_ids)
        if self._sync_free(input_ids, attention_mask):
            return self._graphs[("padded", *input_ids.shape, token_type_ids is not None)][0].replay
        mask = self._validate(input_ids, attention_mask, token_type_ids)
        T, max_len, keep = self._unpadding(mask, *input_ids.shape)
        return self._graphs[self._graph_key(input_ids, token_type_ids, keep, T, max_len)][0].replay

    def encode_fn(self):
        """A callable for etformer.evaluate: batch dict -> last_hidden_state (B, S, d)."""

        def encode(batch):
            b = {k: v.to(self.device) for k, v in batch.items()}
            return self(b["input_ids"], b.get("attention_mask"), b.get("token_type_ids")).last_hidden_state

        return encode

    def summary(self) -> dict:
        out = {}

        def small(rows):
            return {"triton": "etformer kernels on the dense weight",
                    "auto": f"etformer kernels on the dense weight up to {SMALL_KERNEL_MAX_TOKENS} tokens with PDL, "
                            "else cuBLAS"}.get(SMALL_PATH, "cuBLAS") + f" under {rows} tokens"

        for i, L in enumerate(self.layers):
            for kind in ("qkv", "o", "ffn_in", "ffn_out"):
                lin = getattr(L, kind)
                if lin.sparse is None and kind == "ffn_in" and lin.forced is None and DENSE_ACT_KERNEL:
                    kernel = (f"cuBLAS ({small(SPARSE_MIN_TOKENS)}); etformer kernel on the dense weight with the "
                              f"activation fused from {SPARSE_MIN_TOKENS} tokens (sm_90)")
                elif lin.sparse is None:
                    kernel = f"cuBLAS ({small(SPARSE_MIN_TOKENS)})"
                elif lin.dense_weight is None or (SMALL_PATH != "cublas" and SMALL_SPARSE):
                    kernel = "tile"
                else:
                    kernel = f"tile ({small(tile_min_rows(lin.density))})"
                out[f"layer{i}.{kind}"] = {"density": lin.density, "kernel": kernel}
            out[f"layer{i}.v_width"] = L.v_width
        return out


class EncoderOutput(dict):
    """Like HF's BaseModelOutput: .last_hidden_state and ["last_hidden_state"]."""

    def __init__(self, last_hidden_state):
        super().__init__(last_hidden_state=last_hidden_state)
        self.last_hidden_state = last_hidden_state

    def __getitem__(self, k):
        return self.last_hidden_state if k == 0 else super().__getitem__(k)


switch_module(__name__)  # its upper-case switches count as switches (replay_graph)
