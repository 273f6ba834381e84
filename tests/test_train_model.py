"""The skip-gram trainer's cembed model (issue 11): one step against a NumPy reference of the same
math, the row-wise Adagrad choice, and the torch backend refusing it."""
import sys

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


@pytest.mark.quality
def test_rowwise_adagrad_learns():
    corpus = corpus_mod.synthetic_corpus(20000, 20, 300_000, seed=1)
    result = train_mod.train(corpus, train_mod.TrainConfig(optimizer="rowwise_adagrad", seed=1), progress=False)
    assert result.quality_after["frequent"] > 3 * result.chance["frequent"]


@pytest.mark.parametrize("peers", ["installed or not", "absent"])
def test_rowwise_adagrad_is_cembed_only(capsys, monkeypatch, peers):
    if peers == "absent":   # (the same message on a machine without torch)
        monkeypatch.setitem(sys.modules, "torch", None)
    assert main(["train", "--vocab-size", "500", "--topics", "5", "--tokens", "5000", "--quiet", "--no-save",
                 "--no-plot", "--optimizer", "rowwise_adagrad", "--backend", "cembed,torch"]) == 2
    assert "rowwise_adagrad" in capsys.readouterr().err


def reference_pairs(tokens, sentence, reach):
    """Every (center, context) pair word2vec's dynamic window forms, one token at a time: token i
    with each token j != i of its sentence with |i - j| <= reach[i]."""
    out = []
    for i in range(tokens.size):
        for j in range(max(0, i - int(reach[i])), min(tokens.size, i + int(reach[i]) + 1)):
            if j != i and sentence[j] == sentence[i]:
                out.append((int(tokens[i]), int(tokens[j])))
    return sorted(out)


@pytest.mark.parametrize("window", [1, 3, 5])
def test_pairs_are_word2vecs_dynamic_window_shuffled(window):
    rng = np.random.default_rng(window)
    n = 400
    tokens = rng.permutation(n).astype(np.int32)                 # distinct words: a pair names its positions
    sentence = np.sort(rng.integers(0, 30, n)).astype(np.int32)
    corpus = corpus_mod.synthetic_corpus(60, 3, 2000, seed=0)
    stream = train_mod.BatchStream(corpus, train_mod.TrainConfig(window=window))
    reach = np.random.default_rng(7).integers(1, window + 1, n, dtype=np.int8)  # the stream's first draw
    centers, contexts = stream.pairs(tokens, sentence, np.random.default_rng(7))
    assert centers.dtype == contexts.dtype == np.int32
    assert sorted(zip(centers.tolist(), contexts.tolist())) == reference_pairs(tokens, sentence, reach)
    # shuffled: not in corpus order, and a token's pairs (up to 2 * window of them) are spread over the
    # chunk rather than adjacent
    position = np.argsort(tokens)
    assert not np.all(np.diff(position[centers]) >= 0)
    if window > 1:
        adjacent = np.mean(centers[1:] == centers[:-1])
        assert adjacent < 0.1


def test_pairs_of_tiny_chunks():
    corpus = corpus_mod.synthetic_corpus(60, 3, 2000, seed=0)
    stream = train_mod.BatchStream(corpus, train_mod.TrainConfig(window=5))
    for n in (0, 1, 2, 6):
        tokens = np.arange(n, dtype=np.int32)
        centers, contexts = stream.pairs(tokens, np.zeros(n, np.int32), np.random.default_rng(0))
        reach = np.random.default_rng(0).integers(1, 6, n, dtype=np.int8)
        assert sorted(zip(centers.tolist(), contexts.tolist())) == reference_pairs(tokens, np.zeros(n), reach)


@pytest.mark.parametrize("preset", [None, "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"])
def test_train_entry_point_relaunches_with_passive_openmp_waiting(monkeypatch, preset):
    """`python -m cembed train` runs again (exec) with OMP_WAIT_POLICY=passive unless the user chose
    the OpenMP waiting; main(argv) inside another program never does."""
    from cembed.apps import cli

    for name in cli.OPENMP_WAIT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    if preset is not None:
        monkeypatch.setenv(preset, "active" if preset == "OMP_WAIT_POLICY" else "1000")
    calls = []

    def fake_exec(path, args, env):
        calls.append((path, args, env))
        raise SystemExit(0)

    monkeypatch.setattr(cli.os, "execve", fake_exec)
    monkeypatch.setattr(train_mod, "train", lambda *a, **k: pytest.fail("trained in the process that relaunches"))
    argv = ["train", "--vocab-size", "500", "--topics", "5", "--tokens", "100", "--quiet", "--no-save"]
    monkeypatch.setattr(cli.sys, "argv", ["cembed", *argv])
    monkeypatch.setattr(cli.sys, "orig_argv", ["python", "-m", "cembed", *argv])
    if preset is None:
        with pytest.raises(SystemExit):
            cli.main()
        [(path, args, env)] = calls
        assert path == args[0] and args[1:] == ["-m", "cembed", *argv] and env["OMP_WAIT_POLICY"] == "passive"
    else:
        monkeypatch.setattr(cli, "run_train", lambda args: 0)
        assert cli.main() == 0 and calls == []
    monkeypatch.setattr(cli, "run_train", lambda args: 0)
    calls.clear()
    assert cli.main(argv) == 0 and calls == []                   # a library call: never relaunched


