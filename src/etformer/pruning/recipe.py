"""The pruning recipe: dense fine-tune -> regularize (or prune gradually) -> hard prune -> retrain with masks fixed.

Methods:
    rgl      reweighted group lasso over each matrix's pattern groups, then hard prune (E.T.'s method)
    oneshot  one-shot magnitude prune by the pattern, then masked retrain (baseline)
    gmp      gradual magnitude pruning on the cubic schedule s_t = s_f (1 - (1 - t/T)^3), then retrain (baseline)
    admm     ADMM: rho/2 ||W - Z + U||^2 towards the projection Z of W + U on the pattern, then hard prune

Training signal: a model with a task head trains on the task's labels; a bare encoder (an embedding model such as
all-MiniLM-L6-v2) distils itself — the dense model's token states and mean-pooled embeddings are the targets.
"""
from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..data import load_inputs, load_split, parse_source, task_spec
from ..errors import EtformerError
from ..evaluate import batches, mean_pool
from ..models import Matrix, base_model, has_task_head, matrices
from .patterns import make_mask, mask_sparsity
from .plan import PruningPlan
from .regularizers import ADMM, ReweightedGroupLasso

METHODS = ("rgl", "oneshot", "gmp", "admm")
KD_TEMPERATURE = 2.0  # logit distillation (models with a task head, RecipeConfig.kd)


@dataclass
class RecipeConfig:
    plan: PruningPlan
    task: str
    method: str = "rgl"
    dense_epochs: float = 0.0
    epochs: float = 1.0  # length of each sparse stage (regularize or gradual prune; retrain), in passes over the data
    lr: float = 3e-4  # best of 1e-4 / 3e-4 on MiniLM STS-B (benchmarks/results/cpu/methods.md)
    # Peak learning rate of the sparse stages (regularize or gradual prune, then retrain); None: lr. A model with a
    # task head can fine-tune densely at one rate and prune at another: on MRPC the dense fine-tune did best at 1e-4
    # and the sparse stages at 2e-4 (benchmarks/results/h200/accuracy/accuracy.md).
    sparse_lr: float | None = None
    lam: float = 2e-4
    eps: float = 1e-3
    rho: float = 1e-2  # ADMM penalty
    admm_every: int = 25  # ADMM: steps between projection + dual updates
    refresh_every: int = 25
    batch_size: int = 32
    max_len: int = 128
    max_steps: int | None = None  # caps every stage (smoke runs, CPU demo)
    train_limit: int | None = None
    # Bare encoders (no task head) learn from their dense self by distillation, which needs sentences but no labels:
    # the sentences of these GLUE sources join the task's own (each sampled down to distill_limit if set). A source is
    # "task" (its train split) or "task:split" (train, dev or test; test splits have no labels and need none here).
    # With a task head (and kd or distill_hidden), the sources' inputs, of the task's own form (sentence pairs for a
    # pair task), join the sparse stages unlabelled: they learn from the dense fine-tuned model alone (data
    # augmentation for distillation, for small tasks such as MRPC). The dense fine-tune sees the labelled data only.
    distill_tasks: tuple[str, ...] = ()
    distill_limit: int | None = None
    # Distillation matches every layer's hidden states, not only the last (the student has the teacher's shape).
    # With a task head it adds that term to the label loss, the teacher being the model after its dense fine-tune.
    distill_hidden: bool = False
    # A model with a task head: weight of the logit distillation term from the dense fine-tuned model (KL at
    # temperature KD_TEMPERATURE for classification, MSE for regression); 0 trains on the labels alone.
    kd: float = 0.0
    seed: int = 0
    device: str = "cpu"
    glue_dir: str | None = None
    history: list = field(default_factory=list)

    def __post_init__(self):
        if self.method not in METHODS:
            raise EtformerError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        task_spec(self.task)
        self.distill_tasks = tuple(dict.fromkeys(t for t in self.distill_tasks if t != self.task))
        for t in self.distill_tasks:
            spec, split = parse_source(t)
            if spec.name == task_spec(self.task).name and split in ("train", "dev"):
                raise EtformerError(f"distill task {t!r}: the task's own train split is already in, and its dev "
                                    f"split is what it is scored on")
        if self.distill_limit is not None and self.distill_limit < 1:
            raise EtformerError("distill_limit must be at least 1")
        if self.sparse_lr is not None and self.sparse_lr <= 0:
            raise EtformerError(f"sparse_lr must be positive, not {self.sparse_lr}")
        if self.lr <= 0 or self.batch_size < 1 or self.epochs < 0 or self.dense_epochs < 0 or self.lam < 0 or self.kd < 0:
            raise EtformerError("lr and batch size must be positive; epochs, lambda and kd must not be negative")


