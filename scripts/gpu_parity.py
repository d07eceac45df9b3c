"""On a GPU: the engine against Hugging Face on real GLUE dev data, dense and pruned MiniLM, fp16 and bf16.

    python3 scripts/gpu_parity.py OUTDIR [NAME=CHECKPOINT ...]

Checks (the engine issue's GPU bars):
  * hidden states: rel. error of the engine (fp16/bf16) against HF fp32 <= 2x that of HF's own run at that precision;
  * predictions agree with HF fp32 on >= 99.5% of a GLUE dev set;
  * STS-B dev Spearman through the engine.
Built in: the embedded MiniLM dense and magnitude-pruned without retraining (tile 50%, attention-aware 50%), scored on
SST-2 dev through a linear probe fitted on HF-fp32 features. Each NAME=CHECKPOINT adds a model pruned and retrained by
`etformer prune`: one with a task head is scored by its own head on its task's dev set, a bare encoder by the probe.
PARITY_BUILTIN=0 leaves the built-in models out. Writes parity.json to OUTDIR after every model (a cut-short run
keeps what it finished).
"""
import copy
import json
import os
import sys
import time

import numpy as np
import torch

from etformer import optimize
from etformer.checkpoint import read_meta, verify_plan
from etformer.data import load_split
from etformer.evaluate import batches, evaluate, fit_probe, mean_pool, predict_with_head
from etformer.models import base_model, has_task_head, load_model
from etformer.pruning import PruningPlan, apply_plan
from etformer.sparse.tiles import atomic_write_json

DEVICE = os.environ.get("PARITY_DEVICE", "cuda")
DTYPES = [getattr(torch, d) for d in os.environ.get("PARITY_DTYPES", "float16,bfloat16").split(",")]
LIMIT = int(os.environ["PARITY_LIMIT"]) if os.environ.get("PARITY_LIMIT") else None  # smoke runs only


@torch.no_grad()
def features(encode, tok, texts, bs=128):
    hs, embs = [], []
    for b in batches(tok, texts, bs, 128, DEVICE):
        h = encode(b).float()
        embs.append(mean_pool(h, b["attention_mask"]).cpu())
        hs.append(h[b["attention_mask"].bool()].cpu())
    return torch.cat(embs), torch.cat(hs)


def probe_predictor(encode32, tok, train):
    """SST-2 linear probe on mean-pooled HF-fp32 features: (texts, encode) -> predictions."""
    xt, _ = features(encode32, tok, [e.texts for e in train])
    mu, sd = xt.mean(0), xt.std(0).clamp_min(1e-6)
    probe = fit_probe((xt - mu) / sd, torch.tensor([e.label for e in train]), 2)

    def predict(feats):
        return probe(((feats - mu) / sd).double()).argmax(-1).numpy()

    return predict



def check(name, m32, tok, plan, dev, task, glue, predict_probe, results, out_dir):
    head = has_task_head(m32)
    texts = [e.texts for e in dev]
    body32 = base_model(m32)

    def enc32(b):
        return body32(**b).last_hidden_state

    def predictions(encode, feats):
        if head:  # the fp32 head on each run's hidden states: the encoders are what differ
            return predict_with_head(m32, lambda b: encode(b).float(), tok, dev, batch_size=128, device=DEVICE)
        return predict_probe(feats)

    x32, h32 = features(enc32, tok, texts)
    p32 = predictions(enc32, x32)
    labels = np.array([e.label for e in dev])
    # a bare encoder is also scored on STS-B through cosine similarity
    sts_hf = None if head else evaluate(m32, tok, "stsb", encode=enc32, glue_dir=glue, device=DEVICE)["value"]
    for dt in DTYPES:
        body = copy.deepcopy(body32).to(dt)

        def enc_hf(b, body=body):
            return body(**b).last_hidden_state

        xh, hh = features(enc_hf, tok, texts)
        # pruned plans run every sparse matrix on the tile kernel (kernel="tile"), at any batch size, so that the
        # kernels themselves are what this checks; the dense plan runs on cuBLAS
        enc = optimize(m32, plan, dtype=dt, device=DEVICE, kernel="tile" if plan is not None else None)
        t0 = time.time()
        xe, he = features(enc.encode_fn(), tok, texts)
        el = time.time() - t0
        e_hf = float((hh - h32).norm() / h32.norm())
        e_et = float((he - h32).norm() / h32.norm())
        pe = predictions(enc.encode_fn(), xe)
        agree = float(np.mean(pe == p32))
        sts = None if head else evaluate(m32, tok, "stsb", encode=enc.encode_fn(), glue_dir=glue, device=DEVICE)["value"]
        key = f"{name}/{str(dt).replace('torch.', '')}"
        results[key] = {"hf_rel_err": e_hf, "et_rel_err": e_et, "err_ratio": e_et / e_hf if e_hf > 0 else None,
                        "predictions": "task head" if head else "sst2 linear probe", "dev_set": task,
                        "pred_agreement": agree, "hf_same_dtype_agreement": float(np.mean(predictions(enc_hf, xh) == p32)),
                        "task_acc_hf32": float(np.mean(p32 == labels)),
                        "task_acc_et": float(np.mean(pe == labels)),
                        "stsb_spearman_et": sts, "stsb_spearman_hf32": sts_hf,
                        "ok": bool(e_et <= 2 * e_hf and agree >= 0.995), "engine": enc.summary()["layer0.qkv"],
                        "seconds_dev_features": el}
        print(key, json.dumps(results[key]), flush=True)
        atomic_write_json(os.path.join(out_dir, "parity.json"), results)


def main(out_dir, extra):
    os.makedirs(out_dir, exist_ok=True)
    glue = os.environ["GLUE_DIR"]
    model32, tok = load_model(None, device=DEVICE)
    train = load_split("sst2", "train", glue, limit=LIMIT or 4000)
    sst2 = load_split("sst2", "dev", glue, limit=LIMIT)
    results = {}
    builtin = (("dense", None), ("tile50", PruningPlan.uniform("tile", 0.5)),
               ("attention_aware50", PruningPlan.attention_aware(0.5)))
    models = [(n, lambda p=p: (apply_plan(copy.deepcopy(model32), p), tok, p), "sst2") for n, p in
              (builtin if os.environ.get("PARITY_BUILTIN", "1") != "0" else ())]
    for item in extra:
        name, path = item.split("=", 1)
        meta = read_meta(path)

        def load(path=path, meta=meta):
            m, t = load_model(path, device=DEVICE)
            return m, t, verify_plan(m, meta)

        models.append((name, load, meta["task"]))
    for name, load, task in models:
        m32, tk, plan = load()
        dev = sst2 if not has_task_head(m32) else load_split(task, "dev", glue, limit=LIMIT)
        predict_probe = None if has_task_head(m32) else probe_predictor(lambda b, m=m32: base_model(m)(**b).last_hidden_state, tk, train)
        check(name, m32, tk, plan, dev, task if has_task_head(m32) else "sst2", glue, predict_probe, results, out_dir)
        del m32
        torch.cuda.empty_cache()
    bad = [k for k, v in results.items() if not v["ok"]]
    print("PARITY", "FAILED: " + ", ".join(bad) if bad else "OK")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
