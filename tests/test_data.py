import numpy as np
import pytest
from scipy import stats

from etformer.data import compute_metric, load_split, task_spec
from etformer.errors import EtformerError

COUNTS = {"sst2": 872, "mrpc": 408, "stsb": 1500, "rte": 277, "cola": 1043, "qnli": 5463}


@pytest.mark.parametrize("task", list(COUNTS))
def test_dev_splits(glue_dir, task):
    ex = load_split(task, "dev", glue_dir)
    spec = task_spec(task)
    assert len(ex) == COUNTS[task]
    assert all(len(e.texts) == len(spec.text_cols) and all(e.texts) for e in ex[:50])
    if spec.is_regression:
        assert all(0 <= e.label <= 5 for e in ex)
    else:
        assert {e.label for e in ex} == set(range(len(spec.labels)))


def test_missing_data_message(tmp_path, monkeypatch):
    monkeypatch.setenv("GLUE_DIR", str(tmp_path))
    with pytest.raises(EtformerError, match="GLUE_DIR") as e:
        load_split("rte", "dev")
    assert "RTE/dev.tsv" in str(e.value)
    with pytest.raises(EtformerError, match="unknown task"):
        load_split("mnli-x", "dev")


@pytest.mark.parametrize("source,count,width", [("sst2:test", 1821, 1), ("cola:test", 1063, 1), ("mrpc:test", 1725, 2),
                                                 ("qnli:test", 5463, 2), ("rte", 2490, 2), ("stsb:dev", 1500, 2)])
def test_unlabelled_inputs(glue_dir, source, count, width):
    """Distillation inputs of any split, test splits (no labels) included: texts only, of the task's width."""
    from etformer.data import load_inputs

    spec, texts = load_inputs(source, glue_dir)
    assert spec.name == source.partition(":")[0] and len(texts) == count
    assert all(len(t) == width and all(t) for t in texts)


def test_unlabelled_inputs_bad_input(tmp_path):
    from etformer.data import load_inputs

    with pytest.raises(EtformerError, match="train, dev or test"):
        load_inputs("rte:validation", str(tmp_path))
    with pytest.raises(EtformerError, match="RTE/test.tsv"):  # the missing file named
        load_inputs("rte:test", str(tmp_path))
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "test.tsv").write_text("index\tpremise\thypothesis\n0\ta\tb\n")
    with pytest.raises(EtformerError, match="lacks a column"):
        load_inputs("rte:test", str(tmp_path))
    (tmp_path / "RTE" / "test.tsv").write_text("index\tsentence1\tsentence2\n")
    with pytest.raises(EtformerError, match="no examples"):
        load_inputs("rte:test", str(tmp_path))


def test_metrics_against_references():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = np.where(rng.random(500) < 0.8, y, 1 - y)
    m = compute_metric("cola", p, y)
    tp = ((p == 1) & (y == 1)).sum(); tn = ((p == 0) & (y == 0)).sum()
    fp = ((p == 1) & (y == 0)).sum(); fn = ((p == 0) & (y == 1)).sum()
    mcc = (tp * tn - fp * fn) / np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    assert m["matthews"] == pytest.approx(100 * mcc)
    assert compute_metric("mrpc", p, y)["f1"] == pytest.approx(100 * 2 * tp / (2 * tp + fp + fn))
    assert compute_metric("sst2", p, y)["accuracy"] == pytest.approx(100 * (p == y).mean())
    a, b = rng.random(100), rng.random(100)
    r = compute_metric("stsb", a, b)
    assert r["spearman"] == pytest.approx(100 * stats.spearmanr(a, b)[0])
    assert r["pearson"] == pytest.approx(100 * stats.pearsonr(a, b)[0])
    with pytest.raises(EtformerError, match="NaN"):
        compute_metric("stsb", np.array([np.nan, 1.0]), np.array([1.0, 2.0]))
