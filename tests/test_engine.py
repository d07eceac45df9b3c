"""The engine against Hugging Face's own model: dense and pruned MiniLM, same hidden states and predictions."""
import importlib

import numpy as np
import pytest
import torch

from etformer import optimize
from etformer.errors import EtformerError
from etformer.evaluate import evaluate
from etformer.models import load_model
from etformer.pruning import PruningPlan
from etformer.pruning.recipe import hard_masks
from etformer.sparse import TileSparseWeight
from kernel_utils import CUDA, INTERPRET, needs_triton

DEVICE = "cuda" if CUDA and not INTERPRET else "cpu"
SENTS = ["A man is playing a guitar.", "hello", "The quick brown fox jumps over the lazy dog near the river bank.",
         "Two dogs run through a field of tall green grass while children watch from the fence."]


@pytest.fixture(scope="module")
def minilm():
    return load_model(None)


def _pruned(model, plan):
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        for p, mask in hard_masks(m, plan).values():
            p.mul_(mask)
    return m


def _rel_on_tokens(y, ref, mask):
    m = mask.bool()
    return float((y[m].detach().double() - ref[m].detach().double()).norm() / ref[m].detach().double().norm())


@pytest.mark.parametrize("plan", [None, PruningPlan.uniform("tile", 0.5, (32, 32)),
                                  PruningPlan.attention_aware(0.5, (32, 32)), PruningPlan.uniform("row", 0.3)])
def test_matches_hf_fp32(minilm, plan):
    model, tok = minilm
    if plan is not None:
        model = _pruned(model, plan)
    enc = optimize(model, plan, dtype="float32", device="cpu", backend="reference")
    b = tok(SENTS, padding=True, return_tensors="pt")
    ref = model(**b).last_hidden_state
    y = enc(**b).last_hidden_state
    assert y.shape == ref.shape
    assert _rel_on_tokens(y, ref, b["attention_mask"]) < 1e-5
    assert torch.all(y[~b["attention_mask"].bool()] == 0)
    kinds = enc.summary()
    if plan is None:  # every matrix dense: cuBLAS; FFN-in with its GELU on the kernel from SPARSE_MIN_TOKENS
        assert kinds["layer0.qkv"]["kernel"].startswith("cuBLAS") and "activation" not in kinds["layer0.qkv"]["kernel"]
        assert "dense weight with the activation fused" in kinds["layer0.ffn_in"]["kernel"]
    elif plan.matrices["ffn_in"].pattern == "tile":  # half density: its tiles from 2048 tokens
        k = kinds["layer0.ffn_in"]["kernel"]
        assert k.startswith("tile (") and "under 2048 tokens" in k
    if plan is not None and plan.matrices["v"].pattern == "row":  # V compact when the widest head shrinks
        from etformer.kernels import CompactV

        lin = model.encoder.layer[0].attention.self.value
        assert enc.layers[0].v_width == min(32, CompactV.from_weight(lin.weight.detach(), lin.bias.detach(), 12)[0].width)


def test_same_glue_predictions(minilm, glue_dir):
    model, tok = minilm
    plan = PruningPlan.attention_aware(0.5, (32, 32))
    model = _pruned(model, plan)
    enc = optimize(model, plan, dtype="float32", device="cpu", backend="reference")
    hf = evaluate(model, tok, "stsb", glue_dir=glue_dir, limit=120, return_preds=True)
    et = evaluate(model, tok, "stsb", encode=enc.encode_fn(), glue_dir=glue_dir, limit=120, return_preds=True)
    assert np.max(np.abs(hf["preds"] - et["preds"])) < 1e-4
    assert abs(hf["value"] - et["value"]) < 0.05


def test_task_head_keeps_working(glue_dir):
    from transformers import BertConfig, BertForSequenceClassification
    from transformers import AutoTokenizer
    from etformer.models import default_model_path

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, num_labels=2)
    model = BertForSequenceClassification(cfg).eval()
    tok = AutoTokenizer.from_pretrained(default_model_path())
    enc = optimize(model, dtype="float32", device="cpu")
    hf = evaluate(model, tok, "rte", glue_dir=glue_dir, limit=40, return_preds=True)
    et = evaluate(model, tok, "rte", encode=enc.encode_fn(), glue_dir=glue_dir, limit=40, return_preds=True)
    assert hf["method"] == "task head" and np.array_equal(hf["preds"], et["preds"])


def test_bad_inputs(minilm):
    model, tok = minilm
    enc = optimize(model, dtype="float32", device="cpu")
    ids = torch.randint(1000, 2000, (2, 8))
    with pytest.raises(EtformerError, match="int64 or int32"):
        enc(ids.float())
    with pytest.raises(EtformerError, match="empty batch"):
        enc(ids[:0])
    with pytest.raises(EtformerError, match="exceeds"):
        enc(torch.randint(1000, 2000, (1, 513)))
    with pytest.raises(EtformerError, match="all padding"):
        enc(ids, torch.tensor([[1] * 8, [0] * 8]))
    with pytest.raises(EtformerError, match="NaN"):
        enc(ids, torch.tensor([[1.0] * 8, [float("nan")] * 8]))
    if torch.cuda.is_available():
        with pytest.raises(EtformerError, match="move the inputs"):
            enc(ids.cuda())


def test_plan_mismatch_refused(minilm, tmp_path):
    import json

    model, tok = minilm
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    (tmp_path / "etformer.json").write_text(json.dumps({"plan": PruningPlan.uniform("tile", 0.5).to_json()}))
    with pytest.raises(EtformerError, match="does not match its plan"):
        optimize(str(tmp_path))


def test_cli_eval_engine_et(glue_dir, tmp_path):
    import json

    from etformer.cli import main

    j = tmp_path / "et.json"
    assert main(["eval", "--task", "stsb", "--engine", "et", "--limit", "100", "--json", str(j),
                 "--glue-dir", glue_dir, "--device", "cpu"]) == 0
    r = json.loads(j.read_text())
    assert r["engine"] == "et" and r["value"] > 80


