"""Zoo models, their registry and their bundles: ``list_models()``, ``create_model(name, pretrained=True)``,
``load_bundle(name_or_folder)`` (:mod:`ctzoo.models.bundle`, :mod:`ctzoo.models.pretrained`), model cards."""

# Each model module registers its models when imported: import it here, so 'import ctzoo.models' (and so
# 'ctzoo zoo list') sees every zoo model.

from ctzoo.models import (
    zoo_recistnet,  # noqa: E402,F401  (registers the RECIST-Net models)
    zoo_template_seg,  # noqa: E402,F401  (registers the template segmenters)
)
from ctzoo.models.bundle import BundleError, ModelBundle, load_bundle
from ctzoo.models.pretrained import create_model, load_card, model_input_spec, model_version, save_pretrained
from ctzoo.models.registry import (
    ArchitectureOverrideError,
    Metric,
    ModelCard,
    ModelEntry,
    TrainingInfo,
    UnknownModelError,
    WeightsMismatchError,
    list_models,
    model_entry,
    register_model,
    unregister_model,
)

__all__ = [
    "ArchitectureOverrideError",
    "BundleError",
    "ModelBundle",
    "load_bundle",
    "Metric",
    "ModelCard",
    "ModelEntry",
    "TrainingInfo",
    "UnknownModelError",
    "WeightsMismatchError",
    "create_model",
    "list_models",
    "load_card",
    "model_entry",
    "model_input_spec",
    "model_version",
    "register_model",
    "save_pretrained",
    "unregister_model",
]
