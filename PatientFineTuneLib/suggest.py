"""Which baseline slices to annotate (Jansen et al. 2020): the slices whose mean lesion softmax
over their organ pixels is closest to 0.5 come first."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: SliceSuggestion is read in Slicer's process, which never imports PyTorch
    from .images import Case
    from .modelfile import ModelBundle

RANKINGS = ("softmax", "entropy")


@dataclass
class SliceSuggestion:
    """A slice worth annotating, with where a viewer should jump to show it."""

    index: int  # slice index along the case's slice axis
    score: float  # ranking score, smaller is better (|mean - 0.5| or -entropy)
    mean_probability: float  # mean lesion softmax over the slice's organ pixels
    centre_mm: tuple[float, float, float]  # physical (LPS) centre of the slice's organ
    axis: int  # ITK index axis the slices are taken along

    def as_dict(self) -> dict:
        return {
            "slice": self.index,
            "score": round(self.score, 5),
            "mean_probability": round(self.mean_probability, 5),
            "centre_lps_mm": [round(c, 2) for c in self.centre_mm],
            "centre_ras_mm": [round(-self.centre_mm[0], 2), round(-self.centre_mm[1], 2), round(self.centre_mm[2], 2)],
            "itk_slice_axis": self.axis,
        }

    @classmethod
    def from_dict(cls, record: dict) -> SliceSuggestion:
        """Inverse of :meth:`as_dict` (e.g. a job's ``suggestions.json``)."""
        return cls(
            int(record["slice"]),
            float(record["score"]),
            float(record["mean_probability"]),
            tuple(float(c) for c in record["centre_lps_mm"]),
            int(record["itk_slice_axis"]),
        )


def rank_slices(
    probability: np.ndarray, organ: np.ndarray, candidates: np.ndarray, ranking: str = "softmax"
) -> list[tuple[int, float, float]]:
    """(slice, score, mean probability) of the candidate slices, best first.

    ``softmax``: |mean lesion probability over organ pixels - 0.5| (the paper).
    ``entropy``: minus the mean binary entropy over organ pixels (most uncertain first).
    Ties keep slice order, so the ranking is deterministic.
    """
    if ranking not in RANKINGS:
        raise ValueError(f"unknown ranking {ranking!r}; choose one of {', '.join(RANKINGS)}")
    rows = []
    for s in candidates:
        p = probability[s][organ[s]].astype(np.float64)
        if p.size == 0:
            continue
        mean = float(p.mean())
        if ranking == "softmax":
            score = abs(mean - 0.5)
        else:
            q = np.clip(p, 1e-7, 1 - 1e-7)
            score = -float(np.mean(-(q * np.log2(q) + (1 - q) * np.log2(1 - q))))
        rows.append((int(s), score, mean))
    return sorted(rows, key=lambda r: (r[1], r[0]))


def suggest_slices(
    bundle: ModelBundle,
    case: Case,
    k: int = 2,
    candidates: str = "organ",
    ranking: str = "softmax",
    probability: np.ndarray | None = None,
    **predict_kwargs,
) -> list[SliceSuggestion]:
    """The ``k`` baseline slices to annotate first (``k=0``: all, ranked).

    Parameters
    ----------
    case : a normalised baseline case.
    candidates : ``"organ"`` (every slice with organ: nothing annotated yet) or
        ``"lesion"`` (only annotated lesion slices: a full annotation exists).
    probability : the base model's lesion probability of the case, if already computed.
    """
    from .inference import predict_probability

    if candidates == "organ":
        pool = np.flatnonzero(case.organ.any(axis=(1, 2)))
    elif candidates == "lesion":
        if case.lesions is None or not case.lesions.any():
            raise ValueError("candidates='lesion' needs a baseline annotation with at least one lesion")
        pool = np.array(case.lesion_slices())
    else:
        raise ValueError(f"candidates must be 'organ' or 'lesion', got {candidates!r}")
    if probability is None:
        probability = predict_probability(bundle, case, **predict_kwargs)
    ranked = rank_slices(probability, case.organ, pool, ranking)
    chosen = ranked if k <= 0 else ranked[:k]
    out = []
    for s, score, mean in chosen:
        rows, cols = np.nonzero(case.organ[s])  # centre of the organ in this slice
        out.append(SliceSuggestion(s, score, mean, case.physical_point(s, rows.mean(), cols.mean()), case.axis))
    return out
