"""16-bit tables and optimizer state on disk: open_table, state_dir, checkpoints and the trainer's
--table-dir with float16 / bfloat16 (one storage policy: float16 native '<f2', bfloat16 as '<u2' bits
with its dtype recorded by the caller)."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import cembed
from cembed import functional, optim, storage
from cembed.checkpoint import CheckpointError

from util import assert_bitwise_equal, backward_and_step

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
HALF = [BF16, F16]
ROOT = pathlib.Path(cembed.__file__).resolve().parent.parent   # the cembed being tested (installed or in place)
N, D = 400, 8


def _ids(dtype):
    return dtype.name


def _bits(a):
    return np.ascontiguousarray(np.asarray(a)).view(np.uint16).copy()


def _batches(seed, n):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        idx = rng.integers(0, N, 64)
        idx[:8] = idx[0]   # repeated rows
        out.append((idx, rng.standard_normal((64, D), dtype=np.float32)))
    return out


def _train(emb, opt, batches, fused):
    for idx, grad in batches:
        backward_and_step(emb, grad, opt, fused, indices=idx)


def _adam(emb, dtype, state_dir=None):
    return optim.SparseAdam(emb.parameters(), lr=0.01, rounding="stochastic", seed=7, state_dtype=dtype.name,
                            state_dir=state_dir)


# ------------------------------------------------------------------------------------------ open_table

@pytest.mark.parametrize("dtype", HALF, ids=_ids)
@pytest.mark.parametrize("init", ["normal", "uniform"])
def test_open_table_init_is_the_float32_init_rounded(tmp_path, dtype, init):
    path = tmp_path / "t.npy"
    table = cembed.open_table(path, N, D, dtype=dtype.name if dtype == BF16 else dtype, init=init, seed=3,
                              chunk_bytes=100)   # many blocks
    ref = cembed.open_table(tmp_path / "ref.npy", N, D, np.float32, init=init, seed=3)
    assert isinstance(table, np.memmap) and table.dtype == dtype and table.shape == (N, D)
    assert_bitwise_equal(table, np.asarray(ref).astype(dtype))
    assert functional._is_mapped(table) and storage.backing_file(table) == str(path)
    # the file: float16 native, bfloat16 as its uint16 bits; the documented way back
    raw = np.load(path, mmap_mode="r")
    assert raw.dtype == storage.file_dtype(dtype)
    assert_bitwise_equal(raw.view(dtype), table)
    again = cembed.open_table(path, dtype=ml_dtypes.bfloat16 if dtype == BF16 else "float16", mode="r")
    assert again.dtype == dtype and not again.flags.writeable
    assert_bitwise_equal(again, table)


def test_open_table_16_bit_refusals_name_both_dtypes(tmp_path):
    bf = tmp_path / "bf.npy"
    cembed.open_table(bf, 10, 4, dtype="bfloat16", init="normal", seed=0)
    before = bf.read_bytes()
    with pytest.raises(TypeError, match="uint16.*dtype='bfloat16'"):   # never guessed to be bfloat16
        cembed.open_table(bf)
    with pytest.raises(TypeError, match="uint16.*dtype=float32"):
        cembed.open_table(bf, dtype=np.float32)
    with pytest.raises(TypeError, match="uint16.*dtype=float16"):
        cembed.open_table(bf, dtype=np.float16)
    f16 = tmp_path / "f16.npy"
    cembed.open_table(f16, 10, 4, dtype=np.float16)
    with pytest.raises(TypeError, match="float16.*dtype=bfloat16"):
        cembed.open_table(f16, dtype="bfloat16")
    f32 = tmp_path / "f32.npy"
    cembed.open_table(f32, 10, 4)
    with pytest.raises(TypeError, match="float32.*dtype=bfloat16"):
        cembed.open_table(f32, dtype="bfloat16")
    with pytest.raises(TypeError):
        cembed.open_table(tmp_path / "int.npy", 10, 4, dtype=np.int16)
    assert bf.read_bytes() == before and not (tmp_path / "int.npy").exists()


def test_map_array_and_helpers():
    bits = np.array([0x3F80, 0xC000], np.uint16)
    assert storage.from_file(bits, "bfloat16").tolist() == [1.0, -2.0]
    assert storage.to_file(storage.from_file(bits, BF16)) is not None
    assert storage.to_file(np.zeros(2, BF16)).dtype == np.uint16
    with pytest.raises(TypeError, match="float32.*bfloat16"):
        storage.from_file(np.zeros(2, np.float32), "bfloat16")


# ------------------------------------------------------------------------------------------ training on disk

@pytest.mark.parametrize("dtype", HALF, ids=_ids)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_memmap_training_equals_in_memory_training(tmp_path, dtype, fused):
    batches = _batches(1, 12)
    ram = cembed.Embedding.from_pretrained(
        cembed.Embedding(N, D, seed=0).weight.astype(dtype), freeze=False, sparse=True)
    ram_opt = _adam(ram, dtype)
    table = cembed.open_table(tmp_path / "t.npy", N, D, dtype=dtype, init="normal", seed=0)
    disk = cembed.Embedding.from_pretrained(table, freeze=False, sparse=True)
    assert disk.weight is table or np.shares_memory(disk.weight, table)
    disk_opt = _adam(disk, dtype, state_dir=tmp_path / "state")
    _train(ram, ram_opt, batches, fused)
    _train(disk, disk_opt, batches, fused)
    assert disk.weight is table   # updated in place, never replaced by a copy
    assert_bitwise_equal(table, ram.weight)
    for key in ("exp_avg", "exp_avg_sq"):
        state = disk_opt.state[disk][key]
        assert isinstance(state, np.memmap) and state.dtype == dtype and functional._is_mapped(state)
        assert_bitwise_equal(state, ram_opt.state[ram][key])
    # prefetch finds both the table and the state mapped
    assert len(disk_opt._row_state_arrays(disk)) == 2
    functional.prefetch(table, np.arange(10), wait=True)
    # the files hold what training wrote
    table.flush()
    assert_bitwise_equal(np.load(tmp_path / "t.npy").view(dtype), ram.weight)
    state_file = tmp_path / "state" / "p0.exp_avg.npy"
    disk_opt.state[disk]["exp_avg"].flush()
    assert_bitwise_equal(np.load(state_file).view(dtype), ram_opt.state[ram]["exp_avg"])


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
def test_state_dir_save_load_round_trip(tmp_path, dtype):
    emb = cembed.Embedding.from_pretrained(cembed.Embedding(N, D, seed=0).weight.astype(dtype), freeze=False,
                                           sparse=True)
    opt = _adam(emb, dtype, state_dir=tmp_path / "a")
    _train(emb, opt, _batches(2, 5), True)
    path = tmp_path / "opt.npz"
    opt.save(path)
    with np.load(path) as data:   # the single-file save follows the same policy
        assert data["0/exp_avg"].dtype == storage.file_dtype(dtype)
    other = cembed.Embedding.from_pretrained(emb.weight.copy(), freeze=False, sparse=True)
    other_opt = _adam(other, dtype, state_dir=tmp_path / "b")
    other_opt.load(path)
    for key in ("exp_avg", "exp_avg_sq"):
        got = other_opt.state[other][key]
        assert isinstance(got, np.memmap) and got.dtype == dtype
        assert_bitwise_equal(got, opt.state[emb][key])
        assert np.load(tmp_path / "b" / f"p0.{key}.npy", mmap_mode="r").dtype == storage.file_dtype(dtype)
    # both continue identically
    more = _batches(3, 4)
    _train(emb, opt, more, True)
    _train(other, other_opt, more, True)
    assert_bitwise_equal(other.weight, emb.weight)
    assert_bitwise_equal(other_opt.state[other]["exp_avg_sq"], opt.state[emb]["exp_avg_sq"])


# ------------------------------------------------------------------------------------------ checkpoints

@pytest.mark.parametrize("dtype", HALF, ids=_ids)
@pytest.mark.parametrize("mmap", [True, False])
def test_checkpoint_round_trip_resumes_bitwise(tmp_path, dtype, mmap):
    first, second = _batches(4, 6), _batches(5, 6)
    table = cembed.open_table(tmp_path / "t.npy", N, D, dtype=dtype, init="normal", seed=0)
    emb = cembed.Embedding.from_pretrained(table, freeze=False, sparse=True)
    opt = _adam(emb, dtype, state_dir=tmp_path / "state")
    _train(emb, opt, first, True)
    ck = tmp_path / "ck"
    cembed.save_checkpoint(ck, {"w": emb}, opt, extra={"step": 6})
    manifest = json.loads((ck / "MANIFEST.json").read_text())
    assert manifest["meta"]["modules"]["w"]["dtype"] == dtype.name
    entry = manifest["files"]["module.w.npy"]
    if dtype == BF16:
        assert entry["dtype"] == "<u2" and entry["logical_dtype"] == "bfloat16"
    else:
        assert entry["dtype"] == "<f2" and "logical_dtype" not in entry
    assert cembed.checkpoint.open_array(ck, "module.w").dtype == dtype
    _train(emb, opt, second, True)   # the uninterrupted run

    fresh = cembed.Embedding.from_pretrained(np.zeros((N, D), dtype), freeze=False, sparse=True)
    fresh_opt = _adam(fresh, dtype)
    assert cembed.load_checkpoint(ck, {"w": fresh}, fresh_opt, mmap=mmap) == {"step": 6}
    assert fresh.weight.dtype == dtype and fresh_opt.state[fresh]["exp_avg"].dtype == dtype
    if mmap:
        assert isinstance(fresh.weight, np.memmap) and functional._is_mapped(fresh.weight)
    _train(fresh, fresh_opt, second, True)
    assert_bitwise_equal(fresh.weight, emb.weight)
    for key in ("exp_avg", "exp_avg_sq"):
        assert_bitwise_equal(fresh_opt.state[fresh][key], opt.state[emb][key])
    # the checkpoint itself was not written by training a copy-on-write map of it
    cembed.checkpoint.read_directory(ck)


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
def test_checkpoint_into_a_table_on_disk(tmp_path, dtype):
    emb = cembed.Embedding.from_pretrained(cembed.Embedding(N, D, seed=0).weight.astype(dtype), freeze=False,
                                           sparse=True)
    opt = _adam(emb, dtype)
    _train(emb, opt, _batches(6, 3), False)
    cembed.save_checkpoint(tmp_path / "ck", {"w": emb}, opt)
    table = cembed.open_table(tmp_path / "t.npy", N, D, dtype=dtype)
    disk = cembed.Embedding.from_pretrained(table, freeze=False, sparse=True)
    disk_opt = _adam(disk, dtype, state_dir=tmp_path / "state")
    cembed.load_checkpoint(tmp_path / "ck", {"w": disk}, disk_opt)
    assert disk.weight is table   # values copied into the table on disk
    assert_bitwise_equal(table, emb.weight)
    assert isinstance(disk_opt.state[disk]["exp_avg"], np.memmap)
    assert_bitwise_equal(disk_opt.state[disk]["exp_avg"], opt.state[emb]["exp_avg"])
    # a frozen read-only bfloat16/float16 table file is copied into a checkpoint (it may be trained
    # later), dtype kept; frozen and loaded from that checkpoint, it is hard-linked into the next one
    frozen = cembed.Embedding.from_pretrained(cembed.open_table(tmp_path / "t.npy", dtype=dtype, mode="r"))
    cembed.save_checkpoint(tmp_path / "ck2", {"w": frozen})
    assert os.stat(tmp_path / "ck2" / "module.w.npy").st_ino != os.stat(tmp_path / "t.npy").st_ino
    back = cembed.Embedding.from_pretrained(np.zeros((N, D), dtype))
    cembed.load_checkpoint(tmp_path / "ck2", {"w": back})
    assert_bitwise_equal(back.weight, table)
    cembed.save_checkpoint(tmp_path / "ck3", {"w": back})
    assert os.stat(tmp_path / "ck3" / "module.w.npy").st_ino == os.stat(tmp_path / "ck2" / "module.w.npy").st_ino
    again = cembed.Embedding.from_pretrained(np.zeros((N, D), dtype))
    cembed.load_checkpoint(tmp_path / "ck3", {"w": again})
    assert again.weight.dtype == dtype
    assert_bitwise_equal(again.weight, table)


def test_checkpoint_dtype_refusals_change_nothing(tmp_path):
    emb = cembed.Embedding.from_pretrained(cembed.Embedding(N, D, seed=0).weight.astype(BF16), freeze=False,
                                           sparse=True)
    opt = _adam(emb, BF16)
    _train(emb, opt, _batches(7, 2), True)
    cembed.save_checkpoint(tmp_path / "ck", {"w": emb}, opt)
    for target_dtype in (np.float32, np.float16):
        target = cembed.Embedding(N, D, sparse=True, seed=1, dtype=target_dtype)
        target_opt = optim.SparseAdam(target.parameters(), lr=0.01)
        before = target.weight.copy()
        with pytest.raises(CheckpointError, match=f"{np.dtype(target_dtype).name}.*bfloat16"):
            cembed.load_checkpoint(tmp_path / "ck", {"w": target}, target_opt)
        assert_bitwise_equal(target.weight, before)
        assert not target_opt.state.get(target)
    # a manifest whose recorded logical dtype disagrees with the file is refused
    manifest_path = tmp_path / "ck" / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["optim.0.exp_avg.npy"]["logical_dtype"] = "float16"
    manifest_path.write_text(json.dumps(cembed.checkpoint._sealed(manifest)))
    with pytest.raises(CheckpointError, match="malformed entry"):
        cembed.checkpoint.read_directory(tmp_path / "ck")


# ------------------------------------------------------------------------------------------ the trainer

def _train_cli(args, cwd, out=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    save = ["--out", out] if out else ["--no-save"]
    return subprocess.run([sys.executable, "-m", "cembed", "train", "--vocab-size", "2000", "--tokens", "40000",
                           "--batch-size", "256", "--no-plot", "--quiet", "--threads", "1"] + save + args,
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_trainer_bfloat16_table_dir_and_resume(tmp_path):
    first = _train_cli(["--dtype", "bfloat16", "--table-dir", "run", "--epochs", "1"], tmp_path, out="disk")
    assert first.returncode == 0, first.stderr
    in_ram = _train_cli(["--dtype", "bfloat16", "--epochs", "1"], tmp_path, out="ram")
    assert in_ram.returncode == 0, in_ram.stderr
    # the run on disk is bitwise the run in memory (the embeddings are the bfloat16 table, widened)
    assert_bitwise_equal(np.load(tmp_path / "disk" / "embeddings.npy"), np.load(tmp_path / "ram" / "embeddings.npy"))
    ck = tmp_path / "run" / "checkpoint"
    manifest = json.loads((ck / "MANIFEST.json").read_text())
    assert {m["dtype"] for m in manifest["meta"]["modules"].values()} == {"bfloat16"}
    assert manifest["files"]["module.in.npy"]["logical_dtype"] == "bfloat16"
    table = cembed.open_table(tmp_path / "run" / "tables" / "in.npy", dtype="bfloat16", mode="r")
    saved = cembed.checkpoint.open_array(ck, "module.in")
    assert_bitwise_equal(table, saved)
    assert np.isfinite(np.asarray(saved, np.float32)).all() and np.abs(np.asarray(saved, np.float32)).sum() > 0
    # resuming a finished run trains nothing more and keeps the tables
    resumed = _train_cli(["--dtype", "bfloat16", "--table-dir", "run", "--epochs", "1", "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_bitwise_equal(cembed.checkpoint.open_array(ck, "module.in"), saved)   # nothing left to train
    refused = _train_cli(["--dtype", "float16", "--table-dir", "run", "--epochs", "1", "--resume"], tmp_path)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "error: --resume: the checkpoint was written with other settings: dtype 'bfloat16' -> 'float16'" \
        in refused.stderr


def test_memmap_16_bit_training_is_the_same_for_any_thread_count(tmp_path):
    batches = _batches(8, 6)
    results = []
    old = cembed.get_num_threads()
    try:
        for threads in (1, 2, 3):
            cembed.set_num_threads(threads)
            table = cembed.open_table(tmp_path / f"t{threads}.npy", N, D, dtype="bfloat16", init="normal", seed=0)
            emb = cembed.Embedding.from_pretrained(table, freeze=False, sparse=True)
            opt = _adam(emb, BF16, state_dir=tmp_path / f"s{threads}")
            _train(emb, opt, batches, True)
            results.append((_bits(table), _bits(opt.state[emb]["exp_avg_sq"])))
    finally:
        cembed.set_num_threads(old)
    for got in results[1:]:
        assert_bitwise_equal(got[0], results[0][0])
        assert_bitwise_equal(got[1], results[0][1])
