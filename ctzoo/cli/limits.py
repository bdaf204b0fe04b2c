"""The size-limit options shared by ``ctzoo infer``, ``ctzoo serve`` and ``ctzoo pacs`` (:mod:`ctzoo.io.limits`)."""

from __future__ import annotations

import functools

import click

from ctzoo.io.limits import DEFAULT_LIMITS, ResourceLimits


def volume_limit_options(command):
    """Add --max-volume-voxels, --max-decoded-mb, --max-inflate-ratio and --max-zip-members to a click command; the
    command gets them as keyword arguments and turns them into limits with :func:`volume_limits`."""
    options = [
        click.option("--max-volume-voxels", type=click.IntRange(min=1), default=DEFAULT_LIMITS.max_volume_voxels,
                     show_default=True, help="Largest volume, in voxels, as its header declares it (checked "
                     "before reading; default 512 x 512 x 2048)."),
        click.option("--max-decoded-mb", type=click.FloatRange(min=0, min_open=True),
                     default=DEFAULT_LIMITS.max_decoded_mb, show_default=True,
                     help="Most bytes one input may decode to (a gzipped NIfTI, a compressed NRRD/MHA, a zip's "
                     "members), in MiB."),
        click.option("--max-inflate-ratio", type=click.FloatRange(min=1), default=DEFAULT_LIMITS.max_inflate_ratio,
                     show_default=True, help="Most decoded bytes per byte of input beyond the first 64 MiB "
                     "(zip and gzip bombs)."),
        click.option("--max-zip-members", type=click.IntRange(min=1), default=DEFAULT_LIMITS.max_zip_members,
                     show_default=True, help="Most members (files and folders) in a zipped series, counted before "
                     "extracting."),
    ]
    return functools.reduce(lambda wrapped, option: option(wrapped), reversed(options), command)


def volume_limits(options: dict, self_contained_only: bool = False) -> ResourceLimits:
    """Pop the options of :func:`volume_limit_options` from ``options`` into a ResourceLimits."""
    return ResourceLimits(options.pop("max_volume_voxels"), options.pop("max_decoded_mb"),
                          options.pop("max_inflate_ratio"), self_contained_only, options.pop("max_zip_members"))
