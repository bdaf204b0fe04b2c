"""One-shot architecture search over the template segmenter (after NAS-Navigator, arXiv 2009.13008): the search
space (:mod:`~ctzoo.nas.space`), the weight-sharing supernet and its extracted sub-networks
(:mod:`~ctzoo.nas.supernet`), their cost (:mod:`~ctzoo.nas.measure`), the search runs (:mod:`~ctzoo.nas.search`)
and the hand-off of a candidate to the zoo (:mod:`~ctzoo.nas.handoff`).
"""

from ctzoo.nas.space import (
    Architecture,
    LevelChoice,
    SearchSpace,
    count_architectures,
    count_unscored,
    enumerate_architectures,
    extreme,
    sample,
    vector_labels,
)

#: Names of :mod:`ctzoo.nas.supernet` (PyTorch and MONAI: seconds to import), imported on first use so that the
#: space, the explorer page and ``ctzoo nas ... --help`` start at once.
_SUPERNET = ("TemplateSuperNet", "extract", "subnet_config")


def __getattr__(name: str):
    if name in _SUPERNET:
        from ctzoo.nas import supernet

        return getattr(supernet, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Architecture", "LevelChoice", "SearchSpace", "TemplateSuperNet", "count_architectures", "count_unscored",
           "enumerate_architectures", "extract", "extreme", "sample", "subnet_config", "vector_labels"]