@pytest.mark.parametrize("optimizer", ["sgd", "sparseadam"])
def test_training_is_bitwise_the_same_for_any_thread_count(optimizer):
    corpus = corpus_mod.synthetic_corpus(3000, 10, 40_000, seed=2)
    tables = [train_mod.train(corpus, train_mod.TrainConfig(dim=16, batch_size=2048, optimizer=optimizer,
                                                            threads=threads), progress=False).table
              for threads in (1, 2, 3)]
    assert np.abs(tables[0]).max() > 0.05                        # trained: the init is within 0.5 / 16
    assert tables[0].tobytes() == tables[1].tobytes() == tables[2].tobytes()


def test_background_batches_are_the_stream_in_order():
    """The background batch thread hands over exactly BatchStream's batches, in order, and training
    with it is bitwise training without it."""
    corpus = corpus_mod.synthetic_corpus(3000, 10, 40_000, seed=2)
    config = train_mod.TrainConfig(dim=16, batch_size=2048, chunk_tokens=8192)
    direct = list(train_mod.BatchStream(corpus, config))
    background = list(train_mod.BackgroundBatches(train_mod.BatchStream(corpus, config)))
    assert len(direct) == len(background) > 10
    for (c0, t0, w0), (c1, t1, w1) in zip(direct, background):
        assert np.array_equal(c0, c1) and np.array_equal(t0, t1) and w0 == w1
    tables = [train_mod.train(corpus, train_mod.TrainConfig(dim=16, batch_size=2048, background_batches=flag),
                              progress=False).table for flag in (False, True)]
    assert tables[0].tobytes() == tables[1].tobytes()


def test_background_batches_raise_the_sources_error_and_stop():
    def source():
        yield 1
        yield 2
        raise KeyError("broken corpus")

    batches = train_mod.BackgroundBatches(source())
    assert next(batches) == 1 and next(batches) == 2
    with pytest.raises(KeyError, match="broken corpus"):
        next(batches)
    with pytest.raises(StopIteration):
        next(batches)
    assert not batches._thread.is_alive()
    # stopped early (the consumer failed): close() ends the thread, blocked on a full queue or not
    endless = train_mod.BackgroundBatches(iter(int, 1), depth=1)
    assert next(endless) == 0
    endless.close()
    assert not endless._thread.is_alive()
    with pytest.raises(StopIteration):
        next(endless)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice levels are Linux's")
def test_batch_thread_runs_nicer_than_the_trainer():
    """The batch thread lowers its own priority (BATCH_THREAD_NICE levels, capped at 19), and only
    its own: the trainer's thread keeps its nice level."""
    import os
    import threading

    def nice():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    mine = nice()
    if mine + train_mod.BATCH_THREAD_NICE > 19:
        pytest.skip(f"this process already runs at nice {mine}: no room to go {train_mod.BATCH_THREAD_NICE} lower")
    seen = list(train_mod.BackgroundBatches(nice() for _ in range(3)))
    assert seen == [mine + train_mod.BATCH_THREAD_NICE] * 3
    assert nice() == mine


def test_training_that_fails_stops_the_batch_thread(monkeypatch):
    """A step that raises (or Ctrl-C) ends train() with the batch thread stopped, not left polling."""
    import threading
    corpus = corpus_mod.synthetic_corpus(3000, 10, 40_000, seed=2)
    calls = []

    def failing_step(self, centers, targets):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("step failed")

    monkeypatch.setattr(train_mod.CembedModel, "step", failing_step)
    with pytest.raises(RuntimeError, match="step failed"):
        train_mod.train(corpus, train_mod.TrainConfig(dim=16, batch_size=512, chunk_tokens=4096), progress=False)
    assert len(calls) == 3
    assert not [t for t in threading.enumerate() if t.name == "cembed-batches"]
