"""Every figure a report names has one declared plotting function, and docs/DEVELOPING.md indexes them."""
import re
from pathlib import Path

import pytest

import assocmem
from assocmem import plots
from assocmem.report import INDEX_END, INDEX_START, PLOT_MODULES, figure_index

SRC = Path(assocmem.__file__).parent
DOC = Path(__file__).resolve().parents[1] / "docs" / "DEVELOPING.md"


def test_developing_md_holds_the_current_index():
    text = DOC.read_text()
    block = text.split(INDEX_START, 1)[1].split(INDEX_END, 1)[0].strip()
    assert block == figure_index(), "run: python scripts/figure_index.py --write"


def test_every_module_that_declares_figures_is_indexed():
    declaring = set()
    for path in SRC.rglob("*.py"):
        if re.search(r"^@(plots\.)?figure\(", path.read_text(), re.M):
            declaring.add(".".join(("assocmem",) + path.relative_to(SRC).with_suffix("").parts))
    assert declaring == set(PLOT_MODULES)


def test_names_resolve_to_exactly_one_function():
    figure_index()                                     # imports every declaring module
    assert plots.builder_of("hamming_inner_n7") == "assocmem.experiments.lca_plots.hamming_inner"
    assert plots.builder_of("no_wv_hamming_inner_n7") == "assocmem.experiments.lca_plots.hamming_inner"
    assert plots.builder_of("explain_google-gemma-2b_lens") == "assocmem.hijack.explain_plots.plot_logit_lens"
    assert plots.builder_of("sentence_true_P1412") == "assocmem.experiments.hijack.curve_figure"
    assert plots.builder_of("Wv_bar") is None and plots.builder_of("geo_e0_margin_extra") is None


def test_save_refuses_an_undeclared_name_and_a_pattern_has_one_owner(tmp_path):
    fig, _ = plots.new_figure()
    with pytest.raises(ValueError, match="no plotting function declares"):
        plots.save(fig, tmp_path, "my_unlisted_figure")
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="declared by"):
        plots.figure("geo_e0_margin")(test_names_resolve_to_exactly_one_function)
    plots.plt.close(fig)