@needs_triton
def test_compact_v_at_one_pass_lengths():
    """Heads of 64 with a quarter of V's rows kept (compact width 16) at 100 and 128 tokens: the one-pass attention
    kernel's 128-key block beside a V narrower than Q/K, which faulted on the H200 before the V block was padded to
    the Q/K block there. Against HF, and against the same engine with V at full width."""
    from conftest import tiny_bert

    model = tiny_bert(layers=1, hidden=128, heads=2, inter=256, positions=128)
    plan = PruningPlan.attention_aware(0.5, (16, 16), v_sparsity=0.75)
    with torch.no_grad():
        for p, mask in hard_masks(model, plan).values():
            p.mul_(mask)
        model.encoder.layer[0].attention.self.value.weight.view(2, 64, 128)[:, 16:] = 0  # 16 rows a head kept
    dt = torch.float16 if DEVICE == "cuda" else torch.float32
    enc = optimize(model, plan, dtype=dt, device=DEVICE, backend="triton")
    full = optimize(model, plan, dtype=dt, device=DEVICE, backend="triton", pruned_v=False)
    assert enc.layers[0].v_width == 16 and full.layers[0].v_width == 64
    ids = torch.randint(1, 100, (2, 128))
    mask = torch.ones(2, 128, dtype=torch.long)
    mask[1, 100:] = 0
    ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    for e in (enc, full):
        e.sync_free_max_tokens = 0
    y = enc(ids.to(DEVICE), mask.to(DEVICE)).last_hidden_state.float().cpu()
    y_full = full(ids.to(DEVICE), mask.to(DEVICE)).last_hidden_state.float().cpu()
    tol = 1e-5 if DEVICE == "cpu" else 5e-3
    assert _rel_on_tokens(y, ref, mask) < tol and _rel_on_tokens(y, y_full, mask) < tol


@needs_triton
@pytest.mark.parametrize("plan", [PruningPlan.uniform("tile", 0.5, (16, 16)), PruningPlan.attention_aware(0.6, (16, 16))])
@pytest.mark.parametrize("fused", ["", "ffn", "layer", "attn", "small", "deferred"],
                         ids=["", "fused-ffn", "fused-layer", "attn-proj", "small", "small-deferred-ln"])
def test_engine_through_kernels_small_bert(plan, fused, monkeypatch):
    """The whole engine on the Triton kernels (interpreter on the CPU, compiled on a GPU) against HF. fused-ffn: the
    small-batch kernels on dense weights with the optional one-launch FFN block (attention and the O projection
    apart); fused-layer: the small-batch kernels with each layer one persistent launch (FUSED_LAYER); attn-proj: the
    small-batch kernels with attention and the O projection in one launch (ATTN_PROJ); small: the small-batch
    kernels, 7 launches a layer; small-deferred-ln: with the first LayerNorm of each layer deferred
    (SMALL_DEFERRED_LN), where every matrix it needs keeps a dense weight."""
    from conftest import tiny_bert
    from etformer.engine import encoder as E

    calls = {"ffn": [], "layer": [], "attn": [], "deferred": []}
    monkeypatch.setattr(E, "FUSED_LAYER", fused == "layer")
    monkeypatch.setattr(E, "ATTN_PROJ", fused == "attn")
    monkeypatch.setattr(E, "SMALL_DEFERRED_LN", fused == "deferred")
    real_layer = E.ETEncoder._small_deferred_layer
    monkeypatch.setattr(E.ETEncoder, "_small_deferred_layer",
                        lambda *a, **k: calls["deferred"].append(1) or real_layer(*a, **k))
    if fused:
        monkeypatch.setattr(E, "SMALL_PATH", "triton")
        monkeypatch.setattr(E, "FUSED_FFN_MAX_TOKENS", 1 << 20 if fused == "ffn" else 0)
        for name, fn in (("ffn", "fused_ffn_partials"), ("layer", "encoder_layer"), ("attn", "attention_proj_partials")):
            real = getattr(E, fn)
            monkeypatch.setattr(E, fn, lambda *a, _r=real, _c=calls[name], **k: _c.append(1) or _r(*a, **k))

    model = tiny_bert(layers=2, hidden=64, heads=2, inter=128)
    with torch.no_grad():
        for p, mask in hard_masks(model, plan).values():
            p.mul_(mask)
        v = model.encoder.layer[0].attention.self.value.weight
        v[::2] = 0  # half of V's rows: compact V of width 16 < 32
    enc = optimize(model, plan, dtype="float32", device=DEVICE, backend="triton")
    enc.sync_free_max_tokens = 0  # the packed (unpadded) path; test_sync_free_padded_path covers the padded one
    assert enc.layers[0].v_width == 16
    ids = torch.randint(1, 100, (3, 19))
    mask = torch.ones(3, 19, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 17:] = 0
    ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    for graphs in ((False, True) if DEVICE == "cuda" else (False,)):
        enc.use_graphs = graphs
        for _ in range(2):  # the second call replays the captured graph
            y = enc(ids.to(DEVICE), mask.to(DEVICE)).last_hidden_state.cpu()
            assert _rel_on_tokens(y, ref, mask) < (1e-5 if DEVICE == "cpu" else 2e-3)
    # each fused operator ran exactly when switched on: the layer once a layer a call
    assert bool(calls["ffn"]) == (fused == "ffn") and bool(calls["layer"]) == (fused == "layer")
    assert bool(calls["attn"]) == (fused == "attn")
    dense_copies = all(lin.dense_weight is not None for L in enc.layers for lin in (L.o, L.ffn_in, L.ffn_out))
    assert bool(calls["deferred"]) == (fused == "deferred" and dense_copies)
    if fused == "layer":
        assert len(calls["layer"]) % 2 == 0 and calls["layer"]


