"""Anatomy synthesis: training slices from label maps (written by SimpleITK, in a
non-trivial orientation), lesions in white matter, and the patch source base training
draws from: deterministic, resumable, mixed with real patches as configured."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from PatientFineTuneLib.synth.anatomy import SynthesisSettings, load_anatomy_map, sample_slab, synthesize_slices
from PatientFineTuneLib.synth.anatomy_patches import AnatomyPatches
from PatientFineTuneLib.training import TrainingConfig, build_patch_pool, draw_batch, sample_batch, train_base_model

from conftest import MODEL_SCRIPTS, SHARED_DATA, model_script, tiny_model, write_volume

#: LIA storage, as the SynthSeg label maps have: i -> left, j -> inferior, k -> anterior.
LIA = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, -1.0, 0.0)
SETTINGS = SynthesisSettings(
    ("FLAIR", "T1"), "ms", (1.5, 1.5), size=72, slices=3, slice_gap_mm=3.0, max_thickness_mm=4.0
)


def _head(shape=(72, 72, 72)) -> np.ndarray:
    """A (k, j, i) label head in LIA storage: scalp (507), CSF (24), cortex (3), white matter
    (2/41 by side), lateral ventricles (4/43), and cortex only in the anterior third, so
    anterior and posterior can be told apart."""
    k, j, i = np.indices(shape, dtype=np.float64) - (np.array(shape)[:, None, None, None] - 1) / 2
    r = np.sqrt(i**2 + j**2 + k**2)
    labels = np.zeros(shape, np.int16)
    labels[r < 34] = 507
    labels[r < 29] = 24
    labels[r < 27] = 3
    white = (r < 23) & (k < 8)  # k grows anteriorly: the front third stays cortex
    labels[white] = np.where(i[white] < 0, 41, 2)  # i grows to the left: 2 is left WM
    ventricle = ((i / 3) ** 2 + (j / 6) ** 2 + (k / 10) ** 2 < 1) & (np.abs(i) > 1.5)
    labels[ventricle & (r < 23)] = np.where(i[ventricle & (r < 23)] < 0, 43, 4)
    return labels


@pytest.fixture(scope="module")
def label_map(tmp_path_factory):
    path = tmp_path_factory.mktemp("anatomy") / "head.nii.gz"
    return write_volume(path, _head(), origin=(-35.5, 35.5, 35.5), direction=LIA)


def test_a_label_map_reads_as_tissue_codes_with_its_geometry(label_map):
    anatomy = load_anatomy_map(label_map)
    assert set(anatomy.names) == {"background", "wm", "cortex", "csf", "lateral_ventricle", "extra:507"}
    wm = anatomy.codes_of("wm")
    assert anatomy.codes.shape == (72, 72, 72) and np.isin(anatomy.codes, wm).sum() > 0
    # LPS (x, y, z) = origin + direction @ index: the head's centre is the array's centre,
    # and one mm superior is one voxel down the j axis (I in LIA)
    assert np.allclose(anatomy.inverse @ (np.zeros(3) - anatomy.origin), [35.5, 35.5, 35.5])
    assert np.allclose(anatomy.inverse @ np.array([0.0, 0.0, 1.0]), [0.0, -1.0, 0.0])
    assert set(anatomy.names[c] for c in anatomy.brain_codes) == {"wm", "cortex", "csf", "lateral_ventricle"}


def test_non_label_images_are_refused(tmp_path):
    path = write_volume(tmp_path / "t1.nii.gz", np.random.default_rng(0).random((8, 8, 8)).astype(np.float32))
    with pytest.raises(ValueError, match="not a label map"):
        load_anatomy_map(path)


def test_slabs_are_axial_with_rows_running_posterior(label_map):
    """The network sees axial slices with rows from anterior (top) to posterior, as the
    library presents real scans: the map's cortex-only anterior third is at the top."""
    anatomy = load_anatomy_map(label_map)
    cortex, wm = anatomy.codes_of("cortex"), anatomy.codes_of("wm")
    for seed in range(4):
        codes = sample_slab(anatomy, SETTINGS, 5, np.random.default_rng(seed))
        middle = codes[2]
        rows_with_wm = np.flatnonzero(np.isin(middle, wm).any(axis=1))
        rows_with_cortex = np.flatnonzero(np.isin(middle, cortex).any(axis=1))
        if rows_with_wm.size:
            assert rows_with_cortex.min() < rows_with_wm.min() - 3  # cortex-only front rows on top


