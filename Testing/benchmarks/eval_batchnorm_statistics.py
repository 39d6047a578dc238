"""How much of a fold's validation noise is BatchNorm's running statistics?

BatchNorm's running mean and variance follow the training batches with momentum 0.1, so
the statistics a model is validated with are mostly those of its last 10-20 batches of 4
patches. With the weights of one checkpoint held fixed, this script validates the held-out
scans of a leave-out fold (as ``train_anatomy.py`` does) with:

- the checkpoint's own statistics;
- ``--windows`` variants of them after ``--recent`` more training-mode batches at momentum
  0.1, each window drawn at other iterations (what the statistics would have been had the
  run stopped after other batches);
- ``--windows`` variants recomputed as a plain average over ``--batches`` batches each
  ("precise BatchNorm", Wu & Johnson 2021).

No weight changes: the batches only run forward, without gradients. The spread of the
second group is the noise the statistics alone add; the third says whether an average of
many batches is steadier, and where it lands.

    python Testing/benchmarks/eval_batchnorm_statistics.py --hold-out patient26 \
        --checkpoint <fold checkpoint> --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# the fold's data, settings and held-out split exactly as the trainer makes them
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "Resources" / "Models"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="brain-wmh")
    parser.add_argument("--hold-out", required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--recent", type=int, default=20, help="batches at momentum 0.1 per window")
    parser.add_argument("--batches", type=int, default=100, help="batches averaged per precise window")
    parser.add_argument("--windows", type=int, default=3, help="windows of recent batches")
    parser.add_argument("--precise-windows", type=int, default=3, help="windows of averaged batches")
    parser.add_argument("--first-iteration", type=int, default=100_000, help="batches are those of these iterations on")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--maps", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch
    import train_anatomy

    from PatientFineTuneLib.model import LesionNet
    from PatientFineTuneLib.presets import get_preset
    from PatientFineTuneLib.synth.anatomy_patches import AnatomyPatches, settings_for_preset
    from PatientFineTuneLib.training import (
        build_patch_pool,
        checkpoint_weights,
        draw_batch,
        validation_scores,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    data = args.data or train_anatomy.DEFAULT_DATA
    maps = sorted((args.maps or data / "synthseg_label_maps").glob("*.nii*"))
    preset = get_preset(args.preset)
    n_channels = sum(c for _, c in preset.sequences)
    options = ["--preset", preset.name, "--hold-out", args.hold_out, "--width", str(args.width)]
    fold = train_anatomy.parse_args(options)
    config = train_anatomy.training_config(fold, n_channels, torch.device("cpu"))
    real, held = train_anatomy.split_hold_out(train_anatomy.load_validation(preset, data), args.hold_out)
    pool = build_patch_pool(real, preset.training_spacing_mm, config.patches_per_slice, config.seed)
    synthetic = AnatomyPatches(maps, settings_for_preset(preset), seed=config.seed, volume_every=fold.volume_every)
    model = LesionNet([c for _, c in preset.sequences], width=args.width)
    payload = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    stored = checkpoint_weights(payload)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]

    def scored(variant: str, window: int | None = None) -> None:
        started = time.monotonic()
        scores = validation_scores(model, held, preset.training_spacing_mm, "cpu", preset.name)
        record = {"variant": variant, "window": window, "dice": round(scores["dice"], 4)}
        record |= {"lesion_f1": round(scores["lesion_f1"], 4), "s": round(time.monotonic() - started, 1)}
        print(json.dumps(record), flush=True)

    def run_batches(first: int, count: int, average: bool = False) -> None:
        """Forward ``count`` batches in training mode; ``average``: the statistics become the
        plain average of theirs (momentum 1 / (k + 1) at the k-th, from reset statistics)."""
        model.train()
        if average:
            for norm in norms:
                norm.reset_running_stats()
        with torch.no_grad():
            for k, i in enumerate(range(first, first + count)):
                if average:
                    for norm in norms:
                        norm.momentum = 1.0 / (k + 1)
                model(draw_batch(pool, synthetic, config, i)[0])
        for norm in norms:
            norm.momentum = 0.1

    print(
        json.dumps({"checkpoint": str(args.checkpoint), "iteration": payload["iteration"], "held_out": args.hold_out})
    )
    model.load_state_dict(stored)
    scored("checkpoint's statistics")
    for w in range(args.windows):
        model.load_state_dict(stored)
        run_batches(args.first_iteration + 10_000 * w, args.recent)
        scored(f"after {args.recent} more batches at momentum 0.1", w)
    for w in range(args.precise_windows):
        model.load_state_dict(stored)
        run_batches(args.first_iteration + 10_000 * w + 5_000, args.batches, average=True)
        scored(f"average of {args.batches} batches", w)


if __name__ == "__main__":
    main()