@needs_triton
@pytest.mark.parametrize("plan", [PruningPlan.uniform("tile", 0.5, (16, 16)), PruningPlan.attention_aware(0.6, (16, 16))])
def test_deferred_layernorm_matches_hf(plan, monkeypatch):
    """The post-LN stack with its LayerNorms deferred (DEFERRED_LN_TOKENS, widened here to every batch): only the
    embeddings' and the last LayerNorm run as add+LayerNorm launches, QKV and FFN-in read the un-normalised hidden
    states through folded weights. Against HF in fp32 (interpreter) or, on a GPU, in fp16 within twice HF's own fp16
    error, eager and replayed from a CUDA graph; and against the same engine with the LayerNorms applied."""
    from conftest import tiny_bert
    from etformer.engine import encoder as E

    model = tiny_bert(layers=3, hidden=64, heads=2, inter=128)
    with torch.no_grad():
        for p, mask in hard_masks(model, plan).values():
            p.mul_(mask)
        for layer in model.encoder.layer:  # LayerNorms that are not the identity, so a fold that drops them shows
            for ln in (layer.attention.output.LayerNorm, layer.output.LayerNorm):
                ln.weight.copy_(1 + 0.3 * torch.randn_like(ln.weight))
                ln.bias.copy_(0.2 * torch.randn_like(ln.bias))
    dt = torch.float16 if DEVICE == "cuda" else torch.float32
    enc = optimize(model, plan, dtype=dt, device=DEVICE, backend="triton")
    enc.sync_free_max_tokens = 0
    enc.use_graphs = False  # eager first; the graphs below
    ids = torch.randint(1, 100, (3, 40))
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[1, 25:] = 0
    ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    monkeypatch.setattr(E, "DEFERRED_LN_TOKENS", None)
    plain = enc(ids.to(DEVICE), mask.to(DEVICE)).last_hidden_state.float().cpu()
    monkeypatch.setattr(E, "DEFERRED_LN_TOKENS", (0, 1 << 40))
    lns, embs, folded = [], [], []
    real_ln, real_emb, real_tl = E.add_layernorm, E.embed_layernorm, E.tile_linear
    monkeypatch.setattr(E, "add_layernorm", lambda *a, **k: lns.append(1) or real_ln(*a, **k))
    monkeypatch.setattr(E, "embed_layernorm", lambda *a, **k: embs.append(1) or real_emb(*a, **k))
    monkeypatch.setattr(E, "tile_linear", lambda *a, **k: folded.append(k.get("x_norm") is not None) or real_tl(*a, **k))
    y = enc(ids.to(DEVICE), mask.to(DEVICE)).last_hidden_state.float().cpu()
    # the embeddings' LayerNorm (in the embeddings' launch, FUSED_EMBED) and the last; QKV of layers 1, 2, every FFN-in
    assert len(embs) == int(E.FUSED_EMBED) and len(lns) + len(embs) == 2 and sum(folded) == 2 * 3 - 1
    if DEVICE == "cpu":
        assert _rel_on_tokens(y, ref, mask) < 1e-5 and _rel_on_tokens(y, plain, mask) < 1e-5
    else:
        hf16 = model.half().cuda()(input_ids=ids.cuda(), attention_mask=mask.cuda()).last_hidden_state.float().cpu()
        model.float()
        limit = 2 * _rel_on_tokens(hf16, ref, mask)
        assert _rel_on_tokens(y, ref, mask) <= limit and _rel_on_tokens(plain, ref, mask) <= limit
        enc.use_graphs = True
        enc._graphs.clear()
        for _ in range(2):  # capture (the folds exist already), then replay
            yg = enc(ids.cuda(), mask.cuda()).last_hidden_state.float().cpu()
            assert _rel_on_tokens(yg, ref, mask) <= limit


def test_switch_generation_counts_switch_changes(monkeypatch):
    """Assigning an upper-case setting of a switch module, or changing one of its tables in place, counts a switch
    change (the engine then recaptures its graphs); lower-case names and private caches do not."""
    from etformer.kernels import _common as C
    T = importlib.import_module("etformer.kernels.tile_linear")
    A = importlib.import_module("etformer.kernels.attention")
    E = importlib.import_module("etformer.engine.encoder")
    assert isinstance(T.TILE_SUB, C.SwitchTable) and isinstance(E.GRAPH_ROW_ROUND_MAX_FILL, C.SwitchTable)
    g = C.switch_generation()
    monkeypatch.setattr(A, "USE_TMA", not A.USE_TMA)
    assert C.switch_generation() == g + 1
    monkeypatch.setattr(E, "DEFERRED_LN_TOKENS", None)
    assert C.switch_generation() == g + 2
    saved = dict(T.DENSE_LAUNCH)
    T.DENSE_LAUNCH[128] = (32, 4, 4)
    T.DENSE_LAUNCH.update(saved)
    assert C.switch_generation() == g + 4 and T.DENSE_LAUNCH == saved
    T._ORDER_CACHE.clear()
    monkeypatch.setattr(E, "tile_linear", E.tile_linear)
    assert C.switch_generation() == g + 4
    monkeypatch.setattr(importlib.import_module("etformer.kernels.layernorm"), "MULTI_ROW_LAUNCH", ())
    assert C.switch_generation() == g + 5


