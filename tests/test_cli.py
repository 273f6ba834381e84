"""The command line (issue 6): `python -m cembed train` and `python -m cembed bench`."""
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

import cembed
from cembed import storage
from cembed.apps import corpus as corpus_mod
from cembed.apps import train as train_mod
from cembed.apps.cli import main

from util import assert_bitwise_equal, env_importing_this_cembed, require_gensim, require_torch

TINY = ["--vocab-size", "20000", "--topics", "20", "--tokens", "300000", "--quiet", "--no-plot"]


def hide_optional_peers(monkeypatch):
    """Make ``import torch`` / ``import gensim`` / ``import ml_dtypes`` fail, as on a machine without them."""
    for name in ("torch", "gensim", "gensim.models", "ml_dtypes"):
        monkeypatch.setitem(sys.modules, name, None)


def test_help_and_bad_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["train", "--dim", "0"])
    assert exc.value.code == 2
    assert "positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["train", "--optimizer", "adam"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_train_synthetic_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "words/s" in text and "frequent p@10" in text and "chance level" in text
    emb = np.load(out / "embeddings.npy")
    vocab = (out / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert emb.shape == (20000, 64) and emb.dtype == np.float32
    assert len(vocab) == emb.shape[0] and vocab[0] == "w0"


@pytest.mark.quality
def test_quality_rises_well_above_chance():
    corpus = corpus_mod.synthetic_corpus(20000, 20, 300_000, seed=3)
    result = train_mod.train(corpus, train_mod.TrainConfig(seed=3), progress=False)
    chance = result.chance["frequent"]
    assert abs(result.quality_before["frequent"] - chance) < 0.03    # random init: about chance
    assert result.quality_after["frequent"] > 6 * chance              # trained: far above it
    assert result.words == corpus.n_tokens and result.words_per_second > 0


@pytest.mark.quality
@pytest.mark.parametrize("optimizer", ["adagrad", "sgd"])
def test_other_optimizers_learn(optimizer):
    corpus = corpus_mod.synthetic_corpus(20000, 20, 300_000, seed=1)
    result = train_mod.train(corpus, train_mod.TrainConfig(optimizer=optimizer, seed=1), progress=False)
    assert result.quality_after["frequent"] > 3 * result.chance["frequent"]


def test_synthetic_corpus_is_deterministic_and_structured():
    a = corpus_mod.synthetic_corpus(1000, 10, 20_000, seed=5)
    b = corpus_mod.synthetic_corpus(1000, 10, 20_000, seed=5)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert np.bincount(a.topics).tolist() == [100] * 10
    # most tokens of a sentence share its topic (10% noise words)
    first = a.tokens[:20]
    share = np.mean(a.topics[first] == np.bincount(a.topics[first]).argmax())
    assert share >= 0.6
    assert a.counts.sum() == a.n_tokens and a.counts[:10].sum() > a.counts[-100:].sum()


def test_corpus_file_end_to_end(tmp_path, capsys):
    rng = np.random.default_rng(0)
    animals, tools = ["cat", "dog", "cow", "pig", "hen"], ["saw", "drill", "hammer", "nail", "screw"]
    lines = [" ".join(rng.choice(animals if i % 2 else tools, 8)) for i in range(400)]
    path = tmp_path / "text.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["train", "--corpus", str(path), "--min-count", "2", "--dim", "16", "--batch-size", "256",
                 "--epochs", "3", "--subsample", "0", "--quiet", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "nearest to" in text
    vocab = (out / "vocab.txt").read_text(encoding="utf-8").splitlines()
    emb = np.load(out / "embeddings.npy")
    assert sorted(vocab) == sorted(animals + tools) and emb.shape == (10, 16)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = unit @ unit.T
    group = np.array([w in animals for w in vocab])
    assert sims[group][:, group].mean() > sims[group][:, ~group].mean()  # animals closer to animals


@pytest.mark.parametrize("content,message", [
    (None, "not found"), ("", "has no words"), ("...\n!!!\n", "has no words"),
    ("one two three\n", "min-count"), (b"\xff\xfe\x00bad", "not valid UTF-8")])
def test_bad_corpus_files(tmp_path, capsys, content, message):
    path = tmp_path / "corpus.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    assert main(["train", "--corpus", str(path), "--quiet", "--no-save"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --corpus: ") and message in err and "Traceback" not in err


