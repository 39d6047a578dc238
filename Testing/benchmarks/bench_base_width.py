"""What a wider base model costs the user: two base models of a preset timed in one run.

    python Testing/benchmarks/bench_base_width.py --old brain-wmh=OLD.pt --new brain-wmh=NEW.pt \
        [--old brain-tumor=OLD.pt --new brain-tumor=NEW.pt] [--threads N] [--repeats 2]

Per preset, on the real scan of the interactive aims (Ljubljana MS 26, FLAIR + T1, 1 mm;
Brain-Tumor-Progression 01 Pre, T1c; needs ../shared/data), with the old and the new model
taking turns so that both see the same machine load:

- one segmentation of the scan (the deterministic pass and post-processing);
- the shipped fine-tuning on the 2 suggested lesion slices (the interactive route: the
  suggestion, the head, the never-worse check);
- the shipped fine-tuning on every lesion slice (the all-lesion route: every layer).

It prints each time and the new model's time as a ratio to the old one's (the median over
``--repeats`` rounds), the figure to read on a noisy machine. The accuracy of the models is
not measured here (eval_real_base_models.py, eval_real_finetune.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: The scan each preset is timed on (the interactive aims' scans, docs/aims.md).
SCANS = {"brain-wmh": "patient26", "brain-tumor": "01_Pre"}


def wall(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def user_tasks(case) -> dict:
    """What the user waits for on ``case``, each a function of the base model."""
    from PatientFineTuneLib.finetune import finetune_patient_model, shipped_config
    from PatientFineTuneLib.inference import predict_mask
    from PatientFineTuneLib.suggest import suggest_slices

    def two_slices(base):
        chosen = [s.index for s in suggest_slices(base, case, k=2, candidates="lesion", device="cpu")]
        return finetune_patient_model(base, case, chosen, shipped_config(base), device="cpu")

    return {
        "segmentation": lambda base: predict_mask(base, case, device="cpu"),
        "fine-tuning, 2 suggested lesion slices": two_slices,
        "fine-tuning, every lesion slice": lambda base: finetune_patient_model(
            base, case, "all-lesion", shipped_config(base), device="cpu"
        ),
    }


def parse_models(items: list[str], parser: argparse.ArgumentParser) -> dict[str, Path]:
    models = {}
    for item in items:
        preset, _, file = item.partition("=")
        if preset not in SCANS or not Path(file).is_file():
            parser.error(f"{item}: give PRESET=FILE with PRESET one of {sorted(SCANS)} and an existing model file")
        models[preset] = Path(file)
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", action="append", default=[], metavar="PRESET=FILE")
    parser.add_argument("--new", action="append", default=[], metavar="PRESET=FILE")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    old, new = parse_models(args.old, parser), parse_models(args.new, parser)
    if not old or sorted(old) != sorted(new):
        parser.error("give --old and --new for the same presets")

    import torch

    from PatientFineTuneLib.modelfile import load_model

    from eval_real_base_models import DATA, real_cases
    from eval_real_finetune import load

    if not DATA.is_dir():
        print(f"no real data at {DATA}: nothing to time")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = {c["case"]: c for c in real_cases(DATA)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for preset in sorted(old):
        bases = {"old": load_model(old[preset]), "new": load_model(new[preset])}
        spec = specs[SCANS[preset]]
        case = load(spec, bases["old"])
        print(
            f"\n{preset} on {spec['set']} {spec['case']}: old width {bases['old'].model.width}, "
            f"new width {bases['new'].model.width}"
        )
        tasks = user_tasks(case)
        for what, task in tasks.items():
            times = {"old": [], "new": []}
            for _ in range(args.repeats):
                for which in ("old", "new"):
                    times[which].append(wall(partial(task, bases[which])))
            ratio = statistics.median(n / o for n, o in zip(times["new"], times["old"]))
            print(
                f"  {what:42s} old {statistics.median(times['old']):6.1f} s   new {statistics.median(times['new']):6.1f} s"
                f"   new / old {ratio:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
