"""`python -m cembed train --shards S`: the CLI starts Ray itself (here: already inside the private
namespace) and trains bitwise the same tables as `--shards 0`; outside a namespace it re-executes
itself under unshare, or refuses with an explanation when it cannot."""
import numpy as np
import pytest

from cembed.apps import cli


def run(tmp_path, name, *extra):
    out = tmp_path / name
    code = cli.main(["train", "--vocab-size", "1000", "--topics", "10", "--tokens", "20000", "--dim", "16",
                     "--batch-size", "1024", "--quiet", "--no-plot", "--out", str(out), *extra])
    assert code == 0
    return np.load(out / "embeddings.npy")


def test_main_job_sharded_equals_one_process(ray_local, tmp_path, capsys):
    """(With the session's Ray: the CLI uses a running Ray and leaves it running.)"""
    one = run(tmp_path, "one", "--shards", "0")
    two = run(tmp_path, "two", "--shards", "2")
    text = capsys.readouterr().out
    assert "2 Ray shards" in text and "ray:2" in text
    assert one.tobytes() == two.tobytes()
    assert np.abs(one).max() > 0.1          # trained: the init is within 0.5 / 16


def test_refuses_to_start_ray_outside_a_namespace_it_cannot_create(monkeypatch, capsys):
    import shutil

    import cembed.distributed as dist

    monkeypatch.setattr(dist, "only_loopback", lambda: False)
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    assert cli.main(["train", "--shards", "2", "--tokens", "1000", "--vocab-size", "100", "--no-save"]) == 2
    err = capsys.readouterr().err
    assert "private network namespace" in err and "--ray-address" in err and "unshare" in err


def test_relaunched_process_that_still_sees_a_network_stops(monkeypatch, capsys):
    import cembed.distributed as dist

    monkeypatch.setattr(dist, "only_loopback", lambda: False)
    monkeypatch.setenv(cli.NETNS_MARK, "1")
    assert cli.main(["train", "--shards", "1", "--tokens", "1000", "--vocab-size", "100", "--no-save"]) == 2
    assert "expected a private network namespace" in capsys.readouterr().err