def test_synthesis_is_seeded_and_puts_bright_lesions_in_white_matter(label_map):
    anatomy = load_anatomy_map(label_map)
    a = synthesize_slices(anatomy, SETTINGS, np.random.default_rng(7))
    b = synthesize_slices(anatomy, SETTINGS, np.random.default_rng(7))
    c = synthesize_slices(anatomy, SETTINGS, np.random.default_rng(8))
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["lesions"], b["lesions"])
    assert not np.array_equal(a["images"], c["images"])
    assert a["images"].shape == (2, 3, 72, 72) and a["lesions"].shape == a["organ"].shape == (3, 72, 72)
    assert np.all(np.isfinite(a["images"]))
    flair_ratios, t1_ratios = [], []
    for seed in range(12):
        out = synthesize_slices(anatomy, SETTINGS, np.random.default_rng(seed))
        lesions, organ = out["lesions"], out["organ"]
        assert not (lesions & ~organ).any()
        # lesions grow in white matter; juxtacortical ones may reach into the cortex
        assert np.isin(out["tissue"][lesions], anatomy.codes_of("wm", "cortex")).all()
        if lesions.sum() < 5:
            continue
        flair, t1 = out["images"]
        white = np.isin(out["tissue"], anatomy.codes_of("wm")) & organ & ~lesions
        flair_ratios.append(flair[lesions].mean() / np.median(flair[white]))
        t1_ratios.append(t1[lesions].mean() / np.median(t1[white]))
    # FLAIR-bright in every volume, and typically as bright as real lesions: 1.39-1.42 x
    # white matter over the whole masks of the Ljubljana scans, 1.46-1.65 in their cores
    # (docs/base-training.md); on T1 iso- to hypointense (bias fields and partial volume
    # move single volumes either way)
    assert len(flair_ratios) >= 6
    assert min(flair_ratios) > 1.1 and 1.3 < np.median(flair_ratios) < 1.7
    assert np.mean(t1_ratios) < 0.9 and max(t1_ratios) < 1.2


def test_tumours_have_a_dark_core_in_a_bright_rim_beside_bright_structures_that_are_not_tumour(label_map):
    """T1c synthesis: the target is the tumour core (enhancing rim and necrosis); dura,
    vessels and choroid plexus enhance too but are never target."""
    anatomy = load_anatomy_map(label_map)
    settings = SynthesisSettings(
        ("T1c",), "tumour", (1.5, 1.5), size=72, slices=3, slice_gap_mm=3.0, max_thickness_mm=4.0
    )
    with_tumour = with_mimics = 0
    for seed in range(8):
        out = synthesize_slices(anatomy, settings, np.random.default_rng(seed))
        t1c, target, organ = out["images"][0], out["lesions"], out["organ"]
        assert not (target & ~organ).any()
        white = np.isin(out["tissue"], anatomy.codes_of("wm")) & ~target
        bright = t1c > np.percentile(t1c[white], 99)
        if target.sum() > 30:
            with_tumour += 1
            assert t1c[target].max() > np.percentile(t1c[white], 95)  # the enhancing rim
        with_mimics += bool((bright & ~target & organ).sum() > 10)  # dura, vessels, plexus: bright, not target
    assert with_tumour >= 4 and with_mimics >= 4


def test_patch_source_draws_the_same_patches_in_a_fresh_process_and_mixes_as_configured(label_map, small_pair_dir):
    from PatientFineTuneLib.cases import find_cases
    from PatientFineTuneLib.images import load_case, prepare_case

    config = TrainingConfig(
        patch_size=32, seed=3, synthetic_fraction=0.5, sequence_dropout=0.5, droppable_channels=(1,)
    )
    first = AnatomyPatches([label_map], SETTINGS, seed=3, volume_every=2, bank=3)
    resumed = AnatomyPatches([label_map], SETTINGS, seed=3, volume_every=2, bank=3)  # as after a restart
    for iteration in (0, 1, 5):
        first.patches(4, 32, 45.0, iteration)
    x1, y1 = first.patches(4, 32, 45.0, 9)
    x2, y2 = resumed.patches(4, 32, 45.0, 9)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.shape == (4, 2, 32, 32) and y1.dtype == torch.long
    assert not torch.equal(x1, first.patches(4, 32, 45.0, 10)[0])

    files = find_cases(small_pair_dir, ["FLAIR", "T1"])
    cases = [prepare_case(load_case(f.sequences, f.organ, f.lesions, name=f.name)) for f in files]
    pool = build_patch_pool(cases, (2.0, 2.0), 5, seed=0)
    plain = TrainingConfig(patch_size=32, seed=3)
    # without synthesis and dropout, a batch is exactly the real sampler's
    xa, ya = draw_batch(pool, None, plain, 4)
    xb, yb = sample_batch(pool, plain, 4)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    blanked = mixed = 0
    for iteration in range(12):
        x, _ = draw_batch(pool, first, config, iteration)
        assert x.shape == (4, 2, 32, 32)
        blanked += int((x[:, 1].abs().sum(dim=(1, 2)) == 0).sum())
        mixed += 1
    assert 0 < blanked < 4 * mixed  # some T1 channels blanked, not all


