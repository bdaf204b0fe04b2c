"""Cohorts of CT studies (HealthPrism in the zoo, issue 26): the cohort table and the gated image + context model."""

from ctzoo.cohort.context import COLUMNS, GROUPING, UNKNOWN, deeplesion_context, group_counts, volume_context
from ctzoo.cohort.table import build_cohort

__all__ = ["COLUMNS", "GROUPING", "UNKNOWN", "build_cohort", "deeplesion_context", "group_counts", "volume_context"]
