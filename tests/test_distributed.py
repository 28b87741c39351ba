"""Data-parallel runs under torchrun (DDP, gloo on CPU): the sharding rule, the single-process identity,
and end to end with two processes: rank 0 alone writes, the replicas agree, a killed run resumes bit for
bit, and a checkpoint refuses to resume with another number of processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from augkd.cli import main
from augkd.distributed import Dist

from .test_cli import TINY


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("n", [0, 1, 5, 10, 101])
def test_shards_partition_the_padded_epoch(world, n):
    order = torch.randperm(n)
    shards = [Dist(rank=r, world=world).shard_order(order) for r in range(world)]
    per = -(-n // world) if n else 0
    assert [s.numel() for s in shards] == [per] * world  # equal steps in every process
    seen = torch.cat(shards) if n else torch.empty(0, dtype=torch.long)
    assert set(seen.tolist()) == set(order.tolist())  # every sample, padding repeats the first ones
    padded = order[torch.arange(per * world) % n] if n else order  # wrap-around, as DistributedSampler
    for r, s in enumerate(shards):
        assert torch.equal(s, padded[r::world])


def test_one_process_helpers_are_the_identity():
    d = Dist()
    order = torch.randperm(7)
    row = {"loss": 1.5, "epoch": 3}
    assert not d.enabled and d.is_main
    assert d.shard_order(order) is order
    assert d.mean_metrics(row) is row and d.from_main(row) is row and d.gather(5) == [5]
    m = torch.nn.Linear(2, 2)
    assert d.wrap(m) is m


needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available in this torch")


def _torchrun(args, tmp_path, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop("WORLD_SIZE", None)
    # --standalone: torchrun picks a free port itself (no clash with anything else on the machine)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "augkd.cli", *args]
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)


def _state(path):
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state.get("state_dict", state)


@needs_gloo
def test_two_processes_end_to_end(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    res = _torchrun(["train-teacher", "--quiet", "--device", "cpu", "--out", str(teacher), *TINY], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("teacher saved to") == 1  # rank 0 alone reports
    assert json.loads((teacher / "versions.json").read_text())["processes"] == 2

    run = ["run", "--quiet", "--device", "cpu", "--teacher", str(teacher / "teacher.pt"), *TINY]
    res = _torchrun([*run, "--out", str(tmp_path / "whole")], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "whole" / "metrics" / "summary.json").read_text())
    assert summary["processes"] == 2 and set(summary["stages"]) == {"df", "anchor", "mixup"}
    assert list(tmp_path.glob("whole/**/log.txt")) == [tmp_path / "whole" / "log.txt"]

    # Killed after Module 3's second epoch, then resumed: the same student, bit for bit.
    killed = tmp_path / "killed"
    res = _torchrun([*run, "--out", str(killed)], tmp_path, {"AUGKD_DEBUG_KILL_AFTER": "mixup:1"})
    assert res.returncode != 0 and "simulated kill after mixup epoch 1" in res.stderr
    state = torch.load(killed / "checkpoints" / "mixup_state.pt", map_location="cpu", weights_only=False)
    assert state["processes"] == 2 and len(state["rng_by_rank"]) == 2 and state["epoch"] == 1
    # One process cannot resume a two-process checkpoint: a clear error, nothing overwritten.
    assert main(["run", "--quiet", "--device", "cpu", "--out", str(killed), "--resume",
                 "--teacher", str(teacher / "teacher.pt"), *TINY]) == 2
    assert "written by a run of 2 process(es); resume it with the same number" in capsys.readouterr().err
    res = _torchrun([*run, "--out", str(killed), "--resume"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    whole, resumed = _state(tmp_path / "whole" / "student.pt"), _state(killed / "student.pt")
    assert whole.keys() == resumed.keys()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