@pytest.mark.skipif(not CUDA or INTERPRET, reason="CUDA graphs need a GPU")
def test_graphs_recaptured_after_a_switch_changes(monkeypatch):
    """A graph bakes in the switches of its capture: after one changes, the next call captures again, in the new
    form (here the deferred LayerNorm, whose add+LayerNorm launches are counted while Python runs the layers)."""
    from conftest import tiny_bert
    E = importlib.import_module("etformer.engine.encoder")
    plan = PruningPlan.uniform("tile", 0.5, (16, 16))
    model = tiny_bert(layers=2, hidden=64, heads=2, inter=128)
    with torch.no_grad():
        for p, mask in hard_masks(model, plan).values():
            p.mul_(mask)
    enc = optimize(model, plan, dtype=torch.float16, device="cuda", backend="triton")
    enc.sync_free_max_tokens = 0
    ids = torch.randint(1, 100, (2, 24), device="cuda")
    monkeypatch.setattr(E, "DEFERRED_LN_TOKENS", None)
    first = enc(ids).last_hidden_state.clone()
    lns, folded = [], []
    real_ln, real_tl = E.add_layernorm, E.tile_linear
    monkeypatch.setattr(E, "add_layernorm", lambda *a, **k: lns.append(1) or real_ln(*a, **k))
    monkeypatch.setattr(E, "tile_linear", lambda *a, **k: folded.append(k.get("x_norm") is not None) or real_tl(*a, **k))
    assert torch.equal(enc(ids).last_hidden_state, first) and not lns and not folded  # a replay: no layer code runs
    monkeypatch.setattr(E, "DEFERRED_LN_TOKENS", (0, 1 << 40))
    y = enc(ids).last_hidden_state
    # captured again, in the deferred form: folded GEMMs, and add+LayerNorm launches only for the last LayerNorm (and
    # the embeddings' where they are not in the embeddings' own launch), the same count in every run
    per_run = 1 + (not E.FUSED_EMBED)
    assert any(folded) and lns and len(lns) % per_run == 0 and len(lns) // per_run == sum(folded) // 3
    enc.use_graphs = False
    eager = enc(ids).last_hidden_state.float()
    assert float((y.float() - eager).abs().max()) <= 1e-2 * float(eager.abs().max())


@needs_triton
@pytest.mark.parametrize("fused_layer", [False, True], ids=["", "fused-layer"])
def test_graph_replay_with_new_mask_same_bucket(fused_layer, monkeypatch):
    """Batches with the same (B, S, T, max_len), or whose bucket is a captured graph, share it; the varlen indices
    are rebuilt on the device from each batch's mask, so the second batch (rows permuted) must still match HF, a full
    batch (no padding, no index work) must too, and so must one run in a graph with a ghost row. fused-layer: each
    layer one persistent launch (on the small-batch kernel path)."""
    from conftest import tiny_bert
    from etformer.engine import encoder as E

    monkeypatch.setattr(E, "FUSED_LAYER", fused_layer)
    if fused_layer:
        monkeypatch.setattr(E, "SMALL_PATH", "triton")

    model = tiny_bert(layers=2, hidden=64, heads=2, inter=128)
    enc = optimize(model, None, dtype="float32", device=DEVICE, backend="triton")
    enc.sync_free_max_tokens = 0  # the packed path's graphs
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 100, (3, 13), generator=g)
    lens = [[13, 4, 9], [9, 13, 4], [13, 13, 13], [3, 13, 9]]  # 25 tokens: its bucket is the 26-row graph (one ghost)
    for ls in lens:
        mask = (torch.arange(13)[None, :] < torch.tensor(ls)[:, None]).long()
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        y = enc(ids.to(DEVICE), mask.to(DEVICE)).last_hidden_state.cpu()
        assert _rel_on_tokens(y, ref, mask) < (1e-5 if DEVICE == "cpu" else 2e-3), ls
        assert torch.all(y[~mask.bool()] == 0)
    if DEVICE == "cuda":
        # (26 rows, max 13) shared by batches 1, 2 and 4 (64 rows where graph_rows rounds them); 39 for the full one
        assert len(enc._graphs) == 2


@needs_triton
@pytest.mark.parametrize("small_path,small_sparse", [("triton", False), ("triton", True), ("cublas", False),
                                                     ("auto", False)])
def test_linear_routes(monkeypatch, small_path, small_sparse):
    """Which weight each call runs on: a sparse matrix keeps a dense copy for batches under SPARSE_MIN_TOKENS rows
    (the small-batch path: etformer's kernels on the dense weight or on the tiles, or cuBLAS), and its tiles above;
    a dense matrix runs cuBLAS at scale. backend="triton" always takes the kernels. "auto" takes the kernels up to
    SMALL_KERNEL_MAX_TOKENS rows where kernels launch with PDL (an sm_90 GPU), else cuBLAS. Every route gives the
    product."""
    import torch.nn.functional as F

    from etformer.engine import encoder as E
    from etformer.kernels._common import pdl_on

    monkeypatch.setattr(E, "SMALL_PATH", small_path)
    monkeypatch.setattr(E, "SMALL_SPARSE", small_sparse)
    dt = torch.float16 if DEVICE == "cuda" else torch.float32
    torch.manual_seed(0)
    W = torch.randn(256, 128, device=DEVICE, dtype=dt) / 12
    Wd = W.clone()
    W[:64, :64] = 0
    W[128:, 64:] = 0
    b = torch.randn(256, device=DEVICE, dtype=dt)
    lin, dense = E.Linear(W, b, (64, 64)), E.Linear(Wd, b, (64, 64))
    assert lin.sparse is not None and lin.dense_weight is not None and dense.sparse is None
    assert E.Linear(W, b, (64, 64), force="tile").dense_weight is None
    small, big = 64, E.SPARSE_MIN_TOKENS + 7
    probe = torch.zeros(small, 128, device=DEVICE, dtype=dt)
    kernels_small = small_path == "triton" or (small_path == "auto" and pdl_on(probe))
    assert E._small_on_kernels(probe) == kernels_small
    backends = ["triton", "reference"] + (["auto"] if DEVICE == "cuda" else [])
    for bk in backends:
        for M in (small, big):
            x = torch.zeros(M, 128, device=DEVICE, dtype=dt)
            got_s, got_d = lin._operand(x, bk), dense._operand(x, bk)
            if bk == "reference":
                want_s, want_d = lin.sparse, None
            elif bk == "triton":
                want_s, want_d = lin.sparse, (dense.dense_weight if M == small and kernels_small else None)
            elif M == big:
                want_s, want_d = lin.sparse, None
            else:
                want_s = (lin.sparse if small_sparse else lin.dense_weight) if kernels_small else None
                want_d = dense.dense_weight if kernels_small else None
            assert got_s is want_s and got_d is want_d, (bk, M)
    if DEVICE != "cuda":
        return
    for M in (small, big):
        x = torch.randn(M, 128, device="cuda", dtype=dt)
        for L, Wm in ((lin, W), (dense, Wd)):
            ref = F.gelu(F.linear(x.float(), Wm.float(), b.float()))
            y = L(x, activation="gelu")
            assert float((y.float() - ref).norm() / ref.norm()) < 2e-3
            ws = L.partial_sums(x)
            assert (ws is None) == (M == big or not kernels_small)
            if ws is not None:
                lin_ref = F.linear(x.float(), Wm.float())
                assert float((ws.sum(0) - lin_ref).norm() / lin_ref.norm()) < 2e-3


