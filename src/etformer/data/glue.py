"""Readers for the GLUE tasks etformer evaluates on, from the standard directory layout."""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass

from ..errors import EtformerError


@dataclass(frozen=True)
class TaskSpec:
    name: str  # lowercase id, e.g. "stsb"
    folder: str  # folder under GLUE_DIR
    text_cols: tuple[str, ...]  # one or two column names (headered files) or indices (CoLA)
    label_col: str | int
    labels: tuple[str, ...] | None  # None: regression
    metric: str  # primary metric name
    header: bool = True
    hub_config: str | None = None

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def is_pair(self) -> bool:
        return len(self.text_cols) == 2


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec("sst2", "SST-2", ("sentence",), "label", ("0", "1"), "accuracy", hub_config="sst2"),
    "mrpc": TaskSpec("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), "f1", hub_config="mrpc"),
    "stsb": TaskSpec("stsb", "STS-B", ("sentence1", "sentence2"), "score", None, "spearman", hub_config="stsb"),
    "rte": TaskSpec("rte", "RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"), "accuracy",
                    hub_config="rte"),
    "cola": TaskSpec("cola", "CoLA", (3,), 1, ("0", "1"), "matthews", header=False, hub_config="cola"),
    "qnli": TaskSpec("qnli", "QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment"), "accuracy",
                     hub_config="qnli"),
}


@dataclass(frozen=True)
class GlueExample:
    texts: tuple[str, ...]
    label: float | int | None


def task_spec(task: str) -> TaskSpec:
    t = (task or "").lower().replace("-", "")
    if t not in TASKS:
        raise EtformerError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[t]


def find_glue_dir(glue_dir: str | None = None) -> str | None:
    d = glue_dir or os.environ.get("GLUE_DIR")
    return d if d and os.path.isdir(d) else None


def _layout_message(spec: TaskSpec, split: str, glue_dir: str | None) -> str:
    where = glue_dir or os.environ.get("GLUE_DIR") or "<unset>"
    return (f"no GLUE data for {spec.name} ({split}): expected $GLUE_DIR/{spec.folder}/{split}.tsv with GLUE_DIR={where}. "
            f"Set GLUE_DIR (or --glue-dir) to a folder in the standard GLUE layout "
            f"(<GLUE_DIR>/{{SST-2,MRPC,STS-B,RTE,CoLA,QNLI}}/{{train,dev}}.tsv), or install `datasets` and go online")


def load_split(task: str, split: str = "dev", glue_dir: str | None = None, limit: int | None = None) -> list[GlueExample]:
    """Examples of one split. Reads the local GLUE layout first; falls back to the hub through `datasets`."""
    spec = task_spec(task)
    if split not in ("train", "dev"):
        raise EtformerError(f"split must be 'train' or 'dev', not {split!r} (GLUE test splits carry no labels)")
    root = find_glue_dir(glue_dir)
    path = os.path.join(root, spec.folder, f"{split}.tsv") if root else None
    if path and os.path.isfile(path):
        rows = _read_tsv(path, spec)
    else:
        rows = _from_hub(spec, split)
        if rows is None:
            raise EtformerError(_layout_message(spec, split, glue_dir))
    if not rows:
        raise EtformerError(f"{path or spec.name}: no examples read")
    return rows[:limit] if limit else rows


def parse_source(source: str) -> tuple[TaskSpec, str]:
    """A data source, "task" (its train split) or "task:split" with split train, dev or test: (task spec, split)."""
    task, _, split = source.partition(":")
    spec, split = task_spec(task), split or "train"
    if split not in ("train", "dev", "test"):
        raise EtformerError(f"{source!r}: the split after ':' must be train, dev or test")
    return spec, split


def load_inputs(source: str, glue_dir: str | None = None) -> tuple[TaskSpec, list[tuple[str, ...]]]:
    """Unlabelled inputs of one split, for distillation: source as parse_source takes it (GLUE test splits carry no
    labels, and only their texts are read here)."""
    spec, split = parse_source(source)
    if split in ("train", "dev"):
        return spec, [e.texts for e in load_split(spec.name, split, glue_dir)]
    root = find_glue_dir(glue_dir)
    path = os.path.join(root, spec.folder, "test.tsv") if root else None
    if not (path and os.path.isfile(path)):
        raise EtformerError(_layout_message(spec, split, glue_dir).replace("{train,dev}", "{train,dev,test}"))
    names = spec.text_cols if spec.header else ("sentence",)  # CoLA's test file has a header, its others none
    out = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None) or []
        try:
            cols = [header.index(c) for c in names]
        except ValueError as e:
            raise EtformerError(f"{path}: header {header[:10]} lacks a column the {spec.name} task needs ({e})") from e
        out = [tuple(row[c] for c in cols) for row in reader if len(row) > max(cols)]
    if not out:
        raise EtformerError(f"{path}: no examples read")
    return spec, out


def _read_tsv(path: str, spec: TaskSpec) -> list[GlueExample]:
    out = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if spec.header:
            header = next(reader, None)
            if header is None:
                return []
            try:
                cols = [header.index(c) for c in spec.text_cols]
                lab = header.index(spec.label_col)
            except ValueError as e:
                raise EtformerError(f"{path}: header {header[:10]} lacks a column the {spec.name} task needs ({e})") from e
        else:
            cols, lab = list(spec.text_cols), spec.label_col
        for lineno, row in enumerate(reader, start=2 if spec.header else 1):
            if len(row) <= max(cols + [lab]):
                continue  # GLUE files hold a few malformed lines (e.g. quotes in MRPC); skip them as run_glue does
            texts = tuple(row[c] for c in cols)
            raw = row[lab].strip()
            if spec.is_regression:
                try:
                    label = float(raw)
                except ValueError:
                    raise EtformerError(f"{path}:{lineno}: label {raw!r} is not a number") from None
            else:
                if raw not in spec.labels:
                    raise EtformerError(f"{path}:{lineno}: label {raw!r} not in {spec.labels}")
                label = spec.labels.index(raw)
            out.append(GlueExample(texts, label))
    return out


def _from_hub(spec: TaskSpec, split: str) -> list[GlueExample] | None:
    try:
        import datasets  # optional
    except ImportError:
        return None
    try:
        ds = datasets.load_dataset("nyu-mll/glue", spec.hub_config, split="validation" if split == "dev" else "train")
    except Exception:
        return None
    keys = {"sst2": ("sentence",), "mrpc": ("sentence1", "sentence2"), "stsb": ("sentence1", "sentence2"),
            "rte": ("sentence1", "sentence2"), "cola": ("sentence",), "qnli": ("question", "sentence")}[spec.name]
    return [GlueExample(tuple(r[k] for k in keys), r["label"]) for r in ds]
