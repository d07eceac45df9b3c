"""On a GPU: the engine against Hugging Face on real GLUE dev data, dense and pruned MiniLM, fp16 and bf16.

Checks (the engine issue's GPU bars):
  * hidden states: rel. error of the engine (fp16/bf16) against HF fp32 <= 2x that of HF's own run at that precision;
  * predictions: SST-2 dev linear-probe predictions from engine features agree with HF fp32 on >= 99.5%;
  * STS-B dev Spearman through the engine.
Writes parity.json to the folder given.
"""
import json
import os
import sys
import time

import numpy as np
import torch

from etformer import optimize
from etformer.data import load_split
from etformer.evaluate import batches, evaluate, fit_probe, mean_pool
from etformer.models import load_model
from etformer.pruning import PruningPlan, apply_plan


@torch.no_grad()
def features(encode, tok, texts, bs=128):
    hs, embs = [], []
    for b in batches(tok, [(t,) for t in texts], bs, 128, "cuda"):
        h = encode(b).float()
        embs.append(mean_pool(h, b["attention_mask"]).cpu())
        hs.append(h[b["attention_mask"].bool()].cpu())
    return torch.cat(embs), torch.cat(hs)


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    glue = os.environ["GLUE_DIR"]
    model32, tok = load_model(None, device="cuda")
    train = load_split("sst2", "train", glue, limit=4000)
    dev = load_split("sst2", "dev", glue)
    results = {}
    plans = {"dense": None, "tile50": PruningPlan.uniform("tile", 0.5), "attention_aware50": PruningPlan.attention_aware(0.5)}
    for pname, plan in plans.items():
        import copy

        m32 = apply_plan(copy.deepcopy(model32), plan)
        hf32 = lambda b: m32(**b).last_hidden_state  # noqa: E731
        xt, _ = features(hf32, tok, [e.texts[0] for e in train])
        xd32, h32 = features(hf32, tok, [e.texts[0] for e in dev])
        mu, sd = xt.mean(0), xt.std(0).clamp_min(1e-6)
        probe = fit_probe((xt - mu) / sd, torch.tensor([e.label for e in train]), 2)
        pred = lambda x: probe(((x - mu) / sd).double()).argmax(-1).numpy()  # noqa: E731
        p32 = pred(xd32)
        for dt in (torch.float16, torch.bfloat16):
            mh = copy.deepcopy(m32).to(dt)
            hfl = lambda b: mh(**b).last_hidden_state  # noqa: E731
            xh, hh = features(hfl, tok, [e.texts[0] for e in dev])
            # pruned plans run every sparse matrix on the tile kernel (kernel="tile"), at any batch size, so that
            # the kernels themselves are what this checks; the dense plan runs on cuBLAS
            enc = optimize(m32, plan, dtype=dt, device="cuda", kernel="tile" if plan is not None else None)
            t0 = time.time()
            xe, he = features(enc.encode_fn(), tok, [e.texts[0] for e in dev])
            el = time.time() - t0
            e_hf = float((hh - h32).norm() / h32.norm())
            e_et = float((he - h32).norm() / h32.norm())
            agree = float(np.mean(pred(xe) == p32))
            sts = evaluate(m32, tok, "stsb", encode=enc.encode_fn(), glue_dir=glue, device="cuda")
            sts_hf = evaluate(m32, tok, "stsb", glue_dir=glue, device="cuda")
            key = f"{pname}/{str(dt).replace('torch.', '')}"
            results[key] = {"hf_rel_err": e_hf, "et_rel_err": e_et, "err_ratio": e_et / e_hf,
                            "sst2_pred_agreement": agree, "hf_same_dtype_agreement": float(np.mean(pred(xh) == p32)), "sst2_acc_hf32": float(np.mean(p32 == np.array([e.label for e in dev]))),
                            "stsb_spearman_et": sts["value"], "stsb_spearman_hf32": sts_hf["value"],
                            "ok": bool(e_et <= 2 * e_hf and agree >= 0.995), "engine": enc.summary()["layer0.qkv"],
                            "seconds_dev_features": el}
            print(key, json.dumps(results[key]), flush=True)
    with open(os.path.join(out_dir, "parity.json"), "w") as f:
        json.dump(results, f, indent=1)
    bad = [k for k, v in results.items() if not v["ok"]]
    print("PARITY", "FAILED: " + ", ".join(bad) if bad else "OK")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