@needs_triton
def test_dense_activation_in_place(monkeypatch):
    """A dense matrix called with an activation (FFN-in) runs the tile kernel on its dense weight in place, with the
    activation in the epilogue, from SPARSE_MIN_TOKENS rows; without an activation, under that, with the switch off,
    forced dense, or sparse, it does not. No second copy of the weight is kept. The route gives the product."""
    import torch.nn.functional as F

    from etformer.engine import encoder as E

    monkeypatch.setattr(E, "SPARSE_MIN_TOKENS", 48)  # small enough for the interpreter
    dt = torch.float16 if DEVICE == "cuda" else torch.float32
    torch.manual_seed(2)
    W = torch.randn(256, 128, device=DEVICE, dtype=dt) / 12
    b = torch.randn(256, device=DEVICE, dtype=dt)
    lin = E.Linear(W, b, (64, 64))
    assert lin.sparse is None and not any(isinstance(v, TileSparseWeight) for v in vars(lin).values())
    bk = "auto" if DEVICE == "cuda" else "triton"
    big = torch.randn(50, 128, device=DEVICE, dtype=dt)
    assert lin._operand(big, bk, "gelu") is lin.dense_weight
    assert lin._operand(big, bk) is None and lin._operand(big, "reference", "gelu") is None
    assert E.Linear(W, b, (64, 64), force="dense")._operand(big, bk, "gelu") is None
    Ws = W.clone()
    Ws[:128] = 0
    sparse = E.Linear(Ws, b, (64, 64))
    assert sparse._operand(big, bk, "gelu") is sparse.sparse  # sparse: its own tiles serve
    y = lin(big, activation="gelu", backend=bk)
    ref = F.gelu(F.linear(big.double(), W.double(), b.double()))
    assert float((y.double() - ref).norm() / ref.norm()) < (2e-3 if dt == torch.float16 else 1e-5)
    TL = importlib.import_module("etformer.kernels.tile_linear")
    monkeypatch.setattr(TL, "USE_TMA", False)  # the pointer-load form of the kernel stays on cuBLAS
    assert lin._operand(big, bk, "gelu") is None
    monkeypatch.setattr(TL, "USE_TMA", True)
    monkeypatch.setattr(E, "DENSE_ACT_KERNEL", False)
    assert lin._operand(big, bk, "gelu") is None


def test_quarter_density_keeps_no_dense_copy():
    """A matrix that never leaves its tiles (tile_min_rows 0: the first of SPARSE_TIERS) keeps no dense copy; a
    half-density one keeps it for the batches under its tier's rows; a dense one keeps its weight."""
    from etformer.engine import encoder as E

    torch.manual_seed(3)
    W = torch.randn(256, 256)
    keep = torch.zeros(4, 4, dtype=torch.bool)
    keep[:, 0] = True  # a quarter of the 64x64 tiles
    quarter = W * keep.repeat_interleave(64, 0).repeat_interleave(64, 1)
    keep[:, 1] = True
    half = W * keep.repeat_interleave(64, 0).repeat_interleave(64, 1)
    assert E.tile_min_rows(0.25) == 0 and E.tile_min_rows(0.5) > 0
    assert E.Linear(quarter, None, (64, 64)).dense_weight is None
    assert E.Linear(half, None, (64, 64)).dense_weight is not None
    assert E.Linear(W, None, (64, 64)).dense_weight is not None


def test_sparse_routes_by_density(monkeypatch):
    """A sparse matrix leaves its dense copy for its tiles from tile_min_rows(density) rows: the first SPARSE_TIERS
    entry its density falls in, else SPARSE_MIN_TOKENS (never later than SPARSE_MIN_TOKENS). On a GPU the "auto"
    route follows it; each route gives the product."""
    import torch.nn.functional as F

    from etformer.engine import encoder as E

    monkeypatch.setattr(E, "SPARSE_MIN_TOKENS", 4096)
    monkeypatch.setattr(E, "SPARSE_TIERS", ((0.3, 1024), (0.55, 2048)))
    assert ([E.tile_min_rows(d) for d in (0.1, 0.25, 0.3, 0.31, 0.5, 0.55, 0.56, 0.79)]
            == [1024] * 3 + [2048] * 3 + [4096] * 2)
    monkeypatch.setattr(E, "SPARSE_MIN_TOKENS", 1000)
    assert E.tile_min_rows(0.25) == 1000 and E.tile_min_rows(0.5) == 1000
    monkeypatch.setattr(E, "SPARSE_MIN_TOKENS", 4096)
    if DEVICE != "cuda":
        return
    torch.manual_seed(1)
    W = torch.randn(256, 128, device="cuda", dtype=torch.float16) / 12
    W[64:] = 0  # 1 of 4 block-rows kept: density 0.25
    b = torch.randn(256, device="cuda", dtype=torch.float16)
    lin = E.Linear(W, b, (64, 64))
    assert lin.sparse.density == 0.25 and lin.dense_weight is not None
    for M, want in ((512, None), (1023, None), (1024, lin.sparse), (4096, lin.sparse)):  # None: cuBLAS, dense copy
        x = torch.randn(M, 128, device="cuda", dtype=torch.float16)
        assert lin._operand(x, "auto") is want, M
        ref = F.linear(x.float(), W.float(), b.float())
        assert float((lin(x).float() - ref).norm() / ref.norm()) < 2e-3


