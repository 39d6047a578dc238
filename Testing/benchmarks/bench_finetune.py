"""Fine-tuning and MC-dropout speed: fast paths against the naive reference, in one run.

    python Testing/benchmarks/bench_finetune.py [--iterations 100] [--width 64] [--mc-slices 8] [--pixel-fraction 0.125]

On one synthetic brain-wmh patient (240x240x48, FLAIR + T1) with a paper-width network
(weights untrained: speed does not depend on them):
  (a) fine-tuning, 2 suggested-size slice set and all lesion slices: naive loop (whole
      network every iteration) vs the fast path (cached backbone features), and the floor
      (the same number of head-only iterations on precomputed features);
  (b) 25-sample MC dropout: naive (25 full passes) vs fast (backbone once, head 25 times)
      vs one deterministic pass, on ``--mc-slices`` slices.
Prints times, ratios and the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import resource
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--mc-slices", type=int, default=8, help="slices used for the MC-dropout timing")
    parser.add_argument("--samples", type=int, default=25)
    parser.add_argument("--skip-all-lesion", action="store_true")
    parser.add_argument("--pixel-fraction", type=float, default=0.125, help="of the approximate mode's timing")
    args = parser.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F

    from PatientFineTuneLib.finetune import FinetuneConfig, finetune_patient_model, prepare_finetune_data
    from PatientFineTuneLib.images import Case
    from PatientFineTuneLib.inference import predict_probability, predict_with_uncertainty
    from PatientFineTuneLib.model import LesionNet
    from PatientFineTuneLib.modelfile import ModelBundle
    from PatientFineTuneLib.synth import generate_pair, visit_case

    case = visit_case(generate_pair("brain-wmh", 0), "baseline")
    torch.manual_seed(0)
    bundle = ModelBundle(LesionNet((1, 1), width=args.width).eval(), {"training_spacing_mm": [0.958, 0.958]})
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), width {args.width}, {args.iterations} iterations"
    )

    lesion_slices = case.lesion_slices()
    # two slices with the most lesion: stands in for "2 suggested slices" (the choice does not change speed)
    two = sorted(lesion_slices, key=lambda s: -case.lesions[s].sum())[:2]
    sets = [("2 slices", two)] + (
        [] if args.skip_all_lesion else [(f"all {len(lesion_slices)} lesion slices", lesion_slices)]
    )
    for name, slices in sets:
        times = {}
        # forcing the fast path on all lesion slices would cache every distinct input
        # (~17 GB at width 64); there the question is whether auto stays as cheap as naive
        methods = ("naive", "fast", "auto") if len(slices) <= 2 else ("naive", "auto")
        for method in methods:
            config = FinetuneConfig(iterations=args.iterations, method=method)
            t = time.perf_counter()
            finetune_patient_model(bundle, case, slices, config, device="cpu")
            times[method] = time.perf_counter() - t
        if len(slices) <= 2:  # the approximate mode, for reference (never the default)
            t = time.perf_counter()
            finetune_patient_model(
                bundle,
                case,
                slices,
                FinetuneConfig(iterations=args.iterations, pixel_fraction=args.pixel_fraction),
                device="cpu",
            )
            approximate = time.perf_counter() - t
            print(
                f"fine-tune, {name}, approximate mode (pixel fraction {args.pixel_fraction}): {approximate:.1f} s -> naive/approximate "
                f"{times['naive'] / approximate:.2f}x"
            )
        # floor: the head's own training on features that are already there
        config = FinetuneConfig(iterations=args.iterations)
        data = prepare_finetune_data(bundle, case, slices, config)
        net = LesionNet((1, 1), width=args.width)
        net.classifier.train()
        optimizer = torch.optim.Adam(net.classifier.parameters(), lr=1e-4)
        features = torch.randn(4, bundle.model.feature_channels, 128, 128).contiguous(memory_format=torch.channels_last)
        batch = torch.empty_like(features)
        target = torch.randint(0, 2, (4, 128, 128))
        t = time.perf_counter()
        for _ in range(args.iterations):
            # as the fast path: the batch is copied out of the cache, the head works on the copy
            loss = F.cross_entropy(
                net.head(batch.copy_(features), overwrite=True), target, weight=torch.tensor([1.0, 5.0])
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        floor = time.perf_counter() - t
        fast = times.get("fast", times["auto"])
        print(
            f"fine-tune, {name}: "
            + ", ".join(f"{m} {t:.1f} s" for m, t in times.items())
            + f", head-only floor {floor:.1f} s -> "
            f"naive/fast {times['naive'] / fast:.2f}x, fast/floor {fast / floor:.2f}x, naive/auto {times['naive'] / times['auto']:.2f}x "
            f"({len(data.images) * 5 * len(data.angles)} distinct patch inputs)"
        )

    organ_slices = np.flatnonzero(case.organ.any(axis=(1, 2)))
    keep = organ_slices[len(organ_slices) // 2 - args.mc_slices // 2 :][: args.mc_slices]
    sub = Case(
        case.images,
        case.organ & np.isin(np.arange(case.organ.shape[0]), keep)[:, None, None],
        None,
        case.grid,
        case.layout,
    )
    t = time.perf_counter()
    predict_probability(bundle, sub, device="cpu")
    one = time.perf_counter() - t
    mc = {}
    for method in ("naive", "fast"):
        t = time.perf_counter()
        predict_with_uncertainty(bundle, sub, n_samples=args.samples, method=method, device="cpu")
        mc[method] = time.perf_counter() - t
    print(
        f"MC dropout, {args.samples} samples, {len(keep)} slices of 240x240: one deterministic pass {one:.1f} s, "
        f"naive {mc['naive']:.1f} s ({mc['naive'] / one:.1f}x), fast {mc['fast']:.1f} s ({mc['fast'] / one:.2f}x)"
    )
    print(f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GB")


if __name__ == "__main__":
    main()
