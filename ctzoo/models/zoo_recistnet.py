"""The RECIST-Net models of the zoo (timm-style: one registration per published model)."""

from __future__ import annotations

from ctzoo.models.recistnet import RecistNet
from ctzoo.models.registry import register_model

#: How slices must be prepared for recistnet-mini: the fields of
#: :class:`ctzoo.datasets.deeplesion.dataset.SlicePreprocessing`, plus the size multiple the network needs.
RECISTNET_MINI_INPUT = {
    "num_slices": 3, "slice_interval_mm": 2.0, "norm_spacing_mm": 0.8, "max_size": 512,
    "window_hu": [-1024.0, 3071.0], "extra_windows_hu": [[-160.0, 240.0], [-1350.0, 150.0]],
    "output_range": [0.0, 1.0], "size_multiple": 32,
}

register_model(
    "recistnet-mini",
    builder=RecistNet,
    default_config={"in_channels": 9, "backbone": "light", "width": 32, "head_channels": 64, "down_ratio": 4},
    task="detection",
    description="RECIST-Net (light CPU backbone) trained on the DeepLesion-format miniature built from real CT: "
                "finds lesions as the end points of their long and short axes plus the centre.",
    input_spec=RECISTNET_MINI_INPUT,
)
