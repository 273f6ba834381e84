"""The skip-gram trainer's cembed model (issue 11): one step against a NumPy reference of the same
math, the row-wise Adagrad choice, and the torch backend refusing it."""
import numpy as np
import pytest

from cembed.apps import corpus as corpus_mod
from cembed.apps import train as train_mod
from cembed.apps.cli import main


def reference_sgd_step(w_in, w_out, centers, targets, lr):
    """Skip-gram negative sampling, column 0 the positive: both gradients from the tables as they
    were before the step, then plain SGD on every touched row (float64)."""
    w_in, w_out = w_in.astype(np.float64), w_out.astype(np.float64)
    v = w_in[centers]                                            # (B, D)
    u = w_out[targets]                                           # (B, K, D)
    s = np.einsum("bkd,bd->bk", u, v)
    sign = np.where(np.arange(targets.shape[1]) == 0, -1.0, 1.0)
    g = sign / (1 + np.exp(-sign * s))                           # d loss / d s
    loss = np.logaddexp(0, sign * s).sum() / centers.size
    d_in = np.zeros_like(w_in)
    np.add.at(d_in, centers, np.einsum("bk,bkd->bd", g, u))
    d_out = np.zeros_like(w_out)
    np.add.at(d_out, targets.ravel(), (g[:, :, None] * v[:, None, :]).reshape(-1, v.shape[1]))
    return w_in - lr * d_in, w_out - lr * d_out, loss


def test_cembed_step_matches_reference():
    rng = np.random.default_rng(4)
    n_rows, dim = 300, 24
    w_in = rng.standard_normal((n_rows, dim)).astype(np.float32) * 0.3
    w_out = rng.standard_normal((n_rows, dim)).astype(np.float32) * 0.3
    config = train_mod.TrainConfig(dim=dim, optimizer="sgd", lr=0.05)
    model = train_mod.CembedModel(w_in.copy(), w_out.copy(), config)
    for step in range(3):
        centers = rng.integers(0, n_rows, 500).astype(np.int32)
        targets = rng.integers(0, n_rows, (500, 6)).astype(np.int32)
        targets[:40, 0] = centers[:40]                           # a word as its own context, too
        want_in, want_out, want_loss = reference_sgd_step(model.emb_in.weight, model.emb_out.weight,
                                                          centers, targets, 0.05)
        loss = model.step(centers, targets)
        np.testing.assert_allclose(model.emb_in.weight, want_in, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(model.emb_out.weight, want_out, rtol=1e-4, atol=1e-6)
        if step % train_mod.LOSS_EVERY == 0:                     # reported on steps 1, 1 + LOSS_EVERY, ...
            assert loss == pytest.approx(want_loss, rel=1e-5)
        else:
            assert loss is None


def test_rowwise_adagrad_learns():
    corpus = corpus_mod.synthetic_corpus(20000, 20, 300_000, seed=1)
    result = train_mod.train(corpus, train_mod.TrainConfig(optimizer="rowwise_adagrad", seed=1), progress=False)
    assert result.quality_after["frequent"] > 3 * result.chance["frequent"]


def test_rowwise_adagrad_is_cembed_only(capsys):
    assert main(["train", "--vocab-size", "500", "--topics", "5", "--tokens", "5000", "--quiet", "--no-save",
                 "--no-plot", "--optimizer", "rowwise_adagrad", "--backend", "cembed,torch"]) == 2
    assert "rowwise_adagrad" in capsys.readouterr().err
