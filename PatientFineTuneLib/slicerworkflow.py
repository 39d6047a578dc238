"""The three steps of the Slicer module on MRML nodes, without any GUI (imports ``slicer``
through :mod:`.mrml`, never ``qt``), so the module's logic is a thin caller and all of it
is tested against real MRML classes.

1. :func:`analyse_baseline`: the base model's segmentation of the baseline as an editable
   segmentation node, and the slices worth annotating.
2. :func:`finetune_from_nodes`: the patient model from the (edited) baseline segment.
3. :func:`segment_followup`: lesion segmentation, probability and MC-dropout uncertainty
   volumes and a lesion table for the follow-up.

Long steps take ``progress`` and ``cancel`` callables, like the rest of the library. They
may run in a worker thread (no MRML access happens between the node reading at the start
and the node creation at the end; the ``*_nodes`` helpers split the two).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from . import mrml
from .images import Case, load_case, prepare_case
from .inference import Segmentation, segment_case
from .modelfile import ModelBundle
from .suggest import SliceSuggestion, suggest_slices


@dataclass
class MaskSource:
    """Where a mask comes from in the scene: one segment of a segmentation node, or a
    labelmap volume node (any label > 0)."""

    node: object
    segment_id: str | None = None

    def image(self, reference_node) -> sitk.Image:
        if self.node.IsA("vtkMRMLSegmentationNode"):
            segment_id = self.segment_id or self.node.GetSegmentation().GetNthSegmentID(0)
            if not segment_id:
                raise ValueError(f"segmentation {self.node.GetName()} has no segments")
            mask = mrml.segment_to_array(self.node, segment_id, reference_node)
            image = sitk.GetImageFromArray(mask.astype(np.uint8))
            image.CopyInformation(mrml.volume_to_image(reference_node))
            return image
        return mrml.volume_to_image(self.node)


def read_case(bundle: ModelBundle, volume_nodes: Sequence, organ: MaskSource | None = None, lesions: MaskSource | None = None,
              name: str = "") -> Case:
    """Normalised case from volume nodes in the model's sequence order (plus optional organ
    and lesion masks); the same checks and messages as for files."""
    names = [s["name"] for s in bundle.sequences]
    if len(volume_nodes) != len(names) or any(n is None for n in volume_nodes):
        raise ValueError(f"the model reads {len(names)} sequence(s) ({', '.join(names)}); select a volume for each")
    reference = volume_nodes[0]
    case = load_case(
        [mrml.volume_to_image(n) for n in volume_nodes],
        organ_path=organ.image(reference) if organ else None,
        lesion_path=lesions.image(reference) if lesions else None,
        expected_channels=[s["channels"] for s in bundle.sequences],
        sequence_names=[f"{n} ({node.GetName()})" for n, node in zip(names, volume_nodes)],
        auto_organ=bundle.auto_organ_mask,
        name=name,
    )
    return prepare_case(case)


# ---------------------------------------------------------------------------------------
# Step 1


@dataclass
class BaselineAnalysis:
    segmentation_node: object
    segment_id: str
    suggestions: list[SliceSuggestion]
    result: Segmentation = field(repr=False)


def analyse_baseline(scene, bundle: ModelBundle, volume_nodes: Sequence, organ: MaskSource | None = None, k: int = 2,
                     device="auto", progress: Callable | None = None, cancel: Callable | None = None) -> BaselineAnalysis:
    """Segment the baseline with the base model into a new segmentation node (segment
    "Lesion", ready to edit) and suggest the ``k`` slices to check and correct first."""
    case = read_case(bundle, volume_nodes, organ, name="baseline")
    result, suggestions = segment_and_suggest(bundle, case, k, device, progress, cancel)
    return add_baseline_nodes(scene, case, result, suggestions, volume_nodes[0])


def segment_and_suggest(bundle: ModelBundle, case: Case, k: int = 2, device="auto", progress: Callable | None = None,
                        cancel: Callable | None = None) -> tuple[Segmentation, list[SliceSuggestion]]:
    """The long part of :func:`analyse_baseline` (no scene access: may run in a worker)."""
    result = segment_case(bundle, case, opening=bundle.opening, device=device, progress=progress, cancel=cancel)
    return result, suggest_slices(bundle, case, k=k, probability=result.probability)


def add_baseline_nodes(scene, case: Case, result: Segmentation, suggestions: list[SliceSuggestion], reference_node) -> BaselineAnalysis:
    """The baseline's editable "Baseline lesions" segmentation node (main thread only)."""
    node = mrml.add_lesion_segmentation(scene, case.layout.from_slices(result.mask), reference_node, "Baseline lesions")
    segment_id = node.GetSegmentation().GetSegmentIdBySegmentName("Lesion")
    return BaselineAnalysis(node, segment_id, suggestions, result)