def test_training_on_synthesis_alone_resumes_exactly(label_map, tmp_path):
    def run(iterations, resume=False):
        model = tiny_model().train()
        config = TrainingConfig(iterations=iterations, patch_size=32, seed=1)
        source = AnatomyPatches([label_map], SETTINGS, seed=1, volume_every=2, bank=2)
        train_base_model(
            model,
            [],
            (1.5, 1.5),
            config,
            device="cpu",
            checkpoint_path=tmp_path / "ckpt.pt",
            checkpoint_every=2,
            resume=resume,
            progress=False,
            log=lambda m: None,
            synthetic=source,
        )
        return model

    straight = run(4)
    (tmp_path / "ckpt.pt").unlink()
    run(2)
    resumed = run(4, resume=True)
    s1, s2 = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    with pytest.raises(ValueError, match="nothing to train on"):
        train_base_model(
            tiny_model(), [], (1.5, 1.5), TrainingConfig(iterations=1), device="cpu", progress=False, log=lambda m: None
        )


def _anatomy_run_checkpoint(folder: Path, label_map: Path, model, config: TrainingConfig) -> Path:
    """Train ``model`` on the tiny head for ``config``'s iterations, its checkpoint where
    ``train_anatomy.py --preset brain-wmh --width 4 --folder folder`` looks for its run's."""
    checkpoint = folder / "brain-wmh-anatomy-w4.checkpoint.pt"
    train_base_model(
        model,
        [],
        (1.5, 1.5),
        config,
        device="cpu",
        checkpoint_path=checkpoint,
        progress=False,
        log=lambda m: None,
        synthetic=AnatomyPatches([label_map], SETTINGS, seed=1, volume_every=2, bank=2),
    )
    return checkpoint


def test_finishing_a_run_drops_its_optimiser_state_only_where_the_run_ended(label_map, tmp_path):
    """``train_anatomy.py --finish`` shrinks the run's own checkpoint, and refuses one that
    stands elsewhere than ``--iterations`` (a run still under way), leaving it untouched."""
    model = tiny_model().train()
    checkpoint = _anatomy_run_checkpoint(
        tmp_path, label_map, model, TrainingConfig(iterations=2, patch_size=32, seed=1)
    )
    script = MODEL_SCRIPTS / "train_anatomy.py"

    def train_anatomy(iterations: int, *flags: str) -> subprocess.CompletedProcess:
        argv = ["--preset", "brain-wmh", "--width", "4", "--folder", str(tmp_path), "--iterations", str(iterations)]
        return subprocess.run([sys.executable, str(script), *argv, *flags], capture_output=True, text=True, timeout=120)

    def finish(iterations: int) -> subprocess.CompletedProcess:
        return train_anatomy(iterations, "--finish")

    full = checkpoint.read_bytes()
    refused = finish(3)
    assert refused.returncode != 0 and "stands at 2 iterations, not 3; give --iterations where" in refused.stderr
    assert checkpoint.read_bytes() == full
    done = finish(2)
    assert done.returncode == 0, done.stderr
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert payload["optimizer"] is None and checkpoint.stat().st_size < len(full) / 2
    assert all(torch.equal(payload["model"][k], v) for k, v in model.state_dict().items())
    # going on from it is refused at once, before the label maps and scans load
    going_on = train_anatomy(4, "--maps", str(tmp_path / "no-maps"))
    assert going_on.returncode != 0 and "is finished at 2 iterations" in going_on.stderr
    assert len(going_on.stderr.strip().splitlines()) == 1


def test_a_weight_averaged_run_is_a_run_of_its_own():
    """``--weight-average-decay`` reaches the run's settings and names its files, so an
    averaged run never resumes (or is taken for) the plain run of the same fold."""
    train_anatomy = model_script("train_anatomy")
    args = train_anatomy.parse_args(["--preset", "brain-wmh", "--weight-average-decay", "0.995"])
    assert train_anatomy.training_config(args, 2, torch.device("cpu")).weight_average_decay == 0.995
    fold = ("brain-wmh", train_anatomy.DEFAULT_WIDTH, "patient07", False, None)
    assert train_anatomy.run_name(*fold) == "brain-wmh-anatomy-loo-patient07"
    assert train_anatomy.run_name(*fold, weight_average_decay=0.995) == "brain-wmh-anatomy-loo-patient07-average0.995"
    with pytest.raises(SystemExit):  # refused before torch loads, in one line
        train_anatomy.parse_args(["--preset", "brain-wmh", "--weight-average-decay", "1"])