def test_graph_buckets():
    from etformer.engine.encoder import ETEncoder

    b = ETEncoder.graph_bucket
    assert b(39, 13, 3, 13) == (39, 13)  # no padding: exact
    assert b(25, 13, 3, 13) == (26, 13)
    assert b(1000, 300, 4, 512) == (1024, 512)
    assert b(1000, 200, 8, 512) == (1024, 256)
    assert b(2047, 512, 4, 512) == (2048, 512)  # never past B*S
    for T in range(1, 5000, 7):  # at most 1/8 extra rows, and never fewer
        Tb, _ = b(T, 64, 64, 128)
        assert T <= Tb <= T + T // 8 + 1
    assert len({b(T, 64, 64, 128)[0] for T in range(64, 64 * 128)}) <= 8 * 7 + 1  # 8 buckets an octave


def test_graph_key_policy():
    """Exact token counts for the first GRAPH_EXACT_PER_SHAPE graphs of a shape, then buckets; a count whose bucket
    graph exists reuses it; other shapes and extras count separately; a padded batch never takes the graph of an
    unpadded one, even where its bucket comes out as the full shape."""
    from etformer.engine.encoder import GRAPH_EXACT_PER_SHAPE, choose_graph_key

    cache = {}
    full = choose_graph_key(cache, 4, 512, 2048, 512, (False,), padded=False)
    assert full == (4, 512, 2048, 512, False, False)
    cache[full] = None
    for T in range(1000, 1000 + GRAPH_EXACT_PER_SHAPE):
        k = choose_graph_key(cache, 4, 512, T, 300, (False,), padded=True)
        assert k == (4, 512, T, 300, False, True)
        cache[k] = None
    assert choose_graph_key(cache, 4, 512, 1001, 300, (False,), padded=True) == (4, 512, 1001, 300, False, True)
    k = choose_graph_key(cache, 4, 512, 1500, 400, (False,), padded=True)
    assert k == (4, 512, 1536, 512, False, True)  # the shape has its exact graphs: a bucket
    cache[k] = None
    assert choose_graph_key(cache, 4, 512, 1499, 390, (False,), padded=True) == k  # same bucket, reused
    assert choose_graph_key(cache, 4, 512, 1500, 400, (True,), padded=True) == (4, 512, 1500, 400, True, True)
    assert choose_graph_key(cache, 8, 512, 1500, 400, (False,), padded=True) == (8, 512, 1500, 400, False, True)
    # 2047 of 2048 tokens: its bucket is (2048 rows, longest 512), the full batch's shape, but not its graph
    assert choose_graph_key(cache, 4, 512, 2047, 500, (False,), padded=True) == (4, 512, 2048, 512, False, True)
    rounded = lambda t: 256  # noqa: E731  (graph_rows rounding a padded batch up to the full 256 rows)
    cache[choose_graph_key(cache, 1, 256, 256, 256, (False,), padded=False)] = None
    assert choose_graph_key(cache, 1, 256, 213, 213, (False,), rounded, padded=True) == (1, 256, 256, 213, False, True)


@needs_triton
def test_padded_batch_never_replays_unpadded_graph():
    """A full batch, then a padded one of the same shape whose rounded rows and bucket equal the full batch's: the
    padded batch must get its own graph (it needs the unpad indices and the mask) and match HF."""
    from conftest import tiny_bert

    model = tiny_bert(layers=2, hidden=64, heads=2, inter=128)
    enc = optimize(model, None, dtype="float32", device=DEVICE, backend="triton")
    enc.sync_free_max_tokens = 0  # the packed path's graphs
    g = torch.Generator().manual_seed(4)
    S = 64
    ids = torch.randint(1, 100, (1, S), generator=g)
    for n in (S, 61, 62):  # the bucket of 61 and of 62 tokens is (64 rows, longest 64): the full batch's shape
        mask = (torch.arange(S)[None, :] < n).long()
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        y = enc(ids.to(DEVICE), mask.to(DEVICE)).last_hidden_state.cpu()
        assert _rel_on_tokens(y, ref, mask) < (1e-5 if DEVICE == "cpu" else 2e-3), n
    if DEVICE == "cuda":
        assert {k[-1] for k in enc._graphs} == {False, True}


@needs_triton
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_ghost_rows_change_nothing(backend):
    """Running with more packed rows than real tokens (a graph bucket's ghosts) gives the same real outputs, for the
    BERT engine and the nn.TransformerEncoder one, with the ghost rows' inputs poisoned by whatever the gather reads."""
    from torch import nn

    from conftest import tiny_bert

    dev = DEVICE if backend == "triton" else "cpu"
    tol = 1e-5 if dev == "cpu" else 2e-3  # fp32 on a GPU: tf32 matmuls
    model = tiny_bert(layers=2, hidden=64, heads=2, inter=128)
    enc = optimize(model, None, dtype="float32", device=dev, backend=backend)
    ids = torch.randint(1, 100, (3, 13))
    mask = (torch.arange(13)[None, :] < torch.tensor([13, 3, 9])[:, None]).long()
    keep = mask.bool().to(dev)
    T = int(mask.sum())
    exact = enc._run(ids.to(dev), None, keep, T, 13, 3, 13).cpu()
    ghost = enc._run(ids.to(dev), None, keep, T + 6, 16, 3, 13).cpu()
    assert float((exact - ghost).norm() / exact.norm()) < tol
    ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert _rel_on_tokens(ghost, ref, mask) < tol
    assert torch.all(ghost[~mask.bool()] == 0)

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 2, 48, dropout=0.0, batch_first=True)
    te = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    et = optimize(te, dtype="float32", device=dev, tile=(16, 16), backend=backend)
    x = torch.randn(3, 13, 32, device=dev)
    exact = et._run(x, keep, T, 13, False).cpu()
    ghost = et._run(x, keep, T + 6, 16, False).cpu()
    assert float((exact - ghost).norm() / exact.norm()) < tol
    assert torch.all(ghost[~mask.bool()] == 0)


