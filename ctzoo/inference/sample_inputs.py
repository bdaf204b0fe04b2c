"""Network input from the embedded sample CT, prepared exactly as ``ctzoo infer`` prepares it.

Every check that must hold on real CT and not only on random tensors uses it: the parity of an exported graph
with PyTorch (:mod:`ctzoo.export.parity`) and the losslessness of a LEMON expansion (:mod:`ctzoo.scaling`).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ctzoo.models.bundle import ModelBundle

#: How many slices of the embedded sample CT (evenly spread, ends excluded), by task.
REAL_SLICES = {"detection": 3, "segmentation": 6}


@functools.lru_cache(maxsize=1)
def sample_volume():
    """The embedded sample CT (read once per process)."""
    from ctzoo.datasets.samples import sample_ct_dicom
    from ctzoo.io import read_volume

    return read_volume(sample_ct_dicom(), progress=False)


def spread(count: int, wanted: int) -> list[int]:
    """``wanted`` indices evenly spread over ``range(count)``, ends excluded where possible."""
    if count <= wanted:
        return list(range(count))
    return sorted({int(round(x)) for x in np.linspace(0, count - 1, wanted + 2)[1:-1]})


def sample_ct_inputs(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """``{"image"}`` (detectors: slices by :func:`slice_inputs` on the inference canvas) or ``{"image",
    "template"}`` (template segmenters: slices by :func:`volume_to_slices`, each with its nearest bank template,
    chosen by the bundle's own network)."""
    bank = bundle.template_bank
    return prepared_sample(bundle.task, bundle.preprocessing, bank, bundle.network() if bank is not None else None)


def prepared_sample(task: str, prep, bank=None, model=None) -> dict[str, torch.Tensor]:
    """:func:`sample_ct_inputs` from its parts: ``prep`` a SlicePreprocessing (detection) or SegPreprocessing;
    with a template ``bank``, ``model`` (a TemplateSegNet) picks each slice's nearest template."""
    volume = sample_volume()
    if task == "detection":
        from ctzoo.inference.recist_volume import canvas_size, slice_inputs
        from ctzoo.io import reorient_lps

        axial = reorient_lps(volume)
        wanted = set(spread(axial.array.shape[0], REAL_SLICES["detection"]))
        images = [image for k, (image, _) in enumerate(slice_inputs(axial, prep, canvas=canvas_size(prep)))
                  if k in wanted]
        return {"image": torch.stack(images).contiguous()}
    from ctzoo.datasets.seg_preprocessing import volume_to_slices

    slices, _ = volume_to_slices(volume, prep)
    slices = torch.from_numpy(np.ascontiguousarray(slices.numpy(), dtype=np.float32))  # a plain tensor, no meta
    images = slices[spread(len(slices), REAL_SLICES["segmentation"])]
    if bank is None:
        return {"image": images}
    index = bank.nearest(model, images).cpu()
    return {"image": images, "template": bank.templates(index).contiguous()}
