"""Base-training throughput on this machine, every variant measured in one run.

    python Testing/benchmarks/bench_training.py [--preset brain-wmh] [--widths 64 16]
        [--iterations 10] [--threads N] [--device auto] [--unet3d-widths 8 16]

For each network width, times whole training iterations (batch sampling with rotation,
forward, weighted cross-entropy, backward, Adam step: the code ``train-base`` runs) in the
paper configuration (batch 4, 128x128 patches) with fp32, channels-last, mixed precision
(bfloat16 autocast on CPU, float16 with loss scaling on CUDA) and both, and prints
iterations/s and the speed-up over fp32 of the same width. The training slices are one
generated patient of the preset. The iterations/s also give the wall time of the paper's
10,000 iterations.

``--unet3d-widths`` also times the 3D U-Net (one sequence, batch 2 of 96 mm cubes at 2 mm,
i.e. 48^3 voxels: ``train_volume_model`` including its resampling of the volume) and its
overlapping-window segmentation of the same volume.
"""

from __future__ import annotations

import argparse
import time

VARIANTS = (("fp32", False), ("fp32", True), ("amp", False), ("amp", True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="brain-wmh")
    parser.add_argument("--widths", type=int, nargs="*", default=[64, 16])
    parser.add_argument("--iterations", type=int, default=10, help="timed iterations per variant (after 2 warm-up)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--unet3d-widths", type=int, nargs="*", default=[])
    args = parser.parse_args()

    import torch

    from PatientFineTuneLib.model import LesionNet
    from PatientFineTuneLib.presets import get_preset
    from PatientFineTuneLib.runtime import resolve_device
    from PatientFineTuneLib.synth import generate_pair, visit_case
    from PatientFineTuneLib.training import TrainingConfig, build_patch_pool, patch_loss
    from PatientFineTuneLib.training_loop import training_loop

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    preset = get_preset(args.preset)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU thread(s)"
    print(f"torch {torch.__version__}, device {device} ({name}), preset {preset.name}, batch 4, 128x128 patches")
    case = visit_case(generate_pair(preset.name, seed=0), "baseline")
    pool = build_patch_pool([case], preset.training_spacing_mm, 25, seed=0)

    def synchronise():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for width in args.widths:
        baseline = None
        for precision, channels_last in VARIANTS:
            config = TrainingConfig(precision=precision, channels_last=channels_last)
            label = precision + (" + channels-last" if channels_last else "")
            torch.manual_seed(0)
            model = LesionNet([c for _, c in preset.sequences], width=width).to(device).train()
            optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)

            def run(iterations, model=model, config=config, optimizer=optimizer):
                return training_loop(
                    patch_loss(model, pool, config, device),
                    optimizer,
                    iterations,
                    seed=0,
                    device=device,
                    precision=config.precision,
                )

            run(range(2))
            synchronise()
            start = time.perf_counter()
            loss = run(range(2, 2 + args.iterations))[-1]
            synchronise()
            rate = args.iterations / (time.perf_counter() - start)
            baseline = baseline or rate
            print(
                f"width {width:3d}  {label:24s} {rate:7.2f} it/s  x{rate / baseline:4.2f}  "
                f"10,000 iterations in {10_000 / rate / 60:6.1f} min  (last loss {loss:.3f})"
            )

    for width in args.unet3d_widths:
        time_unet3d(case, width, args.iterations, device)


def time_unet3d(case, width: int, iterations: int, device) -> None:
    from dataclasses import replace

    from PatientFineTuneLib.inference import predict_probability
    from PatientFineTuneLib.modelfile import ModelBundle, make_metadata
    from PatientFineTuneLib.volume_training import (
        VolumeTrainingConfig,
        new_volume_model,
        train_volume_model,
        volume_model_metadata,
    )

    flair = replace(case, images=case.images[:1])
    config = VolumeTrainingConfig(iterations=iterations)
    model = new_volume_model((1,), width=width)
    start = time.perf_counter()
    train_volume_model(model, [flair], config, device=device)
    rate = iterations / (time.perf_counter() - start)
    bundle = ModelBundle(
        model,
        make_metadata(model, [{"name": "FLAIR", "channels": 1}], (2.0,) * 3, **volume_model_metadata(config, model)),
    )
    start = time.perf_counter()
    predict_probability(bundle, flair, device=device)
    print(
        f"3D U-Net width {width:3d}: {rate:5.2f} training it/s (batch 2 of 48^3), segmenting the "
        f"{flair.organ.shape} volume at 2 mm {time.perf_counter() - start:5.1f} s"
    )


if __name__ == "__main__":
    main()
