"""Core numbers of the library, measured in one run on this machine.

    python Testing/benchmarks/bench_core.py [--threads N] [--skip-memory]

Prints: parameter count and receptive field of the paper network; CPU time of one
240x240 two-sequence slice forward pass; the synthetic generator's time per patient pair
for each preset (single thread); and the peak memory of segmenting a 512x512x200
two-sequence volume (the organ covers only a few slices so it finishes quickly: the
per-slice working set is what the memory budget bounds, the volume arrays are full size).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_only:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        memory_benchmark()
        return

    import torch

    from PatientFineTuneLib.model import LesionNet, count_parameters

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")

    model = LesionNet((1, 1)).eval()
    print(
        f"paper network (FLAIR + T1): {count_parameters(model):,} parameters "
        f"({count_parameters(model.classifier):,} in the two fine-tuned layers), receptive field {model.receptive_field()} px"
    )
    x = torch.randn(1, 2, 240, 240)
    # contiguous weights as stored, then channels-last as inference and fine-tuning run it
    for layout in (torch.contiguous_format, torch.channels_last):
        model.to(memory_format=layout)
        with torch.no_grad():
            model(x)
            median, best = timed(lambda: model(x), 5)
            median_b, _ = timed(lambda: model(torch.randn(4, 2, 240, 240)), 2)
        print(
            f"forward ({'channels-last' if layout == torch.channels_last else 'contiguous'}), one 240x240 two-sequence slice: "
            f"median {median:.3f} s (best {best:.3f} s); batch of 4: {median_b / 4:.3f} s per slice"
        )

    from PatientFineTuneLib.synth import generate_pair

    torch.set_num_threads(1)
    for preset in ("brain-wmh", "brain-tumor", "liver-metastases"):
        generate_pair(preset, 100)  # warm-up (imports, allocator)
        median, best = timed(lambda preset=preset: generate_pair(preset, 101), 3)
        print(f"synth {preset}: {median:.2f} s per pair (best {best:.2f} s), one thread")
    if args.threads:
        torch.set_num_threads(args.threads)

    if not args.skip_memory:
        # its own process, so the peak resident memory is that of segmentation alone
        subprocess.run(
            [sys.executable, __file__, "--memory-only"] + (["--threads", str(args.threads)] if args.threads else []),
            check=True,
        )


def memory_benchmark() -> None:
    import numpy as np
    import SimpleITK as sitk

    from PatientFineTuneLib.images import Case, prepare_case, slice_layout
    from PatientFineTuneLib.inference import segment_case
    from PatientFineTuneLib.model import LesionNet
    from PatientFineTuneLib.modelfile import ModelBundle

    shape = (200, 512, 512)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, *shape), dtype=np.float32)
    images *= 10
    images += 100
    organ = np.zeros(shape, bool)
    organ[95:99, 40:470, 60:450] = True
    grid = sitk.Image(512, 512, 200, sitk.sitkUInt8)
    grid.SetSpacing((0.5, 0.5, 1.0))
    case = prepare_case(Case(images, organ, None, grid, slice_layout(grid)))
    del images
    bundle = ModelBundle(LesionNet((1, 1)).eval(), {"training_spacing_mm": [0.5, 0.5]})
    t = time.perf_counter()
    segment_case(bundle, case, device="cpu")
    elapsed = time.perf_counter() - t
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(
        f"segment 512x512x200 two-sequence volume ({int(organ.any(axis=(1, 2)).sum())} organ slices): "
        f"{elapsed:.1f} s, {elapsed / 4:.1f} s per slice; peak resident memory {peak_gb:.2f} GB"
    )


if __name__ == "__main__":
    main()
