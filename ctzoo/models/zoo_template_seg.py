"""The template segmenters of the zoo (timm-style: one registration per published model)."""

from __future__ import annotations

from ctzoo.models.registry import register_model
from ctzoo.models.template_seg import TemplateSegNet

#: How CT becomes input for template-seg-abdomen: the fields of
#: :class:`ctzoo.datasets.segmentation.SegPreprocessing`, plus the classes its output channels 1..5 mean.
TEMPLATE_SEG_ABDOMEN_INPUT = {
    "spacing_mm": 3.0, "size": [128, 128], "window_hu": [-200.0, 400.0],
    "classes": ["liver", "spleen", "stomach", "aorta", "vertebrae"],
}

register_model(
    "template-seg-abdomen",
    builder=TemplateSegNet,
    default_config={"spatial_dims": 2, "in_channels": 1, "num_classes": 5, "channels": [16, 32, 64, 128],
                    "strides": [2, 2, 2], "share_encoders": True, "fusion_levels": None, "gate": "none",
                    "temperature": 10.0},
    task="segmentation",
    description="Siamese template-encoder segmenter (2-D, axial slices at 3 mm) for liver, spleen, stomach, aorta "
                "and vertebrae; each slice is compared with the nearest template of its stored template bank.",
    input_spec=TEMPLATE_SEG_ABDOMEN_INPUT,
)