class MaskKeeper:
    """Holds the masks of the pruned matrices and keeps their zeros at zero through any optimizer.

    Gradients of pruned weights are zeroed by a hook, and after every optimizer step the weights are multiplied by
    their mask again, so neither momentum nor weight decay can revive a pruned weight.
    """

    def __init__(self, masks: dict[str, tuple[torch.nn.Parameter, torch.Tensor]]):
        self.masks = masks
        self.hooks = [p.register_hook(lambda g, m=m: g * m.to(g.dtype)) for p, m in masks.values()]
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        for p, m in self.masks.values():
            p.mul_(m.to(p.dtype))

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


def prunable(model, plan: PruningPlan) -> dict[str, Matrix]:
    """name -> Matrix for the matrices the plan prunes (sparsity > 0)."""
    return {n: m for n, m in matrices(model).items() if plan.sparsity(m.kind) > 0}


def hard_masks(model, plan: PruningPlan, scale: float = 1.0) -> dict[str, tuple[torch.nn.Parameter, torch.Tensor]]:
    """name -> (parameter, keep-mask shaped like the parameter). A matrix that is a row slice of a packed
    parameter gets ones outside its rows, so the masks of Q, K and V compose on in_proj_weight."""
    out = {}
    for name, m in prunable(model, plan).items():
        mask = make_mask(m.weight(), plan.pattern(m.kind), plan.sparsity(m.kind) * scale)
        if m.rows is not None:
            full = torch.ones_like(m.param, dtype=torch.bool)
            full[m.rows] = mask
            mask = full
        out[name] = (m.param, mask)
    return out


@torch.no_grad()
def apply_plan(model, plan: PruningPlan | None):
    """Zero, in place, every weight the plan's hard masks drop (magnitude, one shot); returns the model. None: as is."""
    if plan is not None:
        for p, mask in hard_masks(model, plan).values():
            p.mul_(mask)
    return model


def final_masks(masks: dict) -> dict[str, torch.Tensor]:
    return {name: m for name, (_, m) in masks.items()}


def _training_items(cfg: RecipeConfig, distill: bool) -> list[tuple]:
    spec = task_spec(cfg.task)
    ex = load_split(spec.name, "train", cfg.glue_dir)
    rng = random.Random(cfg.seed)
    if cfg.train_limit:
        ex = rng.sample(ex, min(cfg.train_limit, len(ex)))

    def capped(extra: list) -> list:  # one distillation source, sampled down to distill_limit if set
        return rng.sample(extra, cfg.distill_limit) if cfg.distill_limit and len(extra) > cfg.distill_limit else extra

    if distill:  # sentences one by one, as an embedding model sees them
        sentences = {t for e in ex for t in e.texts}
        for source in cfg.distill_tasks:
            sentences.update(capped(sorted({t for texts in load_inputs(source, cfg.glue_dir)[1] for t in texts})))
        return [((t,), None) for t in sorted(sentences)]
    items = [(e.texts, e.label) for e in ex]
    if cfg.distill_tasks and not (cfg.kd > 0 or cfg.distill_hidden):
        raise EtformerError("with a task head, distill_tasks adds unlabelled examples that learn from the dense model "
                            "only: set kd and/or distill_hidden")
    for source in cfg.distill_tasks:
        other = parse_source(source)[0]
        if other.is_pair != spec.is_pair:
            form = {True: "sentence pairs", False: "single sentences"}
            raise EtformerError(f"{source} gives {form[other.is_pair]} but {spec.name} takes {form[spec.is_pair]}; a "
                                f"task head's distillation data must have its task's form")
        items.extend((t, None) for t in capped(sorted(set(load_inputs(source, cfg.glue_dir)[1]))))
    return items


