import torch

from conftest import tiny_bert
from etformer.models import encoder_linears
from etformer.pruning import MaskKeeper, PruningPlan
from etformer.pruning.recipe import hard_masks, prunable


def test_zeros_survive_adamw_momentum_and_decay():
    model = tiny_bert()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randint(0, 100, (4, 16))
    # build up momentum first, so that a naive mask would be revived by exp_avg
    for _ in range(3):
        opt.zero_grad()
        model(x).last_hidden_state.pow(2).mean().backward()
        opt.step()
    plan = PruningPlan.uniform("tile", 0.5, (16, 16))
    masks = hard_masks(model, plan)
    keeper = MaskKeeper(masks)
    for _ in range(5):
        opt.zero_grad()
        model(x).last_hidden_state.pow(2).mean().backward()
        for p, m in masks.values():
            assert torch.all(p.grad[~m] == 0)
        opt.step()
        keeper.apply()
    keeper.remove()
    for p, m in masks.values():
        assert torch.all(p[~m] == 0)
        assert torch.all(p[m] != 0)
        assert (~m).float().mean() == 0.5


def test_plan_covers_every_matrix_and_attention_aware():
    model = tiny_bert()
    names = encoder_linears(model)
    assert len(names) == 2 * 6
    plan = PruningPlan.attention_aware(0.5, (16, 16))
    masks = hard_masks(model, plan)
    for name, (p, m) in masks.items():
        kind = names[name][0]
        if kind == "v":
            assert torch.all(m.all(1) | (~m).all(1))  # whole rows of W_V
        else:
            assert (~m).float().mean() == 0.5
    assert set(prunable(model, PruningPlan.uniform("row", 0.0))) == set()


def test_plan_json_round_trip():
    plan = PruningPlan.attention_aware(0.6, (64, 64))
    back = PruningPlan.from_json(plan.to_json())
    assert back.to_json() == plan.to_json()
    assert back.pattern("v").name == "row" and back.pattern("q").tile == (64, 64)


def test_plan_sparsity_by_kind():
    """Per-kind overrides: groups expand to their kinds, the pattern stays, hard masks follow each kind's target,
    and bad entries are refused with the reason."""
    import pytest

    from etformer.errors import EtformerError

    plan = PruningPlan.uniform("tile", 0.5, (16, 16)).with_sparsities("attention=0.25, ffn=0.75,o=0")
    assert [plan.sparsity(k) for k in ("q", "k", "v", "o", "ffn_in", "ffn_out")] == [0.25, 0.25, 0.25, 0, 0.75, 0.75]
    assert plan.pattern("ffn_in").name == "tile" and plan.tile == (16, 16)
    model = tiny_bert()
    names = encoder_linears(model)
    for name, (p, m) in hard_masks(model, plan).items():
        assert float((~m).float().mean()) == plan.sparsity(names[name][0])
    for bad, why in (("qq=0.5", "KIND=VALUE"), ("ffn", "KIND=VALUE"), ("q=half", "value"), ("q=1.5", r"in \[0, 1\)")):
        with pytest.raises(EtformerError, match=why):
            PruningPlan.uniform("tile", 0.5).with_sparsities(bad)


def test_distillation_corpus_takes_other_tasks_sentences(glue_dir):
    import pytest

    from etformer.data import load_split
    from etformer.errors import EtformerError
    from etformer.pruning.recipe import RecipeConfig, _training_items

    plan = PruningPlan.uniform("tile", 0.5, (16, 16))
    base = _training_items(RecipeConfig(plan=plan, task="stsb", glue_dir=glue_dir), distill=True)
    cfg = RecipeConfig(plan=plan, task="stsb", glue_dir=glue_dir, distill_tasks=("rte", "stsb", "rte"),
                       distill_limit=500)
    assert cfg.distill_tasks == ("rte",)  # the task itself and repeats dropped
    more = _training_items(cfg, distill=True)
    rte = {t for e in load_split("rte", "train", glue_dir) for t in e.texts}
    added = {i[0][0] for i in more} - {i[0][0] for i in base}
    assert 0 < len(added) <= 500 and added <= rte
    assert {i[0][0] for i in base} <= {i[0][0] for i in more}
    assert all(label is None for _, label in more)
    with pytest.raises(EtformerError, match="unknown task|task"):
        RecipeConfig(plan=plan, task="stsb", distill_tasks=("nosuchtask",))
    with pytest.raises(EtformerError, match="kd"):  # a task head without a teacher cannot use unlabelled inputs
        _training_items(cfg, distill=False)