def test_the_long_trainer_uses_bfloat16_only_where_the_hardware_multiplies_it_and_goes_on_in_a_runs_own(
    label_map, tmp_path
):
    """``train_anatomy.py`` left to itself starts a run in float32 on a CPU without AMX
    tiles, where bfloat16 is emulated (on a 2-core AMD EPYC, 38-48 s per brain-tumor
    iteration in bfloat16 against 1.6-1.8 s in float32), and in mixed precision on a GPU;
    it goes on with a run in the run's own precision, and refuses at once, in one line
    naming the setting, a precision asked for that differs from the run's."""
    from PatientFineTuneLib.model import LesionNet
    from PatientFineTuneLib.training_loop import resolved_precision

    train_anatomy = model_script("train_anatomy")
    cpu = torch.device("cpu")

    def config(*argv, device=cpu, payload=None):
        return train_anatomy.training_config(
            train_anatomy.parse_args(["--preset", "brain-wmh", *argv]), 2, device, payload
        )

    assert config().precision == resolved_precision("auto", cpu)  # fp32 without AMX, amp with it
    assert config(device=torch.device("cuda")).precision == "amp"
    assert config("--precision", "fp32").precision == "fp32"
    # a run trained in bfloat16, as the committed runs were on a machine with AMX
    amp = dataclasses.replace(config("--precision", "amp"), iterations=2)
    checkpoint = _anatomy_run_checkpoint(tmp_path, label_map, LesionNet([1, 1], width=4).train(), amp)
    # whatever this machine would choose for a new run, a run goes on in its own precision
    for own in ("amp", "fp32"):
        assert config(payload={"config_json": json.dumps({"precision": own})}).precision == own
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert (
        config(payload=payload).precision == "amp"
        and config("--precision", "fp32", payload=payload).precision == "fp32"
    )

    def go_on(*flags: str) -> subprocess.CompletedProcess:
        argv = ["--preset", "brain-wmh", "--width", "4", "--folder", str(tmp_path), "--iterations", "4"]
        argv += ["--maps", str(tmp_path / "no-maps"), *flags]  # refused last: after every check of the run
        script = MODEL_SCRIPTS / "train_anatomy.py"
        return subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=120)

    refused = go_on("--precision", "fp32", "--seed", "3")
    assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1
    assert "precision: 'amp' in the checkpoint, 'fp32' now" in refused.stderr
    assert "seed: 0 in the checkpoint, 3 now" in refused.stderr  # every setting that differs
    # the same command without --precision gets past every check, to the label maps
    going_on = go_on()
    assert going_on.returncode != 0 and going_on.stderr.strip().splitlines() == [
        f"no label maps (*.nii, *.nii.gz) in {tmp_path / 'no-maps'}; give --maps the synthseg_label_maps folder"
    ]


@pytest.mark.realdata
def test_the_shared_label_maps_synthesise_brains_with_lesions():
    maps = sorted((SHARED_DATA / "synthseg_label_maps").glob("*.nii*"))
    if not maps:
        pytest.skip(
            f"{SHARED_DATA / 'synthseg_label_maps'} is absent (real data lives in ../shared/data, outside the repository)"
        )
    anatomy = load_anatomy_map(maps[0])
    assert {"wm", "cortex", "lateral_ventricle", "thalamus", "brainstem"} <= set(anatomy.names)
    settings = SynthesisSettings(("FLAIR", "T1"), "ms", (0.958, 0.958))
    out = synthesize_slices(anatomy, settings, np.random.default_rng(0))
    assert out["images"].shape == (2, 4, 240, 240)
    assert out["organ"].sum() > 4 * 5000 and out["lesions"].sum() > 0


def _small_cases(small_pair_dir):
    from PatientFineTuneLib.cases import find_cases
    from PatientFineTuneLib.images import load_case, prepare_case

    files = find_cases(small_pair_dir, ["FLAIR", "T1"])
    return [prepare_case(load_case(f.sequences, f.organ, f.lesions, name=f.name)) for f in files]


