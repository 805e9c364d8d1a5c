"""The one Scale class every paper declares its sizes with."""
import pickle

import pytest

from assocmem.experiments import geometric_common, induction, lca
from assocmem.experiments.scale import REQUIRED, Scale, make_scales


def test_scales_fill_defaults_and_refuse_unknown_or_missing_settings():
    s = make_scales({"d": REQUIRED, "steps": 500}, quick={"d": 64}, paper={"d": 256, "steps": 1000})
    assert (s["quick"].d, s["quick"].steps, s["paper"].steps) == (64, 500, 1000)
    with pytest.raises(ValueError, match="unknown setting 'dd'"):
        make_scales({"d": REQUIRED}, quick={"dd": 64})
    with pytest.raises(ValueError, match="setting 'd' is required"):
        make_scales({"d": REQUIRED, "steps": 5}, quick={"steps": 6})


def test_a_scale_is_immutable_copyable_and_picklable():
    sc = Scale("quick", {"d": 64, "lr": 0.1})
    with pytest.raises(AttributeError, match="immutable"):
        sc.d = 3
    with pytest.raises(AttributeError, match="no setting 'D'"):
        sc.D
    tiny = sc.replace("tiny", d=8)
    assert (tiny.name, tiny.d, tiny.lr, sc.d) == ("tiny", 8, 0.1, 64)
    with pytest.raises(AttributeError):
        sc.replace(width=3)
    assert pickle.loads(pickle.dumps(tiny)) == tiny


def test_every_paper_uses_it():
    for module in (lca, induction, geometric_common):
        assert {"quick", "paper"} <= set(module.SCALES)
        assert all(isinstance(s, Scale) and s.name == name for name, s in module.SCALES.items())
