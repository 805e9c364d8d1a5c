"""Data checks C-1..C-3 of the induction spec (exact statistics of tiny Shakespeare)."""
import math

import pytest
import torch

from assocmem.tasks.induction import TriggerBigram, load_stats, position_labels, resolve_data_path


@pytest.fixture(scope="module")
def stats(shared_data):
    return load_stats(str(shared_data / "tinyshakespeare" / "input.txt"))


def test_c1_vocabulary_and_statistics(stats):
    assert stats.N == 65 and stats.n_chars == 1_115_394 and stats.bigram_counts.sum() == 1_115_393
    assert stats.chars[:2] == "\n " and stats.chars[2:13] == "!$&',-.3:;?"
    assert (stats.bigram_counts.sum(1) > 0).all()
    top = [stats.chars[i] for i in stats.top_tokens(11)]
    assert top == [" ", "e", "t", "o", "a", "h", "s", "r", "n", "i", "\n"]
    assert stats.top_tokens(5).tolist() == [1, 43, 58, 53, 39]
    assert [stats.chars[i] for i in stats.top_tokens(3)] == [" ", "e", "t"]
    assert float(stats.pi_u[1]) == pytest.approx(0.1523, abs=5e-5)
    assert float(stats.pi_u[43]) == pytest.approx(0.0848, abs=5e-5)
    assert stats.bigram_entropy() == pytest.approx(2.4526, abs=1e-4)
    a, t = stats.encode("a")[0], stats.encode("t")[0]
    assert float(stats.pi_b[a, stats.encode("n")[0]]) == pytest.approx(0.184, abs=5e-4)
    assert float(stats.pi_b[t, stats.encode("h")[0]]) == pytest.approx(0.339, abs=5e-4)


def test_missing_data_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="task.data_path"):
        resolve_data_path(str(tmp_path / "nope.txt"))


# spec table (512 sequences, T = 256): share outs >= 1, share outs >= 2
TABLE = {(1, False): (0.066, 0.062), (1, True): (0.152, 0.148), (3, False): (0.159, 0.148),
         (3, True): (0.237, 0.225), (5, False): (0.240, 0.222), (5, True): (0.325, 0.307),
         (10, False): (0.389, 0.357), (10, True): (0.382, 0.347)}


@pytest.mark.parametrize("K,fixed", list(TABLE))
def test_c2_generator_shares(stats, K, fixed):
    """Our expectation (2048 sequences) vs the spec's single 512-sequence draw. The 512-draw itself
    has sd up to ~0.012 (sequences whose output equals its trigger loop forever), so the tolerance
    is 0.01 + 2 sd = 0.025 (measured deviations are listed in docs/induction.md)."""
    ds = TriggerBigram(stats, 256, K, fixed)
    b = ds.sample(2048, torch.Generator().manual_seed(1234))
    s1, s2 = float((b.outs >= 1).float().mean()), float((b.outs >= 2).float().mean())
    assert s1 == pytest.approx(TABLE[K, fixed][0], abs=0.025)
    assert s2 == pytest.approx(TABLE[K, fixed][1], abs=0.025)


def test_c3_reference_losses_and_labels(stats):
    ds = TriggerBigram(stats, 256, 3, False)
    b = ds.sample(512, torch.Generator().manual_seed(0))
    m = b.outs == 0
    ce = -torch.log(stats.pi_b[b.x[m], b.y[m]]).mean()
    assert float(ce) == pytest.approx(2.32, abs=0.03)
    # triggers are followed by their outputs; labels count occurrences
    hit = b.outs >= 1
    k = (b.x[..., None] == b.triggers[:, None]).float().argmax(-1)
    assert torch.equal(b.y[hit], torch.gather(b.outputs, 1, k)[hit])
    assert torch.equal(position_labels(b.x, b.triggers), b.outs)
    # fixed triggers: same set for every sequence; deterministic under the generator
    b2 = ds.sample(512, torch.Generator().manual_seed(0))
    assert torch.equal(b.x, b2.x)
    assert math.log(65) == pytest.approx(4.174, abs=1e-3)


def test_output_kinds(stats):
    g = torch.Generator().manual_seed(0)
    for kind, lo, hi in (("ood_train", 0, 47), ("ood_test", 48, 64)):
        ds = TriggerBigram(stats, 32, 5, False, outputs=kind)
        o = ds.sample(64, g).outputs
        assert int(o.min()) >= lo and int(o.max()) <= hi
    ds = TriggerBigram(stats, 32, 5, True, no_repeat=True)
    b = ds.sample(256, g)
    assert not (b.outputs == b.triggers).any()


def test_chained_sequences(stats):
    """Batch.chained flags sequences where an output is itself a trigger: by hand, at the rate
    1 - (62/65)^3 for three fixed triggers with uniform outputs, and those sequences are mostly
    in-context positions."""
    from assocmem.tasks.induction import Batch
    z = torch.zeros(2, 4, dtype=torch.long)
    b = Batch(z, z, z, torch.tensor([[1, 2], [1, 2]]), torch.tensor([[2, 5], [5, 6]]))
    assert b.chained().tolist() == [True, False]
    b = TriggerBigram(stats, 256, 3, True).sample(4096, torch.Generator().manual_seed(0))
    ch = b.chained()
    assert float(ch.float().mean()) == pytest.approx(1 - (62 / 65) ** 3, abs=0.025)
    n_ic = (b.outs >= 2).sum(1).float()
    assert float(n_ic[ch].mean()) > 2 * float(n_ic[~ch].mean())
