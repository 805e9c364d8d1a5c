"""LCA plotting functions on tiny DataFrames, and the elephants report builder end to end on a tiny
fake grid (a few training steps on m = 3, 4)."""
import re

import numpy as np
import pandas as pd
import pytest

from assocmem import findings, report
from assocmem.experiments import lca_plots
from assocmem.experiments import lca as E
from assocmem.plots import save


def _summary(x, series, xs, names):
    return pd.DataFrame([{x: v, series: s, "mean": 0.5 + 0.01 * i, "sem": 0.01}
                         for i, v in enumerate(xs) for s in names])


CASES = {
    "wv_bar": (lambda: lca_plots.wv_bar(_summary("m", "variant", [5, 6], ["Identity Wv", "Trained Wv"])),
               "Number of Latent Concepts", "Accuracy"),
    "confusion_bar": (lambda: lca_plots.confusion_bar(_summary("r", "target", [0.0, 0.5, 1.0], ["Target True", "Target False"])),
                      "Mixing Rate", "Accuracy"),
    "hamming_inner": (lambda: lca_plots.hamming_inner(_summary("distance", "d", [0, 1, 2], [16, 32])),
                      "Hamming Distance", "Average Inner Product"),
    "wv_replace": (lambda: lca_plots.wv_replace(_summary("d", "series", [16, 32], ["Original", "Constructed Wv", "Random Wv"])),
                   "Dimensions", "Accuracy"),
    "wv_angle": (lambda: lca_plots.wv_angle(_summary("d", "series", [16, 32], ["Constructed Wv", "Random Wv", "Gaussian Wv"])),
                 "Dimensions", "Average Smallest Principal Angle"),
    "dim": (lambda: lca_plots.dim(_summary("d", "series", [16, 32, 64], ["Frozen Embeddings", "Trained Embeddings"]), 5),
            "Dimensions", "Accuracy"),
    "spectrum": (lambda: lca_plots.spectrum(pd.DataFrame({"index": np.arange(5), "value": [5, 4, 3, 0.1, 0.05]})),
                 "Index", "Singular Value"),
    "length": (lambda: lca_plots.length(_summary("L", "d", [8, 16], [16, 32]),
                                pd.DataFrame({"L": [8, 16], "accuracy": [0.3, 0.5]})),
               "Context Lengths", "Accuracy"),
    "heat_map": (lambda: lca_plots.heat_map(pd.DataFrame(np.full((4, 4), 0.25))), "Key Tokens", "Query Tokens"),
}


# a file name each plotting function declares (plots.figure)
FILE_NAMES = {"wv_bar": "Wv_bar_l64", "confusion_bar": "confusion_bar_l5", "hamming_inner": "hamming_inner_n5",
              "wv_replace": "wv_replace_dim_n5", "wv_angle": "wv_angle_dim_n5", "dim": "dim_n5",
              "spectrum": "spectrum_n5_d32_e0", "length": "length_n5", "heat_map": "heat_map_n5_c2"}


@pytest.mark.parametrize("name", list(CASES))
def test_plot_functions_write_labelled_figures(name, tmp_path):
    make, xlabel, ylabel = CASES[name]
    fig = make()
    ax = fig.axes[0]
    assert ax.get_xlabel() == xlabel and ax.get_ylabel() == ylabel
    if name not in ("spectrum", "heat_map"):
        assert ax.get_legend() is not None and len(ax.get_legend().get_texts()) >= 2
    if name in ("wv_replace", "wv_angle", "dim", "length"):
        assert ax.get_xscale() == "log"
    if name == "dim":
        assert any(line.get_linestyle() == "--" for line in ax.get_lines())   # d = 2^m marker
    paths = save(fig, tmp_path, FILE_NAMES[name])
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 0 for p in paths)


