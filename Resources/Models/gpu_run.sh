#!/usr/bin/env bash
# One lent GPU's base training: the three leave-out folds of PRESET, MINUTES each (further
# arguments go to `gpu_training.py train`, e.g. `--width 8 --workers 1` to try it on a CPU), at the
# paper's width 64, from gpu_pack/PRESET.npz (made beforehand on a machine with SimpleITK:
# `python Resources/Models/gpu_training.py pack --preset PRESET --out gpu_pack/PRESET.npz`).
# Through the device tool, with about 15 minutes of device time:
#   run(command="bash Resources/Models/gpu_run.sh brain-wmh 2.5", carry=["gpu_pack/brain-wmh.npz"], timeout_s=600)
# Brings back, in $OUT, each fold's model and log (6 files; the checkpoints stay behind: a
# lent machine may return at most 8). Score them here with eval_real_base_models.py
# --model PRESET=FILE on the fold's held-out scans; keep them only if they beat the CPU's.
set -euo pipefail
preset=$1
minutes=$2
out=${OUT:-gpu_out}
case $preset in
brain-wmh) folds=(patient07 patient19 patient26) ;;
brain-tumor)
    # a patient's two Brain-Tumor-Progression visits are held out together
    folds=(brats_2013_pat0001_1,brats_2013_pat0002_1,01
        brats_2013_pat0003_1,brats_2013_pat0004_1,02
        brats_2013_pat0005_1,brats_2013_pat0006_1,03)
    ;;
*)
    echo "no folds for preset $preset; use brain-wmh or brain-tumor" >&2
    exit 2
    ;;
esac
nvidia-smi -L || true
for fold in "${folds[@]}"; do
    PYTHONUNBUFFERED=1 python3 Resources/Models/gpu_training.py train --pack "gpu_pack/$preset.npz" --out "$out" \
        --minutes "$minutes" --hold-out "$fold" --checkpoint-dir /tmp/gpu_checkpoints "${@:3}"
done
