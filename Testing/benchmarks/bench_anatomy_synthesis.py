"""What anatomy synthesis costs next to the training step it feeds, measured in one run.

    python Testing/benchmarks/bench_anatomy_synthesis.py [--width 32] [--volumes 12] [--threads 1]

Times the synthesis of MS (brain-wmh: FLAIR + T1) and tumour (brain-tumor: T1c) volumes
from the shared label maps, and base-training steps of the preset's network at ``--width``
(batch 4 of 128 x 128 patches, the precision of the long runs), then prints the share of a
training iteration that generation takes when a new volume comes every ``volume_every``
iterations (4 for brain-wmh, 8 for brain-tumor, as the long runs use).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from PatientFineTuneLib.model import LesionNet
from PatientFineTuneLib.presets import get_preset
from PatientFineTuneLib.synth.anatomy import load_anatomy_map, synthesize_slices
from PatientFineTuneLib.synth.anatomy_patches import settings_for_preset
from PatientFineTuneLib.training import TrainingConfig
from PatientFineTuneLib.training_loop import Adam, training_loop

MAPS = Path(__file__).resolve().parents[3] / "shared" / "data" / "synthseg_label_maps"
VOLUME_EVERY = {"brain-wmh": 4, "brain-tumor": 8}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", type=Path, default=MAPS)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--volumes", type=int, default=12)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    maps = sorted(args.maps.glob("*.nii*"))
    if not maps:
        print(f"no label maps in {args.maps}; nothing to do")
        return 0
    torch.set_num_threads(args.threads)
    anatomies = [load_anatomy_map(p) for p in maps[:4]]
    print(f"{args.threads} thread(s), width {args.width}, {len(anatomies)} label maps in memory")
    for name, every in VOLUME_EVERY.items():
        preset = get_preset(name)
        settings = settings_for_preset(preset)
        start = time.perf_counter()
        for v in range(args.volumes):
            synthesize_slices(anatomies[v % len(anatomies)], settings, np.random.default_rng(v))
        per_volume = (time.perf_counter() - start) / args.volumes

        model = LesionNet([c for _, c in preset.sequences], width=args.width).train()
        channels = sum(c for _, c in preset.sequences)
        batch = (torch.randn(4, channels, 128, 128), (torch.rand(4, 128, 128) > 0.97).long())
        config = TrainingConfig(iterations=args.steps + 2, precision="amp")
        weights = torch.tensor(config.class_weights)

        def loss_of(_, model=model, batch=batch, weights=weights):  # this iteration's model, bound now
            return torch.nn.functional.cross_entropy(model(batch[0]).float(), batch[1], weight=weights)

        optimiser = Adam(model.parameters(), lr=1e-4)
        training_loop(loss_of, optimiser, range(2), seed=0, device=torch.device("cpu"), precision="amp")  # warm-up
        start = time.perf_counter()
        training_loop(loss_of, optimiser, range(2, 2 + args.steps), seed=0, device=torch.device("cpu"), precision="amp")
        per_step = (time.perf_counter() - start) / args.steps
        share = per_volume / every / (per_volume / every + per_step)
        print(
            f"{name:<12} synthesis {per_volume:.2f} s per volume ({settings.slices} slices), training step {per_step:.2f} s: "
            f"a new volume every {every} iterations is {share:.0%} of an iteration"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
