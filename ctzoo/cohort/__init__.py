"""Cohorts of CT studies (HealthPrism in the zoo): the cohort table with its lesion level, the gated image + context
model and its fit, subgroup metrics and the three-view report."""

from ctzoo.cohort.context import COLUMNS, GROUPING, UNKNOWN, deeplesion_context, group_counts, volume_context
from ctzoo.cohort.fit import fit_cohort
from ctzoo.cohort.report import write_report
from ctzoo.cohort.table import build_cohort

__all__ = ["COLUMNS", "GROUPING", "UNKNOWN", "build_cohort", "deeplesion_context", "fit_cohort", "group_counts",
           "volume_context", "write_report"]
