"""The learning curve of a long base-training run: held-out Dice and lesion F1 against
iterations, from the JSON lines ``Resources/Models/train_anatomy.py`` appends.

    python Testing/benchmarks/plot_learning_curve.py Resources/Models/training/brain-wmh-anatomy.log.jsonl \
        --out docs/img/brain-wmh-anatomy-curve.png

Prints the table too (one row per validation), for the docs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("--out", type=Path, help="PNG to write")
    args = parser.parse_args(argv)
    rows = {}
    for line in args.log.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            rows[entry["iteration"]] = entry  # a validation repeated after a resume: the later one
    rows = [rows[k] for k in sorted(rows)]
    keys = [
        ("val_dice", "Dice"),
        ("val_lesion_f1", "lesion F1"),
        ("val_dice_first_sequence_only", "Dice, first sequence only"),
        ("val_lesion_f1_first_sequence_only", "lesion F1, first sequence only"),
    ]
    keys = [(k, label) for k, label in keys if any(k in r for r in rows)]
    print("| iteration | hours | " + " | ".join(label for _, label in keys) + " |")
    print("|---" * (len(keys) + 2) + "|")
    for r in rows:
        print(
            f"| {r['iteration']} | {r.get('wall_s', 0) / 3600:.2f} | "
            + " | ".join(f"{r[k]:.3f}" if k in r else "" for k, _ in keys)
            + " |"
        )
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.6))
        for k, label in keys:
            ax.plot(
                [r["iteration"] for r in rows if k in r],
                [r[k] for r in rows if k in r],
                marker="o",
                label=label,
                linestyle="--" if "first" in k else "-",
            )
        ax.set_xlabel("iteration")
        ax.set_ylabel("held-out score (mean over scans)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(args.log.stem.replace(".log", ""))
        fig.tight_layout()
        fig.savefig(args.out, dpi=100)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
