"""Base-training patches from anatomy synthesis (:mod:`.anatomy`), drawn as training needs
them: no synthetic volume is ever written to disk.

A new synthetic volume is generated every ``volume_every`` iterations, and each patch of an
iteration comes from one of the last ``bank`` volumes. Which volume, slice, centre and
angle a patch uses depends only on (seed, iteration, rank), and volume ``v`` only on
(seed, v, rank): a run resumed from a checkpoint draws the very patches the uninterrupted
run would have.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..arrays import normalise
from ..patches import extract_patches
from .anatomy import SYNTHESIS_VERSION, AnatomyMap, SynthesisSettings, load_anatomy_map, synthesize_slices


class AnatomyPatches:
    """Rotated training patches of synthetic slices of real anatomy.

    Parameters
    ----------
    maps : label maps (FreeSurfer labels) to synthesise from, as files or as loaded
        :class:`~.anatomy.AnatomyMap` objects (e.g. from a pack, where no SimpleITK reads
        files); all are kept in memory as uint8 codes (16 MB each at 256^3).
    settings : the preset's sequences, lesions and output spacing.
    seed : seeds every volume and patch draw.
    volume_every : iterations between new volumes (generation costs about as much as one
        training step at width 16 on a CPU, so 4 keeps it a small share).
    bank : how many recent volumes a batch draws from.
    lesion_centred : share of patches centred on a lesion pixel (when the slice has one);
        the rest are centred anywhere in the organ, as the paper's base training does.
    """

    def __init__(
        self,
        maps: Sequence[str | Path | AnatomyMap],
        settings: SynthesisSettings,
        seed: int = 0,
        volume_every: int = 4,
        bank: int = 8,
        lesion_centred: float = 0.5,
    ):
        if not maps:
            raise ValueError("no anatomy label maps given; pass the folder of synthseg_label_maps")
        self.maps = [m if isinstance(m, AnatomyMap) else Path(m) for m in maps]
        self.settings = settings
        self.seed = int(seed)
        self.volume_every = int(volume_every)
        self.bank = int(bank)
        self.lesion_centred = float(lesion_centred)
        self._maps: dict[int, AnatomyMap] = {}
        self._volumes: OrderedDict[tuple[int, int], dict] = OrderedDict()

    def describe(self) -> dict:
        """What a model's metadata records about this data."""
        return {
            "synthesis_version": SYNTHESIS_VERSION,
            "label_maps": [m.name for m in self.maps],
            "sequences": list(self.settings.sequences),
            "lesions": self.settings.lesion_kind,
            "volume_every": self.volume_every,
            "bank": self.bank,
            "lesion_centred": self.lesion_centred,
        }

    def _map(self, k: int) -> AnatomyMap:
        if isinstance(self.maps[k], AnatomyMap):
            return self.maps[k]
        if k not in self._maps:
            self._maps[k] = load_anatomy_map(self.maps[k])
        return self._maps[k]

    def volume(self, v: int, rank: int = 0) -> dict:
        """Synthetic volume ``v``: normalised images (C, S, H, W), lesions, organ."""
        key = (v, rank)
        if key not in self._volumes:
            rng = np.random.default_rng([self.seed, v, rank, 0xA5A7])
            anatomy = self._map(int(rng.integers(len(self.maps))))
            out = synthesize_slices(anatomy, self.settings, rng)
            out["images"] = normalise(out["images"], out["organ"])
            self._volumes[key] = out
            while len(self._volumes) > self.bank + 1:
                self._volumes.popitem(last=False)
        self._volumes.move_to_end(key)
        return self._volumes[key]

    def patches(
        self, n: int, patch_size: int, max_rotation_deg: float, iteration: int, rank: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` patches of ``iteration``: images (n, C, P, P) and labels (n, P, P) long."""
        rng = np.random.default_rng([self.seed, iteration, rank, 0xA5A8])
        newest = iteration // self.volume_every
        xs, ys = [], []
        for _ in range(n):
            volume = self.volume(max(0, newest - int(rng.integers(self.bank))), rank)
            with_organ = np.flatnonzero(volume["organ"].any(axis=(1, 2)))
            s = int(with_organ[rng.integers(with_organ.size)])
            lesion = volume["lesions"][s]
            where = lesion if lesion.any() and rng.random() < self.lesion_centred else volume["organ"][s]
            rows, cols = np.nonzero(where)
            pick = int(rng.integers(rows.size))
            centre = np.array([[rows[pick] + 0.5, cols[pick] + 0.5]])
            angle = [rng.uniform(-max_rotation_deg, max_rotation_deg)]
            image = torch.from_numpy(np.ascontiguousarray(volume["images"][:, s]))
            label = torch.from_numpy(lesion.astype(np.float32))[None]
            xs.append(extract_patches(image, centre, angle, patch_size))
            ys.append(extract_patches(label, centre, angle, patch_size, label=True))
        return torch.cat(xs), torch.cat(ys)[:, 0].round().long()


def settings_for_preset(preset, size: int = 240) -> SynthesisSettings:
    """Anatomy synthesis settings of a brain preset (its sequences and training spacing)."""
    kinds = {"brain-wmh": "ms", "brain-tumor": "tumour"}
    if preset.name not in kinds:
        raise ValueError(
            f"anatomy synthesis has no lesions for preset {preset.name!r} yet; it has them for {', '.join(kinds)}"
        )
    return SynthesisSettings(
        tuple(n for n, _ in preset.sequences), kinds[preset.name], tuple(preset.training_spacing_mm), size=size
    )
