"""Pruned checkpoints: a folder Hugging Face loads as it is (config, model.safetensors, tokenizer) plus etformer.json.

etformer.json holds the one copy of the pruning plan and tile shape, the sparsity achieved per matrix and the
metrics dense and pruned. Folders are written under a temporary name beside the target and renamed into place,
so an interrupted run never leaves a half-written checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from .errors import EtformerError
from .pruning.plan import PruningPlan

META_FILE = "etformer.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


def holds_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in (META_FILE, "config.json") + WEIGHT_FILES)


def check_out_dir(out: str, overwrite: bool) -> None:
    """Refuse, before any work is done, to write over a checkpoint without --overwrite."""
    if holds_checkpoint(out) and not overwrite:
        raise EtformerError(f"{out} already holds a checkpoint; pass --overwrite to replace it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise EtformerError(f"{out} exists and is not a folder")


def save_checkpoint(out: str, model, tok, meta: dict, overwrite: bool = False) -> None:
    check_out_dir(out, overwrite)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".etformer-tmp-", dir=parent)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        old = None
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=".etformer-old-", dir=parent)
            os.rmdir(old)
            os.rename(out, old)
        os.rename(tmp, out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_meta(path: str) -> dict | None:
    """etformer.json of a checkpoint folder, or None for a plain (dense) model. Corrupt files raise."""
    f = os.path.join(path, META_FILE)
    if not os.path.isfile(f):
        return None
    try:
        with open(f) as fh:
            meta = json.load(fh)
        PruningPlan.from_json(meta["plan"])
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise EtformerError(f"{f} is corrupt: {e}") from None
    return meta


def verify_plan(model, meta: dict, tol: float = 0.02) -> PruningPlan:
    """Check that the weights carry the sparsity the checkpoint's plan says; return the plan."""
    from .pruning.recipe import sparsity_report

    plan = PruningPlan.from_json(meta["plan"])
    for name, r in sparsity_report(model, plan).items():
        want = r["target"]
        got = r["tile_sparsity"] if r["pattern"].startswith("tile") else r["sparsity"]
        if got + tol < want:
            raise EtformerError(f"checkpoint does not match its plan: {name} is {got:.1%} sparse "
                                f"({r['pattern']}), the plan says {want:.1%}")
    return plan
