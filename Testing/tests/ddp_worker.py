"""Run by ``torchrun --nproc_per_node=2`` from test_distributed.py: train a tiny model on
this process's shard of a case folder and save what each process ends with.

    python -m torch.distributed.run --standalone --nproc_per_node=2 ddp_worker.py CASES OUT
"""

import sys
from pathlib import Path

import torch

from PatientFineTuneLib.cases import find_cases
from PatientFineTuneLib.images import load_case, prepare_case
from PatientFineTuneLib.model import LesionNet
from PatientFineTuneLib.training import TrainingConfig, distributed_rank_and_size, init_distributed, train_base_model


def main(cases_dir: str, out: str) -> None:
    device = init_distributed("cpu")
    rank, world = distributed_rank_and_size()
    files = find_cases(cases_dir, ["FLAIR", "T1"])[rank::world]
    cases = [prepare_case(load_case(f.sequences, f.organ, f.lesions, name=f.name)) for f in files]
    torch.manual_seed(0)
    model = LesionNet((1, 1), width=4, head_width=8)
    config = TrainingConfig(iterations=3, patch_size=64, patches_per_slice=4)
    train_base_model(model, cases, (2.0, 2.0), config, device=device, progress=False, log=lambda m: None)
    torch.save(
        {"rank": rank, "world": world, "cases": [c.name for c in cases], "state": model.state_dict()},
        Path(out) / f"rank{rank}.pt",
    )
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