def test_console_entry_point_subprocess(tmp_path):
    env = env_importing_this_cembed()
    proc = subprocess.run([sys.executable, "-m", "cembed", "train", "--corpus", str(tmp_path / "missing.txt")],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "--corpus: corpus file not found" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.quality
def test_torch_backend_matches_cembed_quality():
    require_torch()
    corpus = corpus_mod.synthetic_corpus(5000, 10, 100_000, seed=2)
    results = {b: train_mod.train(corpus, train_mod.TrainConfig(seed=2, backend=b, batch_size=4096),
                                  progress=False) for b in ("cembed", "torch")}
    for r in results.values():
        assert r.quality_after["frequent"] > 3 * r.chance["frequent"]
    # the same model, data and initial weights: the learned tables agree closely
    a, b = results["cembed"].table, results["torch"].table
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


def test_bench_json_tiny(capsys):
    assert main(["bench", "--rows", "5000", "--dim", "16", "--n", "4096", "--repeats", "2", "--json",
                 "--only", "gather,sparse_backward,sparse_adam,bag_sum"]) == 0
    data = json.loads(capsys.readouterr().out)
    names = {row["kernel"] for row in data["results"]}
    assert {"gather", "sparse_backward", "sparse_adam", "bag_sum"} <= names
    for row in data["results"]:
        assert row["cembed_ms"] > 0 and row["cembed_gbs"] > 0
    assert data["config"]["rows"] == 5000 and data["copy_gbs"] > 0


@pytest.mark.parametrize("flags,message", [
    (["--seed", "-1"], "integer in [0, 2**64)"), (["--seed", str(2**64)], "integer in [0, 2**64)"), (["--lr", "inf"], "finite positive"), (["--lr", "nan"], "finite positive"),
    (["--subsample", "nan"], "finite number >= 0"), (["--subsample=-1e-4"], "finite number >= 0"),
    (["--subsample", "often"], "number >= 0"), (["--batch-size", "many"], "positive integer")])
def test_bad_values_exit_2_naming_the_flag(capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        main(["train", *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flags[0].split('=')[0]}" in err and message in err and "Traceback" not in err


def test_unusable_out_dir_fails_before_training(tmp_path, capsys, monkeypatch):
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")
    monkeypatch.setattr(train_mod, "train", lambda *a, **k: pytest.fail("trained before checking --out"))
    for out, message in [(not_a_dir, "is not a directory"), (not_a_dir / "sub", "cannot create the output")]:
        assert main(["train", *TINY, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not_a_dir.read_text() == "x"
    # a directory the process may write by its permissions, where no file can be made (/proc)
    if os.path.isdir("/proc/self"):
        assert main(["train", *TINY, "--out", "/proc/cembed-out"]) == 2
        assert "cannot create the output directory --out /proc/cembed-out" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]   # (the probe's file is gone)
    (tmp_path / "out" / "embeddings.npy").mkdir(parents=True)   # a name the results take, made a directory
    assert main(["train", *TINY, "--out", str(tmp_path / "out")]) == 2
    assert "embeddings.npy: a directory, not a regular file: the run writes its embeddings.npy there" \
        in capsys.readouterr().err
    os.rmdir(tmp_path / "out" / "embeddings.npy")
    os.mkfifo(tmp_path / "out" / "vocab.txt")   # a FIFO (or a device) there: the save renamed a file over it
    assert main(["train", *TINY, "--out", str(tmp_path / "out")]) == 2
    assert "vocab.txt: a FIFO, not a regular file: the run writes its vocab.txt there" in capsys.readouterr().err
    os.unlink(tmp_path / "out" / "vocab.txt")
    (tmp_path / "out" / "pca.png").mkdir()   # the plot's name: refused only when a plot is written
    with_plot = [flag for flag in TINY if flag != "--no-plot"]
    assert main(["train", *with_plot, "--no-save", "--out", str(tmp_path / "out")]) == 2
    assert "pca.png: a directory, not a regular file: the run writes its pca.png there" in capsys.readouterr().err
    monkeypatch.setattr(train_mod, "train", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("trained")))
    with pytest.raises(RuntimeError, match="trained"):   # (--no-plot: the directory is no obstacle)
        main(["train", *TINY, "--out", str(tmp_path / "out")])
    os.rmdir(tmp_path / "out" / "pca.png")
    os.rmdir(tmp_path / "out")
    # nothing to write: --out is not looked at
    monkeypatch.undo()
    assert main(["train", *TINY, "--no-save", "--out", str(not_a_dir)]) == 0


def test_unreadable_corpus_file(tmp_path, capsys, monkeypatch):
    path = tmp_path / "secret.txt"
    path.write_text("a b c\n" * 10)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(corpus_mod, "open", denied, raising=False)  # root reads any file: fake the refusal
    assert main(["train", "--corpus", str(path), "--quiet", "--no-save"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --corpus: cannot read corpus file {path}: Permission denied\n"


def test_directory_as_corpus(tmp_path, capsys):
    assert main(["train", "--corpus", str(tmp_path), "--quiet", "--no-save"]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_tiny_corpus_counts_every_word(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("the cat sat\nthe dog sat\n" * 3, encoding="utf-8")
    corpus = corpus_mod.text_corpus(str(path), min_count=2)
    # subsampling drops nearly everything in so small a corpus: the words are still all consumed
    result = train_mod.train(corpus, train_mod.TrainConfig(dim=8), progress=False)
    assert result.words == corpus.n_tokens == 18 and result.words_per_second > 0


def test_degenerate_synthetic_vocabulary_has_no_nan_quality(capsys):
    assert main(["train", "--vocab-size", "1", "--topics", "1", "--tokens", "40", "--quiet", "--no-save",
                 "--no-plot"]) == 0
    assert "nan" not in capsys.readouterr().out


def test_interrupt_exits_130_without_traceback(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train_mod, "train", interrupted)
    assert main(["train", *TINY, "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
    assert not (tmp_path / "embeddings.npy").exists()


def test_progress_bar_line(monkeypatch):
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True
    stream = Tty()
    bar = train_mod.Progress(1000, "cembed", stream=stream)
    bar.update(500, 2.0, force=True)
    bar.update(1000, 1.0, force=True)
    bar.close()
    text = stream.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n")
    last = text.split("\r")[-1]
    assert "100.0%" in last and "words/s" in last and "loss 1.7000" in last   # 0.7 * 2.0 + 0.3 * 1.0


def test_progress_bar_of_a_resumed_run_counts_this_runs_words(monkeypatch):
    """A run resumed at 40% reports the rate of the words it trains itself, and the time left from that
    rate (it divided all words done, the earlier run's too, by this run's time: 10x the rate)."""
    import io

    clock = [100.0, 110.0]   # the bar starts at t = 100 s; the update comes 10 s later (then the clock stops)
    monkeypatch.setattr(train_mod.time, "perf_counter", lambda: clock.pop(0) if len(clock) > 1 else clock[0])
    stream = io.StringIO()
    bar = train_mod.Progress(1000, "cembed", stream=stream, already_done=400)
    bar.update(500, None, force=True)
    line = stream.getvalue()
    assert "10 words/s" in line and "50.0s left" in line, line   # (500 - 400) / 10 s; 500 words / 10 per s


def test_bench_unknown_kernel_and_numpy_rows(capsys):
    assert main(["bench", "--only", "gather,warp_drive"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "warp_drive" in captured.err and "choose from" in captured.err
    assert main(["bench", "--rows", "3000", "--dim", "8", "--n", "1000", "--repeats", "1", "--json", "--no-torch",
                 "--only", "train_step,bag_mean_fwd_bwd,bag_mean"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [row["kernel"] for row in data["results"]] == ["train_step", "bag_mean_fwd_bwd", "bag_mean"]
    for row in data["results"]:
        assert row["numpy_ms"] > 0 and row["vs_numpy"] > 0 and row["torch_ms"] is None


@pytest.mark.parametrize("backend", ["torch", "both"])
def test_torch_backend_without_torch_is_a_clear_error(capsys, monkeypatch, backend):
    monkeypatch.setitem(sys.modules, "torch", None)   # import torch now raises ImportError
    monkeypatch.setattr(train_mod, "train", lambda *a, **k: pytest.fail("trained without torch"))
    assert main(["train", *TINY, "--no-save", "--backend", backend]) == 2
    err = capsys.readouterr().err
    assert err == "error: --backend torch needs PyTorch (pip install torch)\n"


def test_bench_without_torch_says_so(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    assert main(["bench", "--rows", "2000", "--dim", "8", "--n", "512", "--repeats", "1", "--only", "gather"]) == 0
    out = capsys.readouterr().out
    assert "torch not installed" in out
    row = next(line for line in out.splitlines() if line.startswith("gather"))
    assert row.split()[3] == "-"          # the torch column is empty


def test_numpy_baselines_compute_what_cembed_computes():
    """cembed.apps.baselines (timed by `bench` and benchmarks/) are the same operations as the kernels."""
    import cembed
    from cembed import functional as F
    from cembed.apps import baselines

    rng = np.random.default_rng(0)
    w = rng.standard_normal((50, 8), dtype=np.float32)
    idx = rng.integers(0, 50, 64)
    g = rng.standard_normal((64, 8), dtype=np.float32)
    np.testing.assert_array_equal(baselines.gather(w, idx), F.embedding(idx, w))
    np.testing.assert_allclose(baselines.dense_grad(g, idx, 50), F.embedding_backward(g, idx, 50), rtol=1e-5, atol=1e-6)
    rows, values = baselines.coalesce(idx, g)
    sg = F.embedding_backward(g, idx, 50, sparse=True)
    np.testing.assert_array_equal(rows, sg.indices)
    np.testing.assert_allclose(values, sg.values, rtol=1e-5, atol=1e-6)
    a, b = w.copy(), w.copy()
    baselines.renorm_(a, idx, 1.0)
    F.embedding_renorm_(b, idx, 1.0)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    offsets = np.arange(0, 64, 16)
    for mode in ("sum", "mean", "max"):
        np.testing.assert_allclose(baselines.bag(w, idx, offsets, mode), F.embedding_bag(idx, w, offsets, mode=mode),
                                   rtol=1e-5, atol=1e-6)
    gb = rng.standard_normal((4, 8), dtype=np.float32)
    out, rows, values = baselines.bag_mean_fwd_bwd(w, idx, offsets, gb)
    bag = cembed.EmbeddingBag.from_pretrained(w.copy(), freeze=False, mode="mean", sparse=True)
    np.testing.assert_allclose(out, bag(idx, offsets), rtol=1e-5, atol=1e-6)
    bag.backward(gb)
    np.testing.assert_array_equal(rows, bag.grad.indices)
    np.testing.assert_allclose(values, bag.grad.values, rtol=1e-5, atol=1e-6)

    class Table:
        def __init__(self, weight):
            self.weight, self.grad = weight, sg
    for kind, name, lr in [("sgd", "SGD", 0.1), ("adagrad", "Adagrad", 1e-2), ("sparse_adam", "SparseAdam", 1e-3)]:
        ours, state, table = w.copy(), {}, Table(w.copy())
        opt = getattr(cembed.optim, name)([table], lr=lr)
        for _ in range(3):
            baselines.optimizer_step(kind, ours, state, sg.indices, sg.values, lr=lr)
            opt.step()
        np.testing.assert_allclose(ours, table.weight, rtol=1e-5, atol=1e-6)


def _shim_run(args, tmp_path):
    env = env_importing_this_cembed()
    return subprocess.run([sys.executable, "-m", "cembed", *args], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=120)


def test_python_m_cembed_shim_config_and_help(tmp_path):
    proc = _shim_run(["config"], tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("cembed ") and "OpenMP:" in proc.stdout
    proc = _shim_run(["--help"], tmp_path)
    assert proc.returncode == 0 and "{train,bench,config}" in proc.stdout and proc.stderr == ""
    import cembed.__main__  # importing the shim runs nothing
    from cembed.apps import cli
    assert cembed.__main__.main is cli.main


def _user_threads():
    import cembed

    return cembed.show_config(mode="dicts")["threads_set_by_user"]


@pytest.mark.parametrize("prior", [None, 3])
@pytest.mark.parametrize("threads", [None, 1])
def test_train_and_bench_leave_thread_settings_as_they_were(prior, threads):
    import cembed
    from cembed.apps import bench

    cembed.set_num_threads(prior)
    before = cembed.get_num_threads()
    corpus = corpus_mod.synthetic_corpus(500, 5, 2000, seed=0)
    train_mod.train(corpus, train_mod.TrainConfig(dim=8, batch_size=512, threads=threads), progress=False)
    assert cembed.get_num_threads() == before and _user_threads() == (prior is not None)
    bench.run(rows=500, dim=4, n=256, bag_size=4, threads=threads, repeats=1, only="gather", use_torch=False,
              use_numpy=False)
    assert cembed.get_num_threads() == before and _user_threads() == (prior is not None)


def test_torch_backend_restores_torch_threads():
    torch = require_torch()
    from cembed.apps import bench

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        corpus = corpus_mod.synthetic_corpus(500, 5, 2000, seed=0)
        train_mod.train(corpus, train_mod.TrainConfig(dim=8, batch_size=512, threads=2, backend="torch"),
                        progress=False)
        assert torch.get_num_threads() == 1
        bench.run(rows=500, dim=4, n=256, bag_size=4, threads=2, repeats=1, only="gather", use_numpy=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("text,expected", [
    ("cembed", ["cembed"]), ("both", ["cembed", "torch"]), ("all", ["cembed", "torch", "gensim"]),
    ("cembed,gensim", ["cembed", "gensim"]), ("gensim, cembed,gensim", ["gensim", "cembed"]),
    ("both,gensim", ["cembed", "torch", "gensim"])])
def test_backend_lists(text, expected):
    from cembed.apps.cli import build_parser

    assert build_parser().parse_args(["train", "--backend", text]).backend == expected


def test_unknown_backend_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--backend", "cembed,tensorflow"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --backend" in err and "'tensorflow'" in err and "comma list" in err


@pytest.mark.parametrize("backend", ["gensim", "cembed,gensim", "all"])
def test_gensim_backend_without_gensim_is_a_clear_error(capsys, monkeypatch, backend):
    monkeypatch.setitem(sys.modules, "gensim", None)          # import gensim now raises ImportError
    monkeypatch.setitem(sys.modules, "gensim.models", None)
    monkeypatch.setattr(train_mod, "train", lambda *a, **k: pytest.fail("trained without gensim"))
    if backend == "all":
        require_torch()
    assert main(["train", *TINY, "--no-save", "--backend", backend]) == 2
    err = capsys.readouterr().err
    assert err == "error: --backend gensim needs gensim (pip install gensim, or pip install \".[bench]\")\n"


@pytest.mark.quality
def test_gensim_backend_learns_the_topics():
    require_gensim()
    import cembed

    corpus = corpus_mod.synthetic_corpus(5000, 10, 100_000, seed=2)
    before = cembed.get_num_threads()
    result = train_mod.train(corpus, train_mod.TrainConfig(seed=2, backend="gensim", dim=32, threads=1, epochs=5),
                             progress=False)
    assert cembed.get_num_threads() == before
    assert result.backend == "gensim" and result.table.shape == (corpus.vocab_size, 32)
    assert abs(result.quality_before["frequent"] - result.chance["frequent"]) < 0.05
    assert result.quality_after["frequent"] > 3 * result.chance["frequent"]
    assert result.words == 5 * corpus.n_tokens and result.words_per_second > 0 and result.prep_seconds > 0
    unused = corpus.counts == 0   # not in gensim's vocabulary: zero rows
    assert not result.table[unused].any() and result.table[~unused].any(axis=1).all()


def test_gensim_backend_from_the_command_line(tmp_path, capsys):
    require_gensim()
    path = tmp_path / "text.txt"
    rng = np.random.default_rng(0)
    path.write_text("\n".join(" ".join(rng.choice(["cat", "dog", "cow", "saw", "nail", "drill"], 8))
                              for _ in range(200)) + "\n", encoding="utf-8")
    assert main(["train", "--corpus", str(path), "--min-count", "2", "--dim", "8", "--subsample", "0",
                 "--quiet", "--no-save", "--backend", "cembed,gensim"]) == 0
    out = capsys.readouterr().out
    assert "gensim  Word2Vec(sg=1, hs=0, vector_size=8, window=5, negative=5, sample=0" in out
    assert "loss n/a" in out and "cembed / gensim throughput" in out and "nearest to" in out


def test_line_sentence_file(tmp_path):
    corpus = corpus_mod.Corpus(tokens=np.array([3, 1, 2, 0, 0], np.int32), sentence_starts=np.array([0, 3, 5]),
                               words=["a", "b", "c", "d"], counts=np.array([2, 1, 1, 1]))
    path = tmp_path / "s.txt"
    train_mod.write_line_sentences(corpus, path, sentences_per_write=1)
    assert path.read_text() == "3 1 2\n0 0\n"


@pytest.mark.parametrize("flags,message", [
    (["--window", "128"], "--window must be at most 127"),
    (["--state-dtype", "bfloat16"], "16-bit tables"),
    (["--rounding", "nearest"], "--rounding applies to 16-bit tables"),
    (["--threads", "1000000"], "--threads"),
    (["--dim", "1000000000"], "needs at least"),
    (["--negatives", "1000000000000"], "needs at least"),
    (["--tokens", "1000000000000"], "needs at least"),
    (["--vocab-size", "1000000000000", "--topics", "1"], "needs at least"),
    (["--shards", "2", "--backend", "torch", "--ray-address", "127.0.0.1:1"], "cembed backend"),
    (["--shards", "100", "--ray-address", "127.0.0.1:1", "--vocab-size", "50", "--topics", "5", "--tokens", "500"],
     "cannot exceed the vocabulary"),
    (["--backend", "cembed,gensim", "--seed", str(2 ** 32)], "gensim takes seeds below 2**32"),
    (["--ray-address", "127.0.0.1:1"], "--ray-address applies to --shards"),
])
@pytest.mark.parametrize("peers", ["installed or not", "absent"])
def test_arguments_that_cannot_run_are_an_error_line(capsys, monkeypatch, flags, message, peers):
    """Values argparse accepts one by one but that cannot run (a window beyond the batch builder's, a
    thread count cembed refuses, a size no RAM holds, more shards than rows) are an ``error:`` line and
    exit code 2 before any data is made or Ray is contacted — not a traceback from deep inside. The same
    line whether torch and gensim are installed or not (on a machine without them it said they were
    missing: the README's test command failed there)."""
    if peers == "absent":
        hide_optional_peers(monkeypatch)
    assert main(["train", *flags, "--quiet", "--no-save", "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err


def test_a_table_dir_run_removes_the_temporaries_of_a_killed_one(tmp_path):
    """A run killed (SIGKILL) while it made its tables left each table's hidden temporary, full size,
    for good (three kills left three 256 MB files; found by a reviewer). The next run removes them once
    it holds the directory's lock; nothing else in the directory is touched."""
    tables = tmp_path / "td" / "tables"
    tables.mkdir(parents=True)
    strays = [".in.npy.k2j4x9_q.tmp", ".out.npy.a1b2c3d4.tmp"]
    kept = ["notes.txt", ".in.npy.keep", "in.npy.tmp", ".other.npy.a1b2c3d4.tmp"]
    for name in strays + kept:
        (tables / name).write_bytes(b"x" * 100)
    assert main(["train", "--vocab-size", "300", "--topics", "5", "--tokens", "3000", "--quiet", "--no-save",
                 "--no-plot", "--table-dir", str(tmp_path / "td")]) == 0
    assert sorted(os.listdir(tables)) == sorted(kept + ["in.npy", "out.npy"])


def test_table_dir_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("x")
    assert main(["train", *TINY, "--no-save", "--table-dir", str(path)]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_bench_refuses_a_thread_count_naming_the_flag(capsys):
    """As train does: an error line naming --threads, before the table's header is printed."""
    assert main(["bench", "--threads", "1000000", "--rows", "1000", "--n", "100", "--repeats", "1"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: --threads") and out == ""


def test_a_refused_run_leaves_no_new_out_dir(tmp_path, capsys):
    """--out was made before later refusals (more shards than words): a refused run left it behind."""
    out = tmp_path / "new" / "out"
    assert main(["train", "--shards", "100", "--ray-address", "127.0.0.1:1", "--vocab-size", "50", "--topics", "5",
                 "--tokens", "500", "--quiet", "--out", str(out)]) == 2
    assert "cannot exceed the vocabulary" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "new")
    # refused inside training (nothing to resume): the same
    assert main(["train", "--vocab-size", "200", "--topics", "5", "--tokens", "2000", "--quiet", "--table-dir",
                 str(tmp_path / "td"), "--resume", "--out", str(out)]) == 1
    assert "nothing to resume" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "new")
    # a run that writes its results makes the directory then
    assert main(["train", "--vocab-size", "200", "--topics", "5", "--tokens", "2000", "--quiet", "--no-plot",
                 "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["embeddings.npy", "vocab.txt"]


@pytest.mark.parametrize("args,code", [
    (["config"], 1),
    (["bench", "--rows", "1000", "--n", "100", "--repeats", "1", "--no-torch", "--no-numpy"], 1),
    (["train", "--help"], 0),
])
@pytest.mark.parametrize("unbuffered", [False, True])
def test_output_into_a_closed_pipe_ends_quietly(tmp_path, args, code, unbuffered):
    """``python -m cembed bench | head -1``: no BrokenPipeError traceback, whether the output is
    written as it is printed (PYTHONUNBUFFERED) or, buffered, when the command ends."""
    env = env_importing_this_cembed()
    env.pop("PYTHONUNBUFFERED", None)
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "cembed", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=tmp_path, env=env)
    proc.stdout.close()   # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == code and err == "", err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("args", [["config"], ["bench", "--rows", "1000", "--n", "100", "--repeats", "1"],
                                  ["--help"], ["--version"], ["train", "--help"]])
def test_output_that_cannot_be_written_is_an_error_line(tmp_path, args):
    """``python -m cembed config > /dev/full`` (no room for the output): exit code 1 and an error line
    naming why, not a traceback (nor a second one from the flush at exit)."""
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([sys.executable, "-m", "cembed", *args], stdout=full, stderr=subprocess.PIPE,
                              cwd=tmp_path, env=env_importing_this_cembed(), timeout=300)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and err == "error: cannot write: No space left on device\n", err


def test_bench_refuses_a_size_no_ram_holds(capsys):
    assert main(["bench", "--rows", "1000000000000", "--dim", "128"]) == 2
    assert capsys.readouterr().err.startswith("error:")


@pytest.mark.parametrize("read_chars,longest_piece", [(corpus_mod.READ_CHARS, corpus_mod.LONGEST_PIECE), (7, 40),
                                                      (1000, 13), (1, 8)])
def test_corpus_file_streams_and_keeps_the_old_numbering(tmp_path, monkeypatch, read_chars, longest_piece):
    """text_corpus reads the file in one streamed pass: the same ids (most frequent first, ties by first
    appearance), sentences (split as str.splitlines splits, U+2028 included; fewer than two kept words
    dropped), counts and description as reading the whole file into word lists did — checked against
    that reading, written out here. Read in blocks of any size, and lines longer than the longest
    piece read in pieces (cut at white space), the same."""
    import collections
    import random

    monkeypatch.setattr(corpus_mod, "READ_CHARS", read_chars)
    monkeypatch.setattr(corpus_mod, "LONGEST_PIECE", longest_piece)
    rng = random.Random(0)
    words = [f"w{i}" for i in range(60)] + ["Ünï", "don't", "rock’n", "X", "ΟΔΟΣ", "हिन्दी"]
    seps = ["\n", "\r\n", "\r", "\u2028", "\x0c", "\n\n", " . "]
    path = tmp_path / "c.txt"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        for _ in range(3000 if read_chars > 1 else 300):
            length = rng.choice([rng.randint(0, 9), rng.randint(0, 9), 200])   # some lines of ~1,000 characters
            fh.write(rng.choice([" ", "\t", "\xa0"]).join(rng.choice(words) for _ in range(length)) + rng.choice(seps))
    text = path.read_text(encoding="utf-8")
    sentences = [s for s in (corpus_mod.token_pattern().findall(line.lower()) for line in text.splitlines()) if s]
    for min_count, max_vocab in ((1, None), (215, None), (2, 10)):
        freq = collections.Counter(w for s in sentences for w in s)
        kept = [(w, c) for w, c in freq.most_common(max_vocab) if c >= min_count]
        word_id = {w: i for i, (w, _) in enumerate(kept)}
        ids, starts = [], [0]
        for s in sentences:
            sid = [word_id[w] for w in s if w in word_id]
            if len(sid) >= 2:
                ids += sid
                starts.append(len(ids))
        corpus = corpus_mod.text_corpus(str(path), min_count=min_count, max_vocab=max_vocab)
        assert list(corpus.words) == [w for w, _ in kept]
        np.testing.assert_array_equal(corpus.tokens, ids)
        np.testing.assert_array_equal(corpus.sentence_starts, starts)
        np.testing.assert_array_equal(corpus.counts, np.bincount(ids, minlength=len(kept)))
        assert corpus.tokens.dtype == np.int32 and corpus.sentence_starts.dtype == np.int64


@pytest.mark.parametrize("block_rows", [1, 7, 1000])
def test_nearest_words_reads_the_table_in_blocks(block_rows):
    """The --corpus run's listing of nearest words made two float32 copies of the whole table (one on disk
    too): it reads a block of rows at a time now, with the same answer as the whole-table computation."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((1000, 16)).astype(np.float32)
    table[3] = 0.0   # (a zero row: norm clamped)
    corpus = types.SimpleNamespace(words=[f"w{i}" for i in range(1000)])
    queries = [0, 3, 5, 500, 999]
    emb = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)
    expected = {}
    for q in queries:
        sims = emb @ emb[q]
        sims[q] = -np.inf
        expected[f"w{q}"] = [f"w{i}" for i in np.argsort(-sims, kind="stable")[:5]]
    got = train_mod.nearest_words(table, corpus, queries, k=5, block_bytes=block_rows * 16 * 4)
    assert got == expected
    tiny = train_mod.nearest_words(table[:2], corpus, [1], k=1, block_bytes=64)
    assert tiny == {"w1": ["w0"]}
    assert train_mod.nearest_words(table, corpus, [0, 1], k=0) == {"w0": [], "w1": []}
    with_nan = table.copy()
    with_nan[[5, 7]] = np.nan   # (rows of a diverged table: listed last, never instead of a finite one)
    got = train_mod.nearest_words(with_nan, corpus, [0], k=3, block_bytes=block_rows * 16 * 4)
    sims = emb[np.r_[1:5, 6, 8:1000]] @ emb[0]
    assert got == {"w0": [f"w{i}" for i in np.r_[1:5, 6, 8:1000][np.argsort(-sims, kind="stable")[:3]]]}


@pytest.mark.parametrize("read_chars,longest_piece", [(7, 16), (1, 16), (1000, 40)])
def test_long_lines_without_white_space_are_cut_where_no_word_goes_on(tmp_path, monkeypatch, read_chars,
                                                                       longest_piece):
    """A line longer than the longest piece without white space (Chinese text, a CSV row) was cut at any
    character, splitting words ("你好" read as "你" and "好"; found by a reviewer): it is cut after
    punctuation or a symbol now, never after a character a word can hold or that lowercasing looks
    across (a final sigma stays as the whole line gives it), so the words equal the whole line's."""
    import random

    monkeypatch.setattr(corpus_mod, "READ_CHARS", read_chars)
    monkeypatch.setattr(corpus_mod, "LONGEST_PIECE", longest_piece)
    rng = random.Random(1)
    words = ["你好", "世界", "中文字", "ΟΔΟΣ", "ΣΑΣ", "हिन्दी", "don't", "Ünï", "x1", "日本"]
    joins = [".", "·", ":", "’", ""]            # (no cut after these: a word may go on, or lowercasing looks across)
    seps = ["，", "。", ";", "/", "|", "、"]     # (a cut may follow these; runs between them stay under 16)
    lines = ["".join(rng.choice(words) + rng.choice(joins) + rng.choice(words) + rng.choice(seps)
                     for _ in range(rng.randint(1, 30))) for _ in range(80)]
    path = tmp_path / "c.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    sentences = [corpus_mod.token_pattern().findall(line.lower()) for line in lines]
    expected = [w for words_of_line in sentences if len(words_of_line) >= 2 for w in words_of_line]
    corpus = corpus_mod.text_corpus(str(path), min_count=1)
    assert [corpus.words[i] for i in corpus.tokens] == expected
    assert corpus.sentence_starts.size - 1 == sum(len(w) >= 2 for w in sentences)


def test_a_corpus_of_one_long_line_is_read_in_pieces(tmp_path, monkeypatch):
    """A corpus that is one line (text8 is 100 MB without a line break) was held whole, as a string, its
    lowercase copy and a list of every word: memory grew with the line. It is tokenised in pieces of
    bounded length now, and is still one sentence, its words uncut."""
    monkeypatch.setattr(corpus_mod, "READ_CHARS", 1000)
    monkeypatch.setattr(corpus_mod, "LONGEST_PIECE", 3000)
    pattern = corpus_mod.token_pattern()
    longest = []

    class Recording:
        def findall(self, text):
            longest.append(len(text))
            return pattern.findall(text)

    monkeypatch.setattr(corpus_mod, "token_pattern", lambda: Recording())
    rng = np.random.default_rng(0)
    words = [f"Wörd{i}" for i in rng.integers(0, 300, 50_000)]
    path = tmp_path / "one_line.txt"
    path.write_text(" ".join(words), encoding="utf-8")
    corpus = corpus_mod.text_corpus(str(path), min_count=1)
    assert max(longest) <= 3000 + 1000 and len(longest) > 100
    np.testing.assert_array_equal(corpus.sentence_starts, [0, len(words)])
    assert [corpus.words[i] for i in corpus.tokens] == [w.lower() for w in words]


@pytest.mark.parametrize("flag", ["--table-dir", "--corpus", "--out", "--ray-address"])
def test_empty_paths_are_refused(capsys, flag):
    """An empty --table-dir used the current directory, an empty --corpus trained the synthetic one."""
    with pytest.raises(SystemExit) as exc:
        main(["train", flag, "", "--quiet", "--no-save", "--no-plot"])
    assert exc.value.code == 2 and "must not be empty" in capsys.readouterr().err


def test_backups_a_killed_replace_files_left_are_removed_by_the_next(tmp_path):
    """A process killed between replace_files' renames left its backup links
    (.<name>.<random>.cembed.replaced: each a whole old copy's disk space) for good; the next
    replace_files of those files removes them — an old copy, or a link to the file itself — and nothing
    else; not one a live process holds (locked)."""
    corpus = corpus_mod.synthetic_corpus(50, 5, 500, seed=0)
    table = np.ones((corpus.vocab_size, 3), np.float32)
    train_mod.save_embeddings(tmp_path, table, corpus)
    emb, vocab = tmp_path / "embeddings.npy", tmp_path / "vocab.txt"
    (tmp_path / ".embeddings.npy.0123456789ab.cembed.replaced").write_bytes(b"an old copy")
    os.link(vocab, tmp_path / ".vocab.txt.00000000000a.cembed.replaced")     # killed before its own rename
    kept = [".embeddings.npy.0123456789ab.replaced", ".embeddings.npy.xyz.cembed.replaced",
            ".other.npy.0123456789ab.cembed.replaced", ".embeddings.npy.0123456789ab.cembed.replaced.txt"]
    for name in kept:
        (tmp_path / name).write_text("not one of its backups")
    live = tmp_path / ".vocab.txt.00000000000b.cembed.replaced"   # a live writer's: locked (flock)
    live.write_text("held")
    with open(live) as held:
        import fcntl
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        train_mod.save_embeddings(tmp_path, table * 2, corpus)
    assert sorted(os.listdir(tmp_path)) == sorted(kept + [live.name, "embeddings.npy", "vocab.txt"])
    assert_bitwise_equal(np.load(emb), table * 2)
    assert vocab.read_text().split() == list(corpus.words[:corpus.vocab_size])


def test_saving_embeddings_is_all_or_nothing(tmp_path, monkeypatch):
    """A save that fails part-way (a full disk, a file-size limit, Ctrl-C) truncated embeddings.npy and
    left the old vocab.txt beside it; now the previous files stay as they were and no temporary
    remains."""
    corpus = corpus_mod.synthetic_corpus(50, 5, 500, seed=0)
    first = np.arange(50 * 4, dtype=np.float32).reshape(50, 4)
    train_mod.save_embeddings(tmp_path, first, corpus)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_write = train_mod._write_float32_npy

    def partial(fh, array):
        fh.write(b"\x93NUMPY partial")
        raise OSError(27, "File too large")

    monkeypatch.setattr(train_mod, "_write_float32_npy", partial)
    with pytest.raises(OSError, match="File too large"):
        train_mod.save_embeddings(tmp_path, first + 1, corpus)
    monkeypatch.setattr(train_mod, "_write_float32_npy", real_write)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

    def refused(pairs, commit=None):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(train_mod.storage, "replace_files", refused)   # both written, the renames refused
    with pytest.raises(OSError, match="Permission denied"):
        train_mod.save_embeddings(tmp_path, first + 1, corpus)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert not [name for name in storage._held_temporaries if name.startswith(str(tmp_path))]   # locks released
    train_mod.save_embeddings(tmp_path, first + 1, corpus)
    assert np.array_equal(np.load(tmp_path / "embeddings.npy"), first + 1)
    assert oct(os.stat(tmp_path / "embeddings.npy").st_mode & 0o777) == oct(os.stat(tmp_path / "vocab.txt").st_mode
                                                                            & 0o777) != oct(0o600)


def test_a_diverged_run_is_an_error_and_a_dim_1_run_skips_the_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    small = ["--vocab-size", "2000", "--topics", "5", "--quiet", "--dim"]
    assert main(["train", *small, "1", "--tokens", "50000", "--out", str(tmp_path / "one")]) == 0
    assert "plot    skipped (nothing to project in 2-D)" in capsys.readouterr().out
    assert main(["train", *small, "16", "--tokens", "200000", "--optimizer", "sgd", "--lr", "5", "--out",
                 str(tmp_path / "nan")]) == 1
    err = capsys.readouterr().err
    assert "training diverged" in err and "nothing was saved" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "nan" / "embeddings.npy")
    # with --table-dir the checkpoint holds the diverged tables: the message says so (it said "nothing was saved")
    assert main(["train", *small, "16", "--tokens", "200000", "--optimizer", "sgd", "--lr", "5", "--out",
                 str(tmp_path / "nan2"), "--table-dir", str(tmp_path / "td")]) == 1
    err = capsys.readouterr().err
    assert "training diverged" in err and "nothing was saved" not in err and "checkpoint in" in err


def test_a_table_dir_whose_checkpoint_cannot_be_replaced_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "td" / "checkpoint").mkdir(parents=True)
    (tmp_path / "td" / "checkpoint" / "notes.txt").write_text("mine")
    assert main(["train", *TINY, "--no-save", "--table-dir", str(tmp_path / "td")]) == 1
    assert "is not a cembed checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "td").rglob("*")) == ["checkpoint", "notes.txt"]   # nothing made
    # a table file that is a directory: refused before anything is made (was a raw [Errno 21] after)
    (tmp_path / "td2" / "tables" / "in.npy").mkdir(parents=True)
    assert main(["train", *TINY, "--no-save", "--table-dir", str(tmp_path / "td2")]) == 2
    assert "is a directory, not a table file" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "td2").rglob("*")) == ["in.npy", "tables"]


def test_flags_of_the_other_kind_of_corpus_are_refused(tmp_path, capsys):
    """--vocab-size (or --topics, --tokens) with --corpus, and --min-count without it, were ignored
    silently: a user asking for a smaller vocabulary of their text got the whole of it."""
    path = tmp_path / "corpus.txt"
    path.write_text("a b c d\n" * 50, encoding="utf-8")
    assert main(["train", "--corpus", str(path), "--vocab-size", "10", "--tokens", "5", "--quiet", "--no-save"]) == 2
    assert "error: --vocab-size, --tokens apply to the synthetic corpus" in capsys.readouterr().err
    assert main(["train", *TINY, "--min-count", "3", "--no-save"]) == 2
    assert "error: --min-count applies to --corpus FILE" in capsys.readouterr().err


def test_version(capsys):
    import cembed

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"cembed {cembed.__version__}\n"


def test_sigterm_stops_as_cleanly_as_ctrl_c(tmp_path):
    """SIGTERM (a job scheduler's stop) runs the same clean-up as Ctrl-C — the batch thread stopped, no
    temporary file left, no traceback — and exits 128 + 15 (it once killed the process where it stood,
    leaving a save's hidden temporary files behind for good)."""
    import signal
    import time

    env = env_importing_this_cembed()
    proc = subprocess.Popen([sys.executable, "-m", "cembed", "train", "--vocab-size", "20000", "--topics", "20",
                             "--tokens", "20000000", "--threads", "1", "--quiet", "--no-plot", "--out", "out"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=env)
    try:
        time.sleep(6)   # corpus made, training under way (the whole run takes minutes)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    assert err.decode().strip() == "terminated" and b"Traceback" not in err
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]   # no temporary file of a save


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM", "SIGINT"])
def test_stopping_a_table_dir_run_does_not_abort(tmp_path, signum):
    """Ctrl-C or SIGTERM during a --table-dir run ended half of the runs in SIGABRT ("terminate called
    without an active exception", exit 134): the prefetch thread, a daemon, was still sorting rows
    inside NumPy's C++ code when the interpreter finalized, and the forced unwind that ends such a
    thread aborts in C++ frames (found by a reviewer). The thread is stopped at exit now. (Each run is a
    chance: before the fix two of three runs would likely fail.)"""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "cembed", "train", "--vocab-size", "200000", "--topics", "20",
                             "--tokens", "20000000", "--quiet", "--no-save", "--no-plot", "--table-dir", "td"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=env_importing_this_cembed())
    try:
        assert proc.stdout.readline().startswith(b"corpus")
        time.sleep(4)   # training under way, a prefetch in hand at nearly every moment
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(getattr(signal, signum))
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    expected = 130 if signum == "SIGINT" else 128 + signal.SIGTERM
    assert proc.returncode == expected and b"terminate called" not in err, (proc.returncode, err.decode())


def test_the_prefetch_thread_stops_and_starts_again(tmp_path):
    from cembed import functional as F

    table = cembed.open_table(tmp_path / "t.npy", 1000, 8)
    F.prefetch(table, np.arange(0, 1000, 7), wait=False)
    thread = F._PREFETCHER._thread
    assert thread is not None and thread.is_alive()
    F._PREFETCHER.stop()
    assert not thread.is_alive() and F._PREFETCHER._thread is None
    F._PREFETCHER.stop()   # (twice: nothing)
    F.prefetch(table, np.arange(5), wait=False)
    assert F._PREFETCHER._thread is not None and F._PREFETCHER._thread.is_alive()


def test_a_corpus_byte_that_is_not_utf8_is_named_by_its_file_offset(tmp_path):
    """The offset in the message is the file's (it was the decoder's position inside its last chunk)."""
    path = tmp_path / "bad.txt"
    path.write_bytes(b"abc def\n" * 12500 + b"x\xff y\n" + b"more words\n" * 10)
    with pytest.raises(corpus_mod.CorpusError, match="invalid start byte at byte 100001"):
        corpus_mod.text_corpus(str(path))
    path.write_bytes(b"abc def\n" * 12500 + b"\xe2\x82")   # cut inside a character at the end
    with pytest.raises(corpus_mod.CorpusError, match="unexpected end of data at byte 100000"):
        corpus_mod.text_corpus(str(path))


def test_corpus_words_keep_their_combining_marks(tmp_path):
    """Words of scripts written with combining marks (Devanagari, Tamil, decomposed accents) stay whole:
    Python's \\w leaves the marks out, and "हिन्दी" was read as the words "ह", "न", "द"."""
    pattern = corpus_mod.token_pattern()
    assert pattern.findall("हिन्दी भाषा") == ["हिन्दी", "भाषा"]
    assert pattern.findall("தமிழ் மொழி") == ["தமிழ்", "மொழி"]
    assert pattern.findall("cafe\u0301 don't rock’n_roll 42") == ["cafe\u0301", "don't", "rock’n_roll", "42"]
    path = tmp_path / "hi.txt"
    path.write_text("हिन्दी भाषा किताब\n" * 6, encoding="utf-8")
    corpus = corpus_mod.text_corpus(str(path), min_count=1)
    assert sorted(corpus.words) == sorted(["हिन्दी", "भाषा", "किताब"])


def test_embeddings_are_saved_a_block_of_rows_at_a_time(tmp_path, monkeypatch):
    """embeddings.npy is written from blocks of rows, never from a copy of the whole table (a table on disk
    larger than RAM trained, then ran out of memory in its final save): the same bytes np.save writes."""
    import io

    rng = np.random.default_rng(0)
    table = rng.standard_normal((5000, 9)).astype(np.float32)
    rank = rng.permutation(5000).astype(np.int32)
    by_word = train_mod.WordRows(table.astype(np.float16), rank)
    expected = io.BytesIO()
    np.save(expected, np.ascontiguousarray(by_word, dtype=np.float32))

    def whole(*args, **kwargs):
        raise AssertionError("the whole table was built")

    monkeypatch.setattr(train_mod.WordRows, "__array__", whole)
    for source, want in ((by_word, expected.getvalue()), (table, None)):
        got = io.BytesIO()
        train_mod._write_float32_npy(got, source, block_bytes=1000)
        if want is None:
            want = io.BytesIO()
            np.save(want, table)
            want = want.getvalue()
        assert got.getvalue() == want


# ---------------------------------------------------------------- review of 2026-11-27 (session 20)

def test_flag_combinations_that_cannot_run_are_refused_before_any_data_is_made(capsys, monkeypatch):
    """--resume without --table-dir, --table-dir with gensim: refused only after the corpus was built (a
    large --corpus file: minutes). Now before any corpus is made."""
    def no_corpus(*args, **kwargs):
        raise AssertionError("a corpus was made for a run that cannot start")

    monkeypatch.setattr(corpus_mod, "synthetic_corpus", no_corpus)
    monkeypatch.setattr(corpus_mod, "text_corpus", no_corpus)
    for flags, message in ((["--resume"], "need --table-dir"),
                           (["--table-dir", "x", "--backend", "gensim"], "use it with --backend cembed")):
        assert main(["train", *TINY, "--no-save", *flags]) == 2
        assert message in capsys.readouterr().err


def test_an_unusable_table_dir_is_an_error_line_naming_the_flag(tmp_path, capsys):
    """--table-dir under a file: 'error: [Errno 20] Not a directory' with exit 1, after the corpus and
    the model were set up; now exit 2 naming the flag, as --out."""
    (tmp_path / "afile").write_text("x")
    assert main(["train", *TINY, "--no-save", "--table-dir", str(tmp_path / "afile" / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot create the table directory --table-dir ") and "is not a directory" in err


def test_the_memory_check_sizes_a_batch_by_the_pairs_a_chunk_can_give(capsys):
    """--batch-size 100000000 on a small corpus was 'needs at least 219 GiB' (a batch never holds more
    pairs than a chunk of the corpus gives), with the --table-dir hint though the tables take ~0 bytes."""
    assert main(["train", "--vocab-size", "2000", "--topics", "10", "--tokens", "20000", "--dim", "16",
                 "--batch-size", "100000000", "--quiet", "--no-save", "--no-plot"]) == 0


def test_resuming_a_finished_run_says_nothing_was_left_to_train(tmp_path, capsys):
    flags = ["train", "--vocab-size", "2000", "--topics", "10", "--tokens", "50000", "--dim", "16", "--no-save",
             "--no-plot", "--quiet", "--table-dir", str(tmp_path / "td")]
    assert main(flags) == 0
    capsys.readouterr()
    assert main(flags + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "loss - (nothing left to train)" in out and "the checkpoint holds the finished run" in out


def test_invalid_utf8_read_from_a_pipe_is_reported_without_a_position(tmp_path):
    """--corpus /dev/stdin with invalid UTF-8 said 'at byte -1' (the pipe cannot be read again to find
    it); a regular file still names the byte."""
    bad = b"hello world\n\xff\xfe bad\n"
    proc = subprocess.run([sys.executable, "-m", "cembed", "train", "--corpus", "/dev/stdin", "--quiet", "--no-save",
                           "--no-plot"], input=bad, capture_output=True, env=env_importing_this_cembed(), timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.decode().strip().endswith("not valid UTF-8: /dev/stdin (invalid start byte)")
    (tmp_path / "bad.txt").write_bytes(bad)
    with pytest.raises(corpus_mod.CorpusError, match=r"invalid start byte at byte 12\)"):
        corpus_mod.text_corpus(str(tmp_path / "bad.txt"))


def test_bench_refuses_an_empty_kernel_list(capsys):
    """--only "" ran every kernel on the default 1M-row table (--only , was refused)."""
    assert main(["bench", "--only", "", "--rows", "1000", "--n", "100", "--repeats", "1"]) == 2
    assert "unknown kernel" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["fifo", "link to a fifo"])
def test_a_table_dir_whose_table_file_is_not_a_regular_file_is_an_error_line(tmp_path, capsys, kind):
    """A --table-dir table file that is a FIFO (or a link to one, or to a device: the /dev/null a review
    replaced) made open_table raise ValueError, which the trainer let through as a traceback after the
    corpus was built. Exit 2 naming the flag, before any corpus is made; the FIFO stays."""
    tables = tmp_path / "td" / "tables"
    tables.mkdir(parents=True)
    target = tmp_path / "pipe" if kind == "link to a fifo" else tables / "in.npy"
    os.mkfifo(target)
    if kind == "link to a fifo":
        os.symlink(target, tables / "in.npy")
    assert main(["train", *TINY, "--no-save", "--table-dir", str(tmp_path / "td")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --table-dir: ") and "in.npy" in err and "not a regular file" in err
    assert stat_is_fifo(target)


def stat_is_fifo(path):
    import stat

    return stat.S_ISFIFO(os.stat(path).st_mode)
