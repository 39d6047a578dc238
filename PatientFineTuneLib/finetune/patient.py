"""Fine-tuning one patient's model: the orchestration of slices, the check and the final
training (:func:`finetune_patient_model`)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Callable

import torch

from ..images import Case
from ..modelfile import ModelBundle, derived_metadata
from ..runtime import resolve_device
from .check import never_worse_check
from .config import FinetuneConfig
from .data import find_hard_negatives, network_mask, prepare_finetune_data, select_slices
from .head import progress_in_steps_of, train_patient_copy


def finetune_patient_model(
    bundle: ModelBundle,
    case: Case,
    slices: str | Sequence[int] = "all-lesion",
    config: FinetuneConfig | None = None,
    device: str | torch.device = "auto",
    progress: Callable[[int, float], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    allow_empty: bool = False,
    phase: Callable[[str, int, int], None] | None = None,
) -> ModelBundle:
    """Fine-tune a copy of the base model to one patient; the base model is untouched.

    Parameters
    ----------
    case : the normalised baseline with its annotation.
    slices : a selection understood by :func:`select_slices`.
    progress : called as ``progress(iteration, loss)`` after every iteration.
    cancel : checked before every iteration; if it returns True, :class:`Cancelled` is
        raised and nothing is returned or written.
    phase : called as ``phase(name, done, total)`` where a phase starts ("checking fold 1
        of 2", "final model"): ``done`` iterations of ``total`` are behind. ``total`` is
        :meth:`FinetuneConfig.progress_total` until the check has split the annotation,
        then the route's own (:meth:`FinetuneConfig.check_total`); a front end resizes its
        bar to it, so the time estimate stays honest.

    Returns
    -------
    ModelBundle
        The patient model with provenance in ``metadata["finetune"]``. With
        ``config.holdout_check`` the record has ``holdout_check`` (held-out Dice of the
        base and the fine-tuned model, ``kept``); when fine-tuning did not help there, the
        returned model is a copy of the base model (``method`` "base model kept").
        The check compares the iteration counts of ``config.check_iterations()`` and the
        patient model trains the one that did best on the held-out part (``iterations`` in
        the record). Progress runs to :meth:`FinetuneConfig.progress_total`: the check's
        half, then the final model's.
    """
    config = config or FinetuneConfig()
    device = resolve_device(device)
    config = config.for_device(device)  # "auto" precision decided here, so the metadata says what ran
    if bundle.is_volume_model:
        return _finetune_volume(bundle, case, slices, config, device, progress, cancel)
    if config.layers not in ("head", "all"):
        raise ValueError(
            f"the 2D network has no decoder; fine-tune its 'head' (the paper's last two layers) or 'all' layers, not {config.layers!r}"
        )
    chosen = select_slices(slices, case, bundle, device=device)
    base_prediction, negatives = None, []
    if config.hard_negative_slices and slices == "all-lesion" and case.lesions is not None:
        base_prediction = network_mask(bundle, case, device)
        negatives = find_hard_negatives(base_prediction, case, config.hard_negative_slices)
    data = prepare_finetune_data(
        bundle, case, sorted(chosen + negatives), config, allow_empty, device, base_prediction, negatives
    )
    provenance = {
        "slices": chosen,
        "slice_selection": slices if isinstance(slices, str) else "explicit",
        "case": case.sources,
    }
    if negatives:
        provenance["hard_negative_slices"] = negatives
    feature_cache = {}  # the backbone's outputs, computed once for the check's folds and the final model
    # where the final model's progress goes on the bar of config.progress_total()
    offset, planned, total = 0, config.progress_total(), config.progress_total()
    start_state = None
    if config.holdout_check:
        check = never_worse_check(bundle, data, config, device, progress, cancel, feature_cache, phase)
        provenance["holdout_check"] = check.record
        if not check.kept:
            metadata = derived_metadata(bundle, config, [], method="base model kept", **provenance)
            return ModelBundle(copy.deepcopy(bundle.model).eval(), metadata)
        if check.route is not None:
            config, planned = check.route, check.planned_per_fold
            offset = check.folds * planned
            if config.final_continues_check and check.fold_states:
                start_state = check.fold_states[config.iterations]
                provenance["continued_from_check_model"] = True
                config = dataclasses.replace(config, iterations=config.continued_iterations(config.iterations))
                planned = config.continued_iterations(planned)  # the bar's share, as check_total sized it
            total = offset + planned
    if phase is not None:
        phase("final model", offset, total)
    final_progress = progress_in_steps_of(progress, offset, planned, config.iterations)
    model, losses, method, _ = train_patient_copy(
        bundle, data, config, device, final_progress, cancel, feature_cache=feature_cache, start_state=start_state
    )
    return ModelBundle(
        model,
        derived_metadata(bundle, config, losses, method=method, pixel_fraction=config.pixel_fraction, **provenance),
    )


def _finetune_volume(bundle, case, slices, config: FinetuneConfig, device, progress, cancel) -> ModelBundle:
    """A 3D U-Net learns from the whole annotated baseline volume (lesion-inclusive and
    -exclusive patches of it), so a slice selection does not apply."""
    from ..volume_training import VolumeTrainingConfig, finetune_volume_model

    if slices != "all-lesion":
        raise ValueError(
            f"a 3D U-Net is fine-tuned on the whole annotated baseline volume; the slice selection {slices!r} "
            "applies to the 2D network (annotate every lesion of the baseline and use all-lesion)"
        )
    if config.weighting:
        raise ValueError(
            f"the {config.weighting!r} weighting of Jansen et al. 2020 is defined for the 2D network's slices; fine-tune a 3D U-Net without it"
        )
    if config.pixel_fraction < 1:
        raise ValueError(
            f"a pixel fraction ({config.pixel_fraction}) applies to the 2D network's head; a 3D U-Net trains on every voxel "
            "of its patches (leave --pixel-fraction out)"
        )
    if case.lesions is None or not case.lesions.any():
        raise ValueError("fine-tuning needs the baseline annotation (lesion mask) with at least one lesion")
    volume_config = VolumeTrainingConfig(
        iterations=config.iterations,
        learning_rate=config.learning_rate,
        strategy=config.layers,
        seed=config.seed,
        precision=config.precision,
    )
    return finetune_volume_model(bundle, [case], volume_config, device, progress, cancel)
