"""The benchmark helpers that run without a GPU: argument checks and the kernels report."""
import pytest

from etformer.bench import timing
from etformer.bench.kernels import to_markdown
from etformer.bench.timing import forms_ab, time_cuda


@pytest.mark.parametrize("kw", [dict(per_graph=0, graph=True), dict(per_graph=5, graph=False)])
def test_time_cuda_rejects_bad_per_graph(kw):
    calls = []
    with pytest.raises(ValueError, match="per_graph"):
        time_cuda(lambda: calls.append(1), **kw)
    assert not calls  # rejected before anything ran


def test_kernels_report_states_the_timing_method():
    res = {"env": {"gpu": "GPU", "torch": "t", "triton": "tr", "cuda": "c", "date": "d"},
           "peaks": {"matmul_tflops": 600.0, "copy_tbs": 4.2}, "command": "cmd", "per_graph": 20, "pdl": False,
           "replay_floor": {"1": 8.7, "20": 1.6},
           "linear": [{"matrix": "qkv", "M": 128, "tile": "128x64", "density": 0.5, "ours_us": 3.0,
                       "cublas_dense_us": 4.5, "speedup_vs_cublas": 1.5, "bsr_us": None, "speedup_vs_bsr": None,
                       "floor_us": 0.6, "frac_of_floor": 0.2}],
           "attention": [{"B": 32, "S": 128, "varlen": True, "mean_len": 62.0, "ours_us": 4.0, "sdpa_flash_us": 8.0,
                          "speedup_vs_sdpa": 2.0, "floor_us": 2.9, "frac_of_floor": 0.72}]}
    md = to_markdown(res)
    assert "each replay 20 back-to-back calls" in md and "without programmatic dependent launch" in md
    assert "replays in 8.7 µs when it holds one call and 1.6 µs a call when it holds 20" in md
    assert "| qkv | 128 | 128x64 | 0.50 | 3.0 | 4.5 | 1.50 | failed | – | 0.6 | 20% |" in md
    assert "| 32 | 128 | yes (62) | 4.0 | 8.0 | 2.00 | 2.9 | 72% |" in md


def test_forms_ab_interleaves_forms_and_keeps_each_forms_output(monkeypatch):
    """Each round puts every form in place, in order, before its timed forward; times per round, last outputs."""
    state, log = {"form": None}, []

    def fake_graphed_forward(enc, ids, mask, min_ms=80.0):
        log.append(state["form"])
        return f"out of {state['form']} #{len(log)}", float(len(log))

    monkeypatch.setattr(timing, "graphed_forward", fake_graphed_forward)
    forms = {"a": lambda: state.update(form="a"), "b": lambda: state.update(form="b")}
    times, outs = forms_ab(None, None, None, forms, rounds=3)
    assert log == ["a", "b"] * 3
    assert times == {"a": [1.0, 3.0, 5.0], "b": [2.0, 4.0, 6.0]}
    assert outs == {"a": "out of a #5", "b": "out of b #6"}