def test_batches_drawn_ahead_by_worker_processes_are_the_loops_own(label_map, small_pair_dir):
    from torch.utils.data import DataLoader

    from PatientFineTuneLib.training import BatchStream

    pool = build_patch_pool(_small_cases(small_pair_dir), (2.0, 2.0), 5, seed=0)
    config = TrainingConfig(
        iterations=7, patch_size=32, seed=3, synthetic_fraction=0.5, sequence_dropout=0.5, droppable_channels=(1,)
    )
    stream = BatchStream(
        pool, AnatomyPatches([label_map], SETTINGS, seed=3, volume_every=2, bank=2), config, 1, chunk=2
    )
    drawn = [batch for chunk in DataLoader(stream, batch_size=None, num_workers=2) for batch in chunk]
    assert [i for i, _, _ in drawn] == list(range(1, 7))  # in order, though two processes drew them
    in_loop = AnatomyPatches([label_map], SETTINGS, seed=3, volume_every=2, bank=2)
    for i, x, y in drawn:
        x_loop, y_loop = draw_batch(pool, in_loop, config, i)
        assert torch.equal(x, x_loop) and torch.equal(y, y_loop)

    def trained(workers):
        model = tiny_model().train()
        train_base_model(
            model,
            pool,  # a ready pool trains as its cases would
            (2.0, 2.0),
            TrainingConfig(iterations=4, patch_size=32, seed=1, synthetic_fraction=0.5),
            device="cpu",
            progress=False,
            log=lambda m: None,
            synthetic=AnatomyPatches([label_map], SETTINGS, seed=1, volume_every=2, bank=2),
            workers=workers,
        )
        return model.state_dict()

    alone, ahead = trained(0), trained(2)
    assert all(torch.equal(alone[k], ahead[k]) for k in alone)


def test_a_gpu_pack_trains_where_simpleitk_is_absent(label_map, small_pair_dir, tmp_path):
    import json

    from PatientFineTuneLib.modelfile import load_model
    from PatientFineTuneLib.presets import get_preset

    gpu_training = model_script("gpu_training")
    cases = _small_cases(small_pair_dir)
    arrays = gpu_training.pack_arrays(get_preset("brain-wmh"), [load_anatomy_map(label_map)], cases)
    with pytest.raises(SystemExit, match="over 0.01 MB"):
        gpu_training.write_pack(arrays, tmp_path / "big.npz", max_mb=0.01)
    assert not list(tmp_path.iterdir())  # refused without leaving a file
    pack = tmp_path / "brain-wmh.npz"
    gpu_training.write_pack(arrays, pack)

    held = cases[0].name.rsplit("/", 1)[-1]
    out = tmp_path / "out"
    argv = ["train", "--pack", str(pack), "--out", str(out), "--minutes", "5", "--iterations", "3", "--width", "4"]
    argv += ["--batch-size", "2", "--hold-out", held, "--workers", "1", "--timing-slices", "2", "--threads", "1"]
    code = (
        "import runpy, sys\n"
        "sys.modules['SimpleITK'] = None  # as on the GPU machine: importing it fails\n"
        f"sys.argv = ['gpu_training.py', *{argv!r}]\n"
        f"runpy.run_path({str(MODEL_SCRIPTS / 'gpu_training.py')!r}, run_name='__main__')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=300)
    model = load_model(out / f"brain-wmh-gpu-loo-{held}.pt")
    training = model.metadata["training"]
    assert training["config"]["iterations"] == 3 and training["held_out"] == [cases[0].name]
    assert training["train_cases"] == [c.name for c in cases[1:]]
    log = [json.loads(line) for line in (out / f"brain-wmh-gpu-loo-{held}.log.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "start" and log[-1]["event"] == "end" and log[-1]["iterations"] == 3
    assert log[-1]["inference_2_slices_s"] > 0 and log[-1]["finetune_step_batch4_width16_s"] > 0


def test_the_repository_leaves_room_for_a_gpu_runs_pack():
    """A device call sends the tracked files and the carried pack within 64 MiB, so the
    committed checkpoints must leave room for the larger pack and a margin: finished runs
    keep their weights without Adam's moments (``train_anatomy.py --finish``)."""
    gpu_training = model_script("gpu_training")
    try:
        tracked = gpu_training.repository_mib()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files cannot be listed")
    room = gpu_training.DEVICE_CARRY_MIB - gpu_training.LARGEST_PACK_MIB - gpu_training.GROWTH_MARGIN_MIB
    assert tracked <= room, f"the tracked files are {tracked:.1f} MiB; a device call leaves them {room:.1f} MiB"