def test_task_head_distillation_corpus(glue_dir):
    """With a task head (and kd), other tasks' inputs of the task's form join the sparse stages unlabelled; the dense
    fine-tune draws labelled items only; an unlabelled item adds the distillation terms and no label loss."""
    import dataclasses

    import pytest
    import torch.nn.functional as F

    from etformer.data import load_split
    from etformer.errors import EtformerError
    from etformer.models import load_model
    from etformer.pruning.recipe import KD_TEMPERATURE, RecipeConfig, _Trainer, _training_items

    plan = PruningPlan.uniform("tile", 0.5, (16, 16))
    cfg = RecipeConfig(plan=plan, task="mrpc", glue_dir=glue_dir, distill_tasks=("rte", "stsb"), distill_limit=300,
                       kd=1.0, train_limit=40, batch_size=8, max_len=32)
    items = _training_items(cfg, distill=False)
    labelled = [i for i in items if i[1] is not None]
    extra = [t for t, y in items if y is None]
    pairs = {e.texts for task in ("rte", "stsb") for e in load_split(task, "train", glue_dir)}
    assert len(labelled) == 40 and 300 < len(extra) <= 600
    assert all(len(t) == 2 for t in extra) and set(extra) <= pairs
    with pytest.raises(EtformerError, match="form"):  # single sentences cannot feed a pair task's head
        _training_items(dataclasses.replace(cfg, distill_tasks=("sst2",)), distill=False)
    # other splits by "task:split"; test splits give their (unlabelled) inputs
    test_cfg = dataclasses.replace(cfg, distill_tasks=("rte:test", "qnli:dev"), distill_limit=None)
    got = [t for t, y in _training_items(test_cfg, distill=False) if y is None]
    from etformer.data import load_inputs
    rte_test, qnli_dev = load_inputs("rte:test", glue_dir)[1], load_inputs("qnli:dev", glue_dir)[1]
    assert len(rte_test) == 3000 and set(got) == set(rte_test) | set(qnli_dev)
    for bad, why in (("rte:valid", "split"), ("mrpc:dev", "scored"), ("mrpc:train", "already")):
        with pytest.raises(EtformerError, match=why):
            dataclasses.replace(cfg, distill_tasks=(bad,))

    model, tok = load_model(None, with_head=True, num_labels=2)
    tr = _Trainer(model, tok, dataclasses.replace(cfg, dense_epochs=1.0), None)
    assert tr.steps_for(1.0, labelled_only=True) == 5 and tr.steps_for(1.0) == -(-len(items) // 8)
    for _ in range(10):
        _, ys = next(tr._batches(labelled_only=True))
        assert None not in ys
    tr.snapshot_teacher()
    with torch.no_grad():
        model.classifier.weight.add_(torch.randn_like(model.classifier.weight))
    batch = next(__import__("etformer.evaluate", fromlist=["batches"]).batches(
        tok, [labelled[0][0], extra[0]], 2, 32, "cpu"))
    with torch.no_grad():
        s, t = model(**batch).logits, tr.teacher(**batch).logits
        T = KD_TEMPERATURE
        kl = T * T * F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                              reduction="batchmean")
        expect = float(F.cross_entropy(s[:1], torch.tensor([labelled[0][1]])) + kl)
        got = float(tr.loss(batch, [labelled[0][1], None]))
        only_kd = float(tr.loss(batch, [None, None]))
    assert float(kl) > 1e-4
    assert abs(got - expect) <= 1e-4 * expect and abs(only_kd - float(kl)) <= 1e-4 * float(kl)


def test_every_layer_distillation_loss(glue_dir):
    """distill_hidden: the token term averages the masked MSE of every layer's hidden states; zero at the teacher."""
    import copy

    from etformer.evaluate import batches, mean_pool
    from etformer.models import load_model
    from etformer.pruning.recipe import RecipeConfig, _Trainer

    model, tok = load_model(None)
    plan = PruningPlan.uniform("tile", 0.5, (16, 16))
    cfgs = {deep: RecipeConfig(plan=plan, task="stsb", glue_dir=glue_dir, distill_hidden=deep, train_limit=8)
            for deep in (False, True)}
    batch = next(batches(tok, [("a cat sat on the mat",), ("two dogs run in a big field today",)], 2, 32, "cpu"))
    for deep, cfg in cfgs.items():
        tr = _Trainer(model, tok, cfg, None)
        assert float(tr.loss(batch, [None, None])) < 1e-6  # the student is still its teacher
    student = copy.deepcopy(model)
    with torch.no_grad():
        student.encoder.layer[2].intermediate.dense.weight.mul_(0.5)
    teacher = copy.deepcopy(model).eval()
    with torch.no_grad():
        so = student(**batch, output_hidden_states=True)
        to = teacher(**batch, output_hidden_states=True)
    m = batch["attention_mask"].unsqueeze(-1).float()
    mse = [float(((a - b) ** 2 * m).sum() / (m.sum() * a.shape[-1])) for a, b in zip(so.hidden_states[1:],
                                                                                     to.hidden_states[1:])]
    cos = float(1 - torch.nn.functional.cosine_similarity(mean_pool(so.last_hidden_state, batch["attention_mask"]),
                                                          mean_pool(to.last_hidden_state, batch["attention_mask"])).mean())
    assert mse[0] < 1e-10 < mse[2]  # layers before the change match, the changed one does not
    for deep, expect in ((False, mse[-1] + cos), (True, sum(mse) / len(mse) + cos)):
        tr = _Trainer(student, tok, cfgs[deep], None)
        tr.teacher = teacher
        with torch.no_grad():
            got = float(tr.loss(batch, [None, None]))
        assert abs(got - expect) <= 1e-4 * max(expect, 1e-3), (deep, got, expect)


