"""C-13 analysis: the re-evaluation on the runner's own long batches equals the run's stored metrics,
and the log-scaled layer-2 remedy leaves the training length untouched."""
import pytest

from assocmem.analysis.induction_length import length_remedy
from assocmem.registry import get_task
from assocmem.runners.induction import load_model
from assocmem.runners.induction_probes import LengthResult

from test_protocol import _config


def test_plain_rows_equal_the_stored_length_metrics_and_scaling_acts_beyond(request):
    cfg = _config("induction", request)
    result = get_task("induction").run(cfg)
    model = load_model(cfg, result.weights)
    rows = {(r["T"], r["scaled"]): r for r in length_remedy(model, cfg)}
    assert model.l2_log_T == 0                                     # restored
    for T in cfg.eval.T_test:
        stored = LengthResult.read(result.metrics, T)
        got = rows[(T, False)]
        assert got["acc_end"] == pytest.approx(stored.acc_end, abs=1e-6)
        assert got["prev_tok"] == pytest.approx(stored.prev_tok, abs=1e-6)
        assert got["ind_mass"] == pytest.approx(stored.ind_mass, abs=1e-5)
        assert rows[(T, True)]["ind_mass"] != pytest.approx(got["ind_mass"], abs=1e-7)
    T0 = cfg.task.T
    for key in ("acc_end", "prev_tok", "ind_mass"):
        assert rows[(T0, True)][key] == pytest.approx(rows[(T0, False)][key], abs=1e-6)