# ---------------------------------------------------------------------------------------
# Step 2


def finetune_from_nodes(bundle: ModelBundle, volume_nodes: Sequence, annotation: MaskSource, slices, organ: MaskSource | None = None,
                        config=None, device="auto", progress: Callable | None = None, cancel: Callable | None = None) -> ModelBundle:
    """The patient model: fine-tune the base model's last two layers on the annotated
    baseline slices (``slices``: indices along the slice axis, or a selection such as
    ``"all-lesion"``). The base model is not modified; nothing is written."""
    from .finetune import FinetuneConfig, finetune_patient_model

    case = read_case(bundle, volume_nodes, organ, lesions=annotation, name="baseline")
    return finetune_patient_model(bundle, case, slices, config or FinetuneConfig(), device=device, progress=progress, cancel=cancel)


# ---------------------------------------------------------------------------------------
# Step 3


@dataclass
class FollowupNodes:
    segmentation: object
    probability: object
    uncertainty: object | None
    table: object
    result: Segmentation = field(repr=False)


def segment_followup(scene, bundle: ModelBundle, volume_nodes: Sequence, organ: MaskSource | None = None, mc_samples: int = 25,
                     seed: int = 0, label: str = "fine-tuned", device="auto", progress: Callable | None = None,
                     cancel: Callable | None = None) -> FollowupNodes:
    """Segment the follow-up and put the results in the scene: "Follow-up lesions
    (<label>)" segmentation, probability and uncertainty (SD over ``mc_samples``
    MC-dropout passes) volumes on the follow-up's grid, and a lesion table."""
    case = read_case(bundle, volume_nodes, organ, name="follow-up")
    result = segment_case(bundle, case, opening=bundle.opening, mc_samples=mc_samples, seed=seed, device=device,
                          progress=progress, cancel=cancel)
    return add_followup_nodes(scene, case, result, volume_nodes[0], label)


#: Segment colour per result label, so base and fine-tuned results can be told apart when
#: shown together (anything else: the lesion yellow).
RESULT_COLOURS = {"base": (0.3, 0.75, 1.0)}


def add_followup_nodes(scene, case: Case, result: Segmentation, reference_node, label: str) -> FollowupNodes:
    """Scene nodes for a follow-up result (main thread only)."""
    segmentation = mrml.add_lesion_segmentation(scene, case.layout.from_slices(result.mask), reference_node, f"Follow-up lesions ({label})",
                                                colour=RESULT_COLOURS.get(label, mrml.LESION_COLOUR))
    probability = mrml.add_probability_volume(scene, case.layout.from_slices(result.probability), reference_node, f"Lesion probability ({label})")
    uncertainty = None
    if result.uncertainty is not None:
        uncertainty = mrml.add_uncertainty_volume(scene, case.layout.from_slices(result.uncertainty.sd), reference_node, f"Uncertainty SD ({label})")
    table = mrml.add_lesion_table(scene, result.lesions, f"Lesions ({label})")
    return FollowupNodes(segmentation, probability, uncertainty, table, result)