def test_task_head_distillation_terms(glue_dir):
    """kd / distill_hidden with a task head: label loss plus KL of the logits and every layer's hidden-state MSE against
    the frozen dense model; both terms vanish at the teacher and grow when the student moves."""
    import dataclasses

    import torch.nn.functional as F

    from etformer.models import load_model
    from etformer.pruning.recipe import KD_TEMPERATURE, RecipeConfig, _Trainer

    model, tok = load_model(None, with_head=True, num_labels=2)
    plan = PruningPlan.uniform("tile", 0.5, (16, 16))
    cfg = RecipeConfig(plan=plan, task="sst2", glue_dir=glue_dir, kd=2.0, distill_hidden=True, train_limit=16,
                       batch_size=8, max_len=32)
    tr = _Trainer(model, tok, cfg, None)  # no dense stage: the model as given is the teacher
    assert tr.teacher is not None and tr.teacher is not model
    batch, labels = next(tr._batches())
    y = torch.tensor(labels)
    with torch.no_grad():
        ce = F.cross_entropy(model(**batch).logits, y)
        assert abs(float(tr.loss(batch, labels)) - float(ce)) < 1e-5
        model.classifier.weight.add_(torch.randn_like(model.classifier.weight))
        model.bert.encoder.layer[1].output.dense.weight.mul_(0.5)
        so = model(**batch, output_hidden_states=True)
        to = tr.teacher(**batch, output_hidden_states=True)
        T = KD_TEMPERATURE
        kl = T * T * F.kl_div(F.log_softmax(so.logits / T, -1), F.softmax(to.logits / T, -1), reduction="batchmean")
        m = batch["attention_mask"].unsqueeze(-1).float()
        hid = sum(float(((a - b) ** 2 * m).sum() / (m.sum() * a.shape[-1]))
                  for a, b in zip(so.hidden_states[1:], to.hidden_states[1:])) / (len(so.hidden_states) - 1)
        expect = float(F.cross_entropy(so.logits, y)) + 2.0 * float(kl) + hid
        got = float(tr.loss(batch, labels))
    assert float(kl) > 1e-4 and hid > 1e-6  # the student moved, so both terms are live
    assert abs(got - expect) <= 1e-4 * expect, (got, expect)
    # with a dense stage the teacher is taken after it, not before
    tr2 = _Trainer(model, tok, dataclasses.replace(cfg, dense_epochs=1.0), None)
    assert tr2.teacher is None
    tr2.snapshot_teacher()
    assert torch.equal(tr2.teacher.classifier.weight, model.classifier.weight)


def test_sparse_stages_take_their_own_learning_rate(glue_dir, monkeypatch):
    """sparse_lr sets the peak rate of the gradual-prune and retrain stages; the dense fine-tune keeps lr; without
    it every stage runs at lr. A rate that is not positive is refused."""
    import dataclasses

    import pytest

    from etformer.errors import EtformerError
    from etformer.models import load_model
    from etformer.pruning import recipe

    seen = []
    monkeypatch.setattr(recipe, "_train_steps", lambda model, params, stage, steps, next_loss, lr, *a: seen.append(
        (stage, lr)))
    cfg = recipe.RecipeConfig(plan=PruningPlan.uniform("tile", 0.5, (16, 16)), task="mrpc", method="gmp",
                              glue_dir=glue_dir, dense_epochs=1.0, lr=3e-4, sparse_lr=5e-5, kd=1.0, train_limit=16,
                              batch_size=8, max_len=16)
    model, tok = load_model(None, with_head=True, num_labels=2)
    recipe.run_recipe(model, tok, cfg)
    assert seen == [("dense", 3e-4), ("gradual", 5e-5), ("retrain", 5e-5)]
    seen.clear()
    recipe.run_recipe(model, tok, dataclasses.replace(cfg, sparse_lr=None))
    assert seen == [("dense", 3e-4), ("gradual", 3e-4), ("retrain", 3e-4)]
    for bad in (0.0, -1e-4):
        with pytest.raises(EtformerError, match="sparse_lr"):
            dataclasses.replace(cfg, sparse_lr=bad)
