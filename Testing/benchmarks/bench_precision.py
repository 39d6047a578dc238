"""One fine-tuning step of every layer in float32 and bfloat16, contiguous and channels-last,
as ratios to the shipped float32 channels-last step, timed in one run.

    python Testing/benchmarks/bench_precision.py [--threads 2] [--steps 10]
    ONEDNN_MAX_CPU_ISA=AVX2 python Testing/benchmarks/bench_precision.py   # as a laptop CPU would

The step is the all-lesion route's (the shipped 2D models, 4 patches of 128², every layer,
the backbone's BatchNorm on the base model's statistics, Adam); each variant prints its
fastest step after two warm-up steps and whether every weight stayed finite. This is what
``training_loop.resolved_precision`` decides "auto" from: bfloat16 pays only where oneDNN
multiplies it in AMX tiles (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import copy
import time

VARIANTS = (("float32", False), ("float32", True), ("bfloat16", False), ("bfloat16", True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    import torch

    from PatientFineTuneLib.modelcard import resolve_model_path
    from PatientFineTuneLib.modelfile import load_model
    from PatientFineTuneLib.training_loop import Adam, resolved_precision

    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, AMX tiles {torch.cpu._is_amx_tile_supported()}: "
        f'"auto" precision is {resolved_precision("auto", "cpu")}'
    )
    for preset in ("brain-tumor", "brain-wmh"):
        base = load_model(resolve_model_path(preset), device="cpu")
        channels = sum(s["channels"] for s in base.sequences)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(4, channels, 128, 128, generator=generator)
        target = torch.randint(0, 2, (4, 128, 128), generator=generator)
        seconds = {}
        for dtype, channels_last in VARIANTS:
            layout = torch.channels_last if channels_last else torch.contiguous_format
            model = copy.deepcopy(base.model).to(memory_format=layout).eval()
            model.head_modules().train()
            for p in model.parameters():
                p.requires_grad_(True)
            optimizer = Adam(list(model.parameters()), lr=2e-4)
            batch = x.contiguous(memory_format=layout)
            times = []
            for _ in range(args.steps + 2):
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                    logits = model(batch)
                loss = torch.nn.functional.cross_entropy(logits.float(), target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                times.append(time.perf_counter() - start)
            finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
            seconds[(dtype, channels_last)] = (min(times[2:]), finite)
        shipped = seconds[("float32", True)][0]
        print(f"{preset} ({channels} channel(s), width {base.model.width}):")
        for (dtype, channels_last), (s, finite) in seconds.items():
            layout = "channels-last" if channels_last else "contiguous"
            print(
                f"  {dtype:8s} {layout:13s} {1000 * s:7.0f} ms  {s / shipped:5.2f}x"
                + ("" if finite else "  NON-FINITE weights")
            )


if __name__ == "__main__":
    main()