def test_paper_figure_names_cover_the_issue_list():
    names = set(E.figure_names("paper"))
    expected = {"Wv_bar_l64", "Wv_bar_l128", "hamming_inner_n7", "hamming_inner_n8"}
    for m in (5, 6, 7, 8):
        expected |= {f"no_wv_hamming_inner_n{m}", f"heat_map_n{m}_c1", f"heat_map_n{m}_c2", f"wv_replace_dim_n{m}",
                     f"wv_angle_dim_n{m}", f"dim_n{m}", f"confusion_bar_l{m}", f"length_n{m}"}
    expected |= {f"spectrum_n{m}_d{d}_e{e}" for m in (7, 8) for d in (32, 64) for e in range(4)}
    assert expected <= names


def test_paper_grid_settings():
    g = E.grids("paper")
    assert {len(v) for k, v in g.items() if k in ("dim_freeze", "dim_no_freeze")} == {4 * 6 * 5}
    assert len(g["cluster"]) == 4 * 2 * 10 and len(g["length"]) == 4 * 3 * 5 * 2 * 5
    lr = {(c.task.m, c.model.d_model): c.optim.lr for c in g["dim_freeze"]}
    assert lr[5, 64] == 1e-2 and lr[5, 128] == 1e-3 and lr[7, 128] == 1e-2 and lr[8, 256] == 1e-3
    assert {c.model.W_V for c in g["no_wv_low_dim"]} == {"identity"}
    assert {c.model.embeddings for c in g["dim_freeze"]} == {"frozen"}
    assert {(c.task.L, c.model.d_model) for c in g["no_wv_low_dim"]} == {(64, 64), (128, 32), (128, 64), (128, 96)}


@pytest.mark.slow
def test_report_builder_on_a_tiny_grid(tmp_path, monkeypatch):
    tiny = E.SCALES["quick"].replace(
        "tiny", ms=(3, 4), dims=(4, 8, 16), length_dims=(4,), lengths=(8, 16),
        seeds={"standard": 2, "dim": 2, "cluster": 2, "length": 2, "low_dim": 2},
        big_d=8, big_L=16, n_eval=128, n_mix=64, n_ref=128, steps=3)
    monkeypatch.setitem(E.SCALES, "tiny", tiny)
    sec = E.reproduce(tmp_path, scale="tiny", jobs=1)
    assert isinstance(sec, findings.Section) and sec.families
    report.write_report(sec, tmp_path)
    md = (tmp_path / "report.md").read_text()
    html = (tmp_path / "report.html").read_text()
    # every figure family drawn, and every figure the report references exists
    for name in E.figure_names("tiny"):
        assert (tmp_path / "figures" / f"{name}.png").exists(), name
        assert (tmp_path / "figures" / f"{name}.pdf").exists(), name
    for ref in re.findall(r"\((figures/[^)]+\.png)\)", md) + re.findall(r"src='(figures/[^']+)'", html):
        assert (tmp_path / ref).exists(), ref
    # every table row has a verdict
    checks = sec.checks()
    assert checks and all(c.verdict in findings.VERDICTS for c in checks)
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| check")]
    assert len(rows) == len(checks)
    assert all(any(f"| {v} |" in ln for v in findings.VERDICTS) for ln in rows)
    # the reference decoders and Bayes accuracies are ours (derived): shown as references, never judged
    derived = [ln for ln in rows if "(ours, derived)" in ln]
    assert any("| reference |" in ln for ln in derived)
    assert not any("| agrees |" in ln or "| disagrees |" in ln for ln in derived)
    # every reference value names its source (the tiny grid's m = 3, 4 has no paper/code targets)
    with_ref = [c for c in checks if c.reference is not None]
    assert with_ref and all(c.source in ("paper", "code", "derived") for c in with_ref)
    assert "total_wall_s" in md and "Run metadata" in md
    # a second call reuses every stored run
    sec2 = E.reproduce(tmp_path, scale="tiny", jobs=1, families=["wv_bar"])
    assert "0 trained now" in sec2.meta["runs"]


def test_scale_names():
    assert set(E.SCALES) >= {"quick", "paper"}
    with pytest.raises(ValueError):
        E.reproduce("/nonexistent", scale="huge")
