"""Datasets: the embedded sample CT and fetched samples (:mod:`ctzoo.datasets.samples`); DeepLesion and
segmentation sets arrive with their issues."""

from ctzoo.datasets.samples import fetch_samples, sample_ct_dicom, sample_path

__all__ = ["fetch_samples", "sample_ct_dicom", "sample_path"]