class _Trainer:
    def __init__(self, model, tok, cfg: RecipeConfig, on_step: Callable | None):
        self.model, self.tok, self.cfg, self.on_step = model, tok, cfg, on_step
        self.distill = not has_task_head(model)
        self.teacher = None
        if self.distill:
            self.teacher = copy.deepcopy(base_model(model)).eval().requires_grad_(False)
        elif (cfg.kd > 0 or cfg.distill_hidden) and cfg.dense_epochs == 0:
            self.snapshot_teacher()  # already fine-tuned; otherwise the dense stage trains on labels, then snapshots
        self.items = _training_items(cfg, self.distill)
        # the dense fine-tune (before there is a teacher) sees labelled items only
        self.labelled = self.items if self.distill else [i for i in self.items if i[1] is not None]
        self.rng = random.Random(cfg.seed)
        self.spec = task_spec(cfg.task)
        self.use_amp = torch.device(cfg.device).type == "cuda"

    def snapshot_teacher(self) -> None:
        """The model as it is now (after the dense fine-tune) becomes the frozen teacher of the sparse stages."""
        if self.distill:
            self.teacher.load_state_dict(base_model(self.model).state_dict())
        elif self.cfg.kd > 0 or self.cfg.distill_hidden:
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)

    def steps_for(self, epochs: float, labelled_only: bool = False) -> int:
        n = math.ceil(epochs * len(self.labelled if labelled_only else self.items) / self.cfg.batch_size)
        return min(n, self.cfg.max_steps) if self.cfg.max_steps is not None else n

    def _batches(self, labelled_only: bool = False):
        pool = self.labelled if labelled_only else self.items
        while True:
            order = list(range(len(pool)))
            self.rng.shuffle(order)
            bs = min(self.cfg.batch_size, len(order))
            for i in range(0, len(order) - bs + 1, bs):  # full batches only
                chunk = [pool[j] for j in order[i: i + bs]]
                batch = next(batches(self.tok, [c[0] for c in chunk], len(chunk), self.cfg.max_len, self.cfg.device))
                yield batch, [c[1] for c in chunk]

    def loss(self, batch, labels) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.use_amp):
            if self.distill:
                deep = self.cfg.distill_hidden
                so = base_model(self.model)(**batch, output_hidden_states=deep)
                with torch.no_grad():
                    to = self.teacher(**batch, output_hidden_states=deep)
                s, t = so.last_hidden_state.float(), to.last_hidden_state.float()
                m = batch["attention_mask"].unsqueeze(-1).float()
                pairs = list(zip(so.hidden_states[1:], to.hidden_states[1:])) if deep else [(s, t)]
                token = sum(((a.float() - b.float()) ** 2 * m).sum() for a, b in pairs) / (
                    len(pairs) * m.sum() * s.shape[-1])
                emb = 1 - F.cosine_similarity(mean_pool(s, batch["attention_mask"]), mean_pool(t, batch["attention_mask"])).mean()
                return token + emb
            deep = self.cfg.distill_hidden and self.teacher is not None
            so = self.model(**batch, output_hidden_states=deep)
            logits = so.logits.float()
            lab = [i for i, y in enumerate(labels) if y is not None]  # unlabelled items: distillation terms only
            ly = logits if len(lab) == len(labels) else logits[lab]
            ys = [labels[i] for i in lab]
            if not lab:
                loss = logits.sum() * 0.0
            elif self.spec.is_regression:
                loss = F.mse_loss(ly.squeeze(-1), torch.tensor(ys, dtype=torch.float32, device=logits.device))
            else:
                loss = F.cross_entropy(ly, torch.tensor(ys, device=logits.device))
            if self.teacher is None:
                return loss
            with torch.no_grad():
                to = self.teacher(**batch, output_hidden_states=deep)
            t = to.logits.float()
            if self.cfg.kd > 0:
                if self.spec.is_regression:
                    loss = loss + self.cfg.kd * F.mse_loss(logits, t)
                else:
                    T = KD_TEMPERATURE
                    loss = loss + self.cfg.kd * T * T * F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(t / T, -1),
                                                                 log_target=True, reduction="batchmean")
            if deep:
                m = batch["attention_mask"].unsqueeze(-1).float()
                pairs = list(zip(so.hidden_states[1:], to.hidden_states[1:]))
                loss = loss + sum(((a.float() - b.float()) ** 2 * m).sum() for a, b in pairs) / (
                    len(pairs) * m.sum() * so.hidden_states[-1].shape[-1])
            return loss

    def run(self, stage: str, steps: int, *, reg=None, keeper: MaskKeeper | None = None,
            on_tick: Callable[[int], None] | None = None) -> None:
        it = self._batches(labelled_only=stage == "dense")
        params = [p for p in self.model.parameters() if p.requires_grad]
        lr = self.cfg.lr if stage == "dense" or self.cfg.sparse_lr is None else self.cfg.sparse_lr
        _train_steps(self.model, params, stage, steps, lambda: self.loss(*next(it)), lr, 0.01, reg, keeper,
                     on_tick, self.on_step, self.cfg.history)


def _train_steps(model, params, stage, steps, next_loss, lr, weight_decay, reg, keeper, on_tick, on_step, history):
    """AdamW with linear warm-up and decay; optional regularizer penalty and mask keeper."""
    if steps <= 0:
        return
    model.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then linear decay to zero
        opt, lambda i: (i + 1) / warm if i < warm else max(0.0, (steps - i) / max(1, steps - warm)))
    for step in range(steps):
        if on_tick:
            on_tick(step)
        loss = next_loss()
        task_loss = float(loss.detach())
        if reg is not None:
            reg.step(step)
            loss = loss + reg.penalty()
        if not math.isfinite(float(loss.detach())):
            raise EtformerError(f"{stage}: the loss became {float(loss.detach())} at step {step}; lower the lr or lambda")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if keeper is not None:
            keeper.apply()
        if history is not None:
            history.append({"stage": stage, "step": step, "loss": task_loss, "total": float(loss.detach())})
        if on_step:
            on_step(stage, step + 1, steps, task_loss)
    model.eval()


