"""End to end through the command line, on the real MiniLM and real GLUE data."""
import json
import os

import pytest
import torch

from etformer.cli import main


def run(*argv):
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, glue_dir):
    out = tmp_path_factory.mktemp("ck") / "minilm-tile50"
    rc = run("prune", "--task", "stsb", "--pattern", "tile", "--sparsity", 0.5, "--out", out, "--max-steps", 3,
             "--batch-size", 8, "--max-len", 32, "--train-limit", 64, "--eval-limit", 300, "--glue-dir", glue_dir,
             "--device", "cpu")
    assert rc == 0
    return out


def test_prune_writes_hf_checkpoint(pruned):
    from transformers import AutoModel

    names = set(os.listdir(pruned))
    assert {"config.json", "model.safetensors", "etformer.json", "tokenizer.json"} <= names
    assert not [n for n in os.listdir(pruned.parent) if n.startswith(".etformer")]
    meta = json.loads((pruned / "etformer.json").read_text())
    from etformer.pruning.plan import DEFAULT_TILE

    bm, bk = DEFAULT_TILE
    assert meta["plan"]["tile"] == [bm, bk] and meta["plan"]["matrices"]["q"] == {"pattern": "tile", "sparsity": 0.5}
    for m in ("dense", "pruned"):
        v = meta["metrics"][m]["value"]
        assert meta["metrics"][m]["metric"] == "spearman" and -100 <= v <= 100 and v == v
    assert meta["metrics"]["dense"]["value"] > 80  # 300 dev pairs of the untouched model
    model = AutoModel.from_pretrained(pruned)
    n = 0
    for name, p in model.named_parameters():
        if "encoder.layer" in name and name.endswith("weight") and p.dim() == 2:
            n += 1
            t = p.detach().view(p.shape[0] // bm, bm, p.shape[1] // bk, bk).permute(0, 2, 1, 3).flatten(2)
            zero = (t == 0).all(-1)
            assert zero.float().mean() == 0.5, name  # exactly half of the tiles are zero...
            assert (t == 0).float().mean() < 0.5 + 1e-3  # ...and the zeros come in whole tiles
            assert meta["sparsity"][name[: -len(".weight")]]["tile_sparsity"] == 0.5
    assert n == 36


def test_eval_and_info_on_checkpoint(pruned, glue_dir, tmp_path):
    j = tmp_path / "r.json"
    assert run("eval", pruned, "--task", "stsb", "--json", j, "--limit", 200, "--glue-dir", glue_dir) == 0
    r = json.loads(j.read_text())
    assert r["task"] == "stsb" and r["metric"] == "spearman" and isinstance(r["value"], float)
    png = tmp_path / "m.png"
    assert run("info", pruned, "--png", png) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_dense_minilm_stsb_at_least_85(glue_dir, tmp_path):
    j = tmp_path / "d.json"
    assert run("eval", "--task", "stsb", "--json", j, "--glue-dir", glue_dir) == 0
    r = json.loads(j.read_text())
    assert r["n"] == 1500 and r["value"] >= 85.0


@pytest.mark.parametrize("argv,msg", [
    (["prune", "--task", "mnli9", "--pattern", "tile", "--sparsity", "0.5", "--out", "X"], "unknown task"),
    (["prune", "--task", "stsb", "--pattern", "blocky", "--sparsity", "0.5", "--out", "X"], "unknown pattern"),
    (["prune", "--task", "stsb", "--pattern", "tile", "--sparsity", "1.0", "--out", "X"], "sparsity must be in"),
    (["prune", "--task", "stsb", "--pattern", "tile", "--sparsity", "-0.2", "--out", "X"], "sparsity must be in"),
    (["prune", "--task", "stsb", "--pattern", "tile", "--tile", "24x24", "--sparsity", "0.5", "--out", "X"], "tensor-core"),
])
def test_bad_input_one_line(argv, msg, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and err.count("\n") == 0
    assert not os.path.exists(tmp_path / "X")


def test_refuses_to_overwrite(pruned, capsys):
    before = (pruned / "model.safetensors").stat().st_mtime_ns
    assert run("prune", "--task", "stsb", "--pattern", "tile", "--sparsity", 0.5, "--out", pruned) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (pruned / "model.safetensors").stat().st_mtime_ns == before


def test_not_bert_like_and_missing_and_corrupt(tmp_path, capsys):
    from transformers import GPT2Config, GPT2Model

    gpt = tmp_path / "gpt"
    GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(gpt)
    assert run("eval", gpt, "--task", "stsb") == 2
    assert "not BERT-like" in capsys.readouterr().err
    assert run("eval", tmp_path / "nope" / "model", "--task", "stsb") == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    assert run("eval", bad, "--task", "stsb") == 2
    assert "cannot load" in capsys.readouterr().err


def test_corrupt_weights_and_meta(pruned, tmp_path, capsys):
    import shutil

    c = tmp_path / "c"
    shutil.copytree(pruned, c)
    data = (c / "model.safetensors").read_bytes()
    (c / "model.safetensors").write_bytes(data[: len(data) // 3])
    assert run("eval", c, "--task", "stsb", "--limit", 10) == 2
    assert "etformer: error" in capsys.readouterr().err
    d = tmp_path / "d"
    shutil.copytree(pruned, d)
    (d / "etformer.json").write_text('{"plan": ')
    assert run("eval", d, "--task", "stsb", "--limit", 10) == 2
    assert "corrupt" in capsys.readouterr().err


def test_plan_mismatch_detected(pruned, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "m"
    shutil.copytree(pruned, d)
    sd = load_file(str(d / "model.safetensors"))
    k = next(k for k in sd if "layer.0.attention.self.query.weight" in k)
    sd[k] = torch.randn_like(sd[k])  # dense again: no longer matches the plan
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    assert run("eval", d, "--task", "stsb", "--limit", 10) == 2
    assert "does not match its plan" in capsys.readouterr().err


@pytest.mark.parametrize("method,pattern", [("oneshot", "tile_balanced"), ("gmp", "tile"), ("admm", "tile"),
                                            ("rgl", "attention_aware"), ("oneshot", "nm")])
def test_every_method_ends_on_the_exact_pattern(method, pattern, glue_dir, tmp_path):
    from transformers import AutoModel

    from etformer.models import encoder_linears
    from etformer.pruning import PruningPlan, make_plan
    from etformer.pruning.patterns import group_norms

    out = tmp_path / "ck"
    s = 0.5
    assert run("prune", "--task", "stsb", "--pattern", pattern, "--sparsity", s, "--out", out, "--max-steps", 2,
               "--batch-size", 8, "--max-len", 24, "--train-limit", 32, "--eval-limit", 40, "--method", method,
               "--tile", "64x64", "--glue-dir", glue_dir, "--device", "cpu") == 0
    plan = PruningPlan.from_json(json.loads((out / "etformer.json").read_text())["plan"])
    assert plan.to_json() == make_plan(pattern, s, (64, 64)).to_json()
    model = AutoModel.from_pretrained(out)
    for name, (kind, _, lin) in encoder_linears(model).items():
        w = lin.weight.detach()
        pat = plan.pattern(kind)
        zero_groups = (group_norms(w, pat) == 0).float().mean().item() if pat.name != "nm" else None
        if pat.name == "nm":
            assert torch.all((w.view(w.shape[0], -1, 4) != 0).sum(-1) <= 2), name
        else:
            assert zero_groups == pytest.approx(s, abs=1e-9), (name, zero_groups)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU message is for machines without a GPU")
def test_bench_without_gpu_says_so(capsys, tmp_path):
    assert run("bench", "--quick", "--out", tmp_path / "b") == 0
    out = capsys.readouterr().out
    assert "No CUDA GPU" in out and "nothing GPU-like was timed" in out
    assert "CPU, MiniLM-L6" in out and "µs" not in out
    assert not (tmp_path / "b").exists()  # no result files that could pass for GPU figures


def test_bench_merge_split_runs(tmp_path, capsys):
    """Split bench runs merge into one report; a file from another GPU or a non-bench file is refused."""
    import json

    env = {"gpu": "NVIDIA H200", "torch": "t", "triton": "tr", "transformers": "x", "cuda": "c", "python": "p",
           "date": "d"}
    peaks = {"matmul_tflops": 660.0, "copy_tbs": 4.2}

    def row(B, variant, us):
        return {"model": "bert-base", "batch": B, "seq": 128, "varlen": False, "variant": variant, "sparsity": 0.0,
                "median_us": us, "p10_us": us, "p90_us": us, "floor_us": 10.0, "speedup_vs_best_peer": 1.0,
                "ok": True, "error": None, "graph_replay_us": None}

    for i, B in enumerate((1, 8)):
        (tmp_path / f"p{i}.json").write_text(json.dumps({"env": env, "peaks": peaks, "tile": [128, 64], "command": f"c{i}",
                                                         "rows": [row(B, "cublas_sdpa_graph", 100.0 + B),
                                                                  row(B, "etformer_dense", 90.0 + B)]}))
    assert run("bench", "--merge", tmp_path / "p0.json", tmp_path / "p1.json", "--out", tmp_path / "m") == 0
    merged = json.loads((tmp_path / "m" / "bench.json").read_text())
    assert [(r["batch"], r["variant"]) for r in merged["rows"]] == [(1, "cublas_sdpa_graph"), (1, "etformer_dense"),
                                                                    (8, "cublas_sdpa_graph"), (8, "etformer_dense")]
    assert [p["command"] for p in merged["parts"]] == ["c0", "c1"]
    md = (tmp_path / "m" / "bench.md").read_text()
    assert "### bert-base, B=1, S=128" in md and "### bert-base, B=8, S=128" in md
    assert "| bert-base | 1 | 128 | no | cublas_sdpa_graph | 101 | 1.00× |" in md  # summary: best peer, dense ×
    other = dict(env, gpu="NVIDIA A100")
    (tmp_path / "p2.json").write_text(json.dumps({"env": other, "peaks": peaks, "tile": [128, 64], "rows": []}))
    assert run("bench", "--merge", tmp_path / "p0.json", tmp_path / "p2.json", "--out", tmp_path / "m2") == 2
    assert "different GPUs" in capsys.readouterr().err
    (tmp_path / "p3.json").write_text("{not json")
    assert run("bench", "--merge", tmp_path / "p3.json", "--out", tmp_path / "m3") == 2
    assert not (tmp_path / "m2").exists() and not (tmp_path / "m3").exists()


def test_prune_with_a_new_task_head(glue_dir, tmp_path, capsys):
    """--head fine-tunes a fresh classifier first (the dense score is taken after that), then prunes with logit and
    hidden-state distillation from it; the checkpoint carries the head and runs on the engine."""
    from transformers import AutoConfig

    out = tmp_path / "sst2"
    assert run("prune", "--task", "sst2", "--pattern", "tile", "--sparsity", 0.5, "--out", out, "--head",
               "--dense-epochs", 1, "--kd", 1, "--distill-hidden", "--max-steps", 3, "--batch-size", 8,
               "--max-len", 24, "--train-limit", 32, "--eval-limit", 64, "--glue-dir", glue_dir,
               "--device", "cpu", "--sparse-lr", 1e-4) == 0
    meta = json.loads((out / "etformer.json").read_text())
    assert meta["training"]["new_head"] is True and meta["training"]["kd"] == 1.0
    assert meta["training"]["lr"] == 3e-4 and meta["training"]["sparse_lr"] == 1e-4
    assert meta["metrics"]["dense"]["method"] == "task head" and meta["metrics"]["pruned"]["method"] == "task head"
    assert AutoConfig.from_pretrained(out).architectures == ["BertForSequenceClassification"]
    j = tmp_path / "r.json"
    assert run("eval", out, "--task", "sst2", "--engine", "et", "--limit", 64, "--json", j, "--glue-dir", glue_dir) == 0
    assert json.loads(j.read_text())["method"] == "task head"
    capsys.readouterr()
    assert run("prune", "--task", "sst2", "--pattern", "tile", "--sparsity", 0.5, "--out", tmp_path / "x", "--head",
               "--glue-dir", glue_dir, "--device", "cpu") == 2
    assert "--dense-epochs" in capsys.readouterr().err
    assert run("prune", "--task", "stsb", "--pattern", "tile", "--sparsity", 0.5, "--out", tmp_path / "y", "--kd", 1,
               "--glue-dir", glue_dir, "--device", "cpu") == 2
    assert "--kd" in capsys.readouterr().err


def test_regression_task_with_a_new_head(glue_dir, tmp_path, capsys):
    """STS-B with --head: a one-output regression head, MSE on the labels plus MSE distillation of its output."""
    from etformer.errors import EtformerError
    from etformer.models import load_model

    out = tmp_path / "stsb"
    assert run("prune", "--task", "stsb", "--pattern", "tile", "--sparsity", 0.5, "--out", out, "--head",
               "--dense-epochs", 1, "--kd", 0.5, "--method", "gmp", "--max-steps", 2, "--batch-size", 8,
               "--max-len", 24, "--train-limit", 24, "--eval-limit", 40, "--glue-dir", glue_dir,
               "--device", "cpu") == 0
    meta = json.loads((out / "etformer.json").read_text())
    assert meta["metrics"]["pruned"]["method"] == "task head" and meta["training"]["kd"] == 0.5
    model, _ = load_model(str(out))
    assert model.config.num_labels == 1
    with pytest.raises(EtformerError, match="1 outputs; the task needs 2"):
        load_model(str(out), with_head=True, num_labels=2)