def test_graph_rows(monkeypatch):
    """Small-batch graphs round their packed rows up to GRAPH_ROW_MULTIPLE where the small-batch kernels run them and
    the last block holds at most GRAPH_ROW_ROUND_MAX_FILL rows, never past SMALL_KERNEL_MAX_TOKENS; the graph keys
    carry the rounded rows, exact and bucket alike."""
    import etformer.engine.encoder as E

    x = torch.zeros(1)
    monkeypatch.setattr(E, "SMALL_PATH", "triton")
    monkeypatch.setattr(E, "GRAPH_ROW_ROUND_MAX_FILL", {128: 48, 256: 32})
    got = [E.graph_rows(t, x) for t in (1, 48, 49, 64, 65, 112, 113, 120, 129, 160, 161, 193, 255, 256, 257, 4000)]
    assert got == [64, 64, 49, 64, 128, 128, 113, 120, 192, 192, 161, 256, 255, 256, 257, 4000]
    monkeypatch.setattr(E, "GRAPH_ROW_ROUND_MAX_FILL", {})  # no threshold: every partly filled block rounds
    got = [E.graph_rows(t, x) for t in (1, 64, 65, 120, 129, 193, 255, 256, 257, 4000)]
    assert got == [64, 64, 128, 128, 192, 256, 256, 256, 257, 4000]
    monkeypatch.setattr(E, "GRAPH_ROW_MULTIPLE", 1)
    assert E.graph_rows(129, x) == 129
    monkeypatch.setattr(E, "GRAPH_ROW_MULTIPLE", 64)
    monkeypatch.setattr(E, "SMALL_PATH", "cublas")
    assert E.graph_rows(129, x) == 129
    monkeypatch.setattr(E, "SMALL_PATH", "auto")  # the kernels need PDL (sm_90): never on the CPU
    assert E.graph_rows(129, x) == 129
    monkeypatch.setattr(E, "SMALL_PATH", "triton")
    rows = lambda t: E.graph_rows(t, x)  # noqa: E731
    cache = {}
    assert E.choose_graph_key(cache, 2, 128, 193, 127, (False,), rows, padded=True) == (2, 128, 256, 127, False, True)
    for L in range(90, 90 + E.GRAPH_EXACT_PER_SHAPE):  # the shape's exact graphs: rows 128, longest rows 90..93
        cache[E.choose_graph_key(cache, 2, 128, 100, L, (False,), rows, padded=True)] = None
    assert len(cache) == E.GRAPH_EXACT_PER_SHAPE
    assert E.choose_graph_key(cache, 2, 128, 150, 100, (False,), rows, padded=True) == \
        (2, 128, 192, 128, False, True)  # bucket 160


@needs_triton
def test_padded_path_ghost_rows(monkeypatch):
    """The padded path with ghost rows past B*S (graph_rows) gives the same hidden states as without them."""
    import etformer.engine.encoder as E
    from conftest import tiny_bert

    model = tiny_bert(layers=2, hidden=64, heads=2, inter=128)
    enc = optimize(model, None, dtype="float32", device=DEVICE, backend="triton")
    ids = torch.randint(1, 100, (3, 13), device=DEVICE)
    tt = torch.randint(0, 2, (3, 13), device=DEVICE)
    mask = (torch.arange(13)[None, :] < torch.tensor([13, 3, 9])[:, None]).to(DEVICE)
    monkeypatch.setattr(E, "SMALL_PATH", "triton")
    enc.use_graphs = True  # the flag alone: _run_padded is called directly, eagerly
    monkeypatch.setattr(E, "GRAPH_ROW_MULTIPLE", 1)
    y0, st0 = enc._run_padded(ids, tt, mask)
    monkeypatch.setattr(E, "GRAPH_ROW_MULTIPLE", 64)
    assert E.graph_rows(39, ids) == 64
    y1, st1 = enc._run_padded(ids, tt, mask)
    assert y1.shape == y0.shape == (3, 13, 64)
    assert float((y1 - y0).norm() / y0.norm()) < (1e-5 if DEVICE == "cpu" else 2e-3)
    assert torch.equal(st0, st1) and st1.tolist() == [0, 13, 3, 9]


