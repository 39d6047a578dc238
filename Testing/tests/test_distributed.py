"""train-base under torchrun: two CPU processes (gloo), DistributedDataParallel."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from PatientFineTuneLib.cases import find_cases
from PatientFineTuneLib.images import load_case, prepare_case
from PatientFineTuneLib.model import LesionNet
from PatientFineTuneLib.training import TrainingConfig, train_base_model

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

pytestmark = pytest.mark.slow  # each test starts two torch processes under torchrun and trains


def torchrun(*args, cwd=None):
    proc = subprocess.run([*TORCHRUN, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert proc.returncode == 0, f"torchrun exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_processes_train_their_own_shard_and_stay_identical(small_pair_dir, tmp_path):
    torchrun(Path(__file__).with_name("ddp_worker.py"), small_pair_dir, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert (r0["world"], r1["world"]) == (2, 2)
    assert r0["cases"] == ["baseline"] and r1["cases"] == ["followup"]  # disjoint shards
    assert all(
        torch.equal(r0["state"][k], r1["state"][k])
        for k in r0["state"]
        if r0["state"][k].is_floating_point() and "running" not in k
    )

    # Gradients were averaged across processes: rank 0 does not end where training on its
    # shard alone (same seed, same draws) ends. Adam's first steps move each weight by
    # about the learning rate in the gradient's sign, so most weights agree closely; the
    # averaged gradients still leave their mark on the exact values.
    files = find_cases(small_pair_dir, ["FLAIR", "T1"])[:1]
    torch.manual_seed(0)
    alone = LesionNet((1, 1), width=4, head_width=8)
    cases = [prepare_case(load_case(f.sequences, f.organ, f.lesions, name=f.name)) for f in files]
    train_base_model(
        alone,
        cases,
        (2.0, 2.0),
        TrainingConfig(iterations=3, patch_size=64, patches_per_slice=4),
        device="cpu",
        progress=False,
        log=lambda m: None,
    )
    trained = [k for k, v in r0["state"].items() if v.is_floating_point() and "running" not in k]
    differing = [k for k in trained if not torch.equal(alone.state_dict()[k], r0["state"][k])]
    assert len(differing) > len(trained) // 2


def test_train_base_cli_runs_unchanged_under_torchrun(small_pair_dir, tmp_path):
    model = tmp_path / "base.pt"
    proc = torchrun(
        "-m",
        "PatientFineTuneLib.cli",
        "train-base",
        "--preset",
        "brain-wmh",
        "--train",
        small_pair_dir,
        "--out",
        model,
        "--iterations",
        "2",
        "--width",
        "4",
        "--patches-per-slice",
        "2",
        "--device",
        "cpu",
    )
    assert "2 processes" in proc.stdout
    assert model.is_file() and not model.with_name("base.pt.checkpoint").exists()
    assert not list(tmp_path.glob(".partial-*"))
    info = json.loads(
        subprocess.run(
            [sys.executable, "-m", "PatientFineTuneLib.cli", "info", model], capture_output=True, text=True, check=True
        ).stdout
    )
    assert info["training"]["processes"] == 2
    assert info["training"]["train_cases"] == ["baseline", "followup"]