def run_recipe(model, tok, cfg: RecipeConfig, on_step: Callable | None = None, on_stage: Callable | None = None,
               on_dense: Callable | None = None) -> dict:
    """Prune `model` in place by cfg.plan with cfg.method. Returns the final masks: name -> bool tensor.

    on_dense(model) runs after the dense fine-tune (when there is one), before anything is pruned."""
    torch.manual_seed(cfg.seed)
    model.to(cfg.device)
    tr = _Trainer(model, tok, cfg, on_step)
    plan = cfg.plan
    say = on_stage or (lambda *_: None)

    if cfg.dense_epochs > 0:
        if tr.distill:
            say("dense fine-tune skipped: a bare encoder has no labels to fine-tune on (it is its own teacher)")
        else:
            tr.run("dense", tr.steps_for(cfg.dense_epochs, labelled_only=True))
            tr.snapshot_teacher()
            if on_dense is not None:
                on_dense(model)

    return prune_stages(model, plan, cfg.method, tr.run, tr.steps_for(cfg.epochs), lam=cfg.lam, eps=cfg.eps,
                        refresh_every=cfg.refresh_every, rho=cfg.rho, admm_every=cfg.admm_every)


def prune_stages(model, plan: PruningPlan, method: str, run_stage: Callable, n: int, *, lam=2e-4, eps=1e-3,
                 refresh_every=25, rho=1e-2, admm_every=25) -> dict:
    """The sparse half of the recipe, whatever the data: regularize or prune gradually for n steps, hard prune,
    retrain n steps with the masks fixed. run_stage(name, steps, reg=..., keeper=..., on_tick=...) trains."""
    if method not in METHODS:
        raise EtformerError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if method == "rgl":
        params = {name: (m, plan.pattern(m.kind)) for name, m in prunable(model, plan).items()}
        run_stage("regularize", n, reg=ReweightedGroupLasso(params, lam, eps, refresh_every))
    elif method == "admm":
        params = {name: (m, plan.pattern(m.kind), plan.sparsity(m.kind)) for name, m in prunable(model, plan).items()}
        run_stage("admm", n, reg=ADMM(params, rho, admm_every))
    elif method == "gmp":  # cubic schedule from 0 to the target, masks re-chosen every `interval` steps
        interval = max(1, n // 10)
        state = {"keeper": None}

        def tick(step):
            if step % interval == 0:
                frac = 1 - (1 - min(1.0, step / max(1, n - interval))) ** 3
                if state["keeper"]:
                    state["keeper"].remove()
                state["keeper"] = MaskKeeper(hard_masks(model, plan, scale=frac))

        run_stage("gradual", n, on_tick=tick)
        if state["keeper"]:
            state["keeper"].remove()
    masks = hard_masks(model, plan)
    keeper = MaskKeeper(masks)  # zeros the pruned weights now
    run_stage("retrain", n, keeper=keeper)
    keeper.apply()
    keeper.remove()
    return final_masks(masks)


def prune_module(model: torch.nn.Module, plan: PruningPlan, loss_fn: Callable[[torch.nn.Module], torch.Tensor],
                 steps: int, *, method: str = "rgl", lr: float = 3e-4, weight_decay: float = 0.01, lam: float = 2e-4,
                 rho: float = 1e-2, on_step: Callable | None = None) -> dict:
    """The recipe for any supported module (an HF encoder or torch.nn.TransformerEncoder) and any objective:
    loss_fn(model) draws its own batch and returns a scalar loss. Returns the final masks."""
    trainable = [p for p in model.parameters() if p.requires_grad]

    def run_stage(stage, n, reg=None, keeper=None, on_tick=None):
        _train_steps(model, trainable, stage, n, lambda: loss_fn(model), lr, weight_decay, reg, keeper, on_tick,
                     on_step, history=None)

    return prune_stages(model, plan, method, run_stage, steps, lam=lam, rho=rho)


def sparsity_report(model, plan: PruningPlan) -> dict[str, dict]:
    """Per matrix: kind, pattern, element sparsity, and the fraction of whole (plan.tile) tiles that are zero."""
    from .patterns import Pattern, group_norms

    tile_pat = Pattern("tile", tile=plan.tile)
    out = {}
    for name, m in matrices(model).items():
        w = m.weight().detach()
        tiles_zero = float((group_norms(w.float(), tile_pat) == 0).float().mean())
        out[name] = {"kind": m.kind, "layer": m.layer, "pattern": plan.matrices[m.kind].pattern,
                     "target": plan.sparsity(m.kind), "sparsity": mask_sparsity(w != 0), "tile_sparsity": tiles_zero,
                     "shape": list(w.shape)}
    return out