@needs_triton
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_sync_free_padded_path(backend):
    """Small batches run padded, the mask a key bias, with no host read before the replay: the same hidden states as
    HF (right and left padding) and as the unpadded path, zeros at padded positions; one graph serves every mask of
    a shape; an all-padding row and a NaN output are still reported (from the status read after the replay)."""
    from conftest import tiny_bert

    dev = DEVICE if backend == "triton" else "cpu"
    tol = 1e-5 if dev == "cpu" else 2e-3
    model = tiny_bert(layers=2, hidden=64, heads=2, inter=128)
    enc = optimize(model, None, dtype="float32", device=dev, backend=backend)
    assert enc.sync_free_max_tokens == (256 if dev == "cuda" else 0)
    ids = torch.randint(1, 100, (3, 13))
    tt = torch.randint(0, 2, (3, 13))
    masks = [(torch.arange(13)[None, :] < torch.tensor([13, 3, 9])[:, None]).long(),
             (torch.arange(13)[None, :] >= torch.tensor([0, 6, 11])[:, None]).long(),  # left padding
             torch.ones(3, 13, dtype=torch.long)]
    for mask in masks:
        ref = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        enc.sync_free_max_tokens = 0
        unpadded = enc(ids.to(dev), mask.to(dev), tt.to(dev)).last_hidden_state.cpu()
        enc.sync_free_max_tokens = 1 << 20
        for _ in range(2):  # on a GPU the second call replays the graph
            y = enc(ids.to(dev), mask.bool().to(dev), tt.to(dev)).last_hidden_state.cpu()
            assert _rel_on_tokens(y, ref, mask) < tol
            assert float((y - unpadded).norm() / unpadded.norm()) < tol
            assert torch.all(y[~mask.bool()] == 0)
    if dev == "cuda":
        assert sum(1 for k in enc._graphs if k[0] == "padded") == 1
    enc.check_finite = False  # without the check the packed path reads nothing after its replay: it is taken
    assert not enc._sync_free(ids, masks[0])
    enc.check_finite = True
    assert enc._sync_free(ids, masks[0]) and not enc._sync_free(ids, masks[0].float())  # float masks: checked first
    with pytest.raises(EtformerError, match="row 1 of the batch is all padding"):
        enc(ids.to(dev), torch.tensor([[1] * 13, [0] * 13, [1] * 13], device=dev))
    with torch.no_grad():
        enc.layers[1].ln2[0][3] = float("nan")
    with pytest.raises(EtformerError, match="NaN or inf"):
        enc(ids.to(dev), masks[0].to(dev))


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_lengths_count_nonzero_mask_entries(backend):
    """The packed path's lengths read counts each row's nonzero mask entries, whatever the mask's dtype, and reports
    an all-padding row; the boolean mask is made only for a batch with padding (a bool mask is used as given); a mask
    of 0s and 2s gives the forward of the same mask in 0s and 1s."""
    from conftest import tiny_bert

    E = importlib.import_module("etformer.engine.encoder")
    dev = DEVICE if backend == "triton" else "cpu"
    model = tiny_bert(layers=2, hidden=64, heads=2, inter=128)
    enc = optimize(model, None, dtype="float32", device=dev, backend=backend)
    enc.sync_free_max_tokens = 0  # the packed path, which reads the lengths
    base = torch.arange(13)[None, :] < torch.tensor([13, 3, 9])[:, None]
    for mask in (base.long() * 2, base, base.float(), base.to(torch.int32)):
        assert enc._lengths(mask.to(dev), 3, 13) == (25, 13)
    assert enc._lengths(None, 3, 13) == (39, 13)
    with pytest.raises(EtformerError, match="row 2 of the batch is all padding"):
        enc._lengths(torch.tensor([[1] * 13, [1] * 13, [0] * 13], device=dev), 3, 13)
    ids = torch.randint(1, 100, (3, 13), device=dev)
    y2 = enc(ids, (base.long() * 2).to(dev)).last_hidden_state
    assert torch.equal(y2, enc(ids, base.to(dev)).last_hidden_state)
    m = base.to(dev)
    assert E.ETEncoder._keep(m) is m and torch.equal(E.ETEncoder._keep(m.long() * 3), m)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_fused_embeddings(backend, monkeypatch):
    """The embeddings in one launch (FUSED_EMBED) give the hidden states of the separate gathers, sums and LayerNorm,
    with and without token types, padded or not; a token id past the vocabulary is reported, not read."""
    from conftest import tiny_bert

    E = importlib.import_module("etformer.engine.encoder")
    dev = DEVICE if backend == "triton" else "cpu"
    model = tiny_bert(layers=2, hidden=64, heads=2, inter=128)
    enc = optimize(model, None, dtype="float32", device=dev, backend=backend)
    ids = torch.randint(1, 100, (3, 13), device=dev)
    tt = torch.randint(0, 2, (3, 13), device=dev)
    mask = (torch.arange(13)[None, :] < torch.tensor([13, 3, 9])[:, None]).long().to(dev)
    for m, t in ((None, None), (mask, tt), (mask, None)):
        ys = {}
        for fused in (True, False):
            monkeypatch.setattr(E, "FUSED_EMBED", fused)
            ys[fused] = enc(ids, m, t).last_hidden_state
        assert float((ys[True] - ys[False]).norm() / ys[False].norm()) < 1e-5
    monkeypatch.setattr(E, "FUSED_EMBED", True)
    bad = ids.clone()
    bad[1, 2] = model.config.vocab_size
    with pytest.raises(EtformerError, match="vocabulary size"):
        enc(bad, mask)


@pytest.mark.skipif(not CUDA or INTERPRET, reason="CUDA graphs need a GPU")
def test_speculated_full_batches(monkeypatch):
    """A masked batch whose shape's last batch had no padding replays the full-length graph before its lengths are
    read (SPECULATE_FULL): the same output as reading first; a padded batch of that shape is run again through its
    real tokens' graph (and the next one is read first); an all-padding row is still refused."""
    from conftest import tiny_bert

    E = importlib.import_module("etformer.engine.encoder")
    model = tiny_bert(layers=2, hidden=64, heads=2, inter=128)
    enc = optimize(model, None, dtype=torch.float16, device="cuda", backend="triton")
    enc.sync_free_max_tokens = 0  # the packed path
    ids = torch.randint(1, 100, (3, 24), device="cuda")
    full = torch.ones(3, 24, dtype=torch.long, device="cuda")
    padded = full.clone()
    padded[1, 10:] = 0
    calls = []
    real = enc._speculate
    monkeypatch.setattr(enc, "_speculate", lambda *a: calls.append(1) or real(*a))

    def both(mask):
        monkeypatch.setattr(E, "SPECULATE_FULL", False)
        ref = enc(ids, mask).last_hidden_state.clone()
        monkeypatch.setattr(E, "SPECULATE_FULL", True)
        return ref

    ref_full = both(full)  # read first: the shape is now known full
    for _ in range(2):
        assert torch.equal(enc(ids, full).last_hidden_state, ref_full)
    assert len(calls) == 2
    ref_pad = both(padded)
    enc._full_shapes.add((3, 24, False))
    y = enc(ids, padded).last_hidden_state  # speculated, missed, run again
    assert len(calls) == 3 and torch.equal(y, ref_pad) and (3, 24, False) not in enc._full_shapes
    assert torch.equal(enc(ids, padded).last_hidden_state, ref_pad) and len(calls) == 3  # read first now
    enc(ids, full)
    enc(ids, full)
    assert len(calls) == 4
    bad = full.clone()
    bad[2] = 0
    with pytest.raises(EtformerError, match="row 2 of the batch is all padding"):
        enc(ids, bad)
    assert len(calls) == 5
