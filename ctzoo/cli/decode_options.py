"""``--decode``: how DICOM's JPEG 2000 is decoded, one option and one resolution for ``ctzoo infer`` and ``ctzoo
serve`` (``ctzoo pacs`` takes the same choice from its config's ``decode``)."""

from __future__ import annotations

import click

DECODE_HELP = ("How DICOM's JPEG 2000 is decoded: GDCM on CPU threads, or nvImageCodec in batches on the GPU "
               "(ctzoo[gpu]), used only where the sample CT decodes to HU identical to GDCM's (checked at start). "
               "auto: nvImageCodec on CUDA where installed and the check passes, else GDCM.")

decode_option = click.option("--decode", type=click.Choice(["auto", "gdcm", "nvimgcodec"]), default="auto",
                             show_default=True, help=DECODE_HELP)


def resolve_decoder(requested: str, device: str, engine: str = "local") -> str | None:
    """The pipeline's decoder (:attr:`~ctzoo.inference.pipeline.PipelineOptions.decoder`) for ``requested`` on
    ``device`` (``auto`` allowed), said on stderr once; ClickException where the choice cannot be honoured."""
    from ctzoo.inference.backends import resolve_device
    from ctzoo.inference.decoding import choose_decoder

    try:
        choice = choose_decoder(requested, resolve_device(device), engine)
    except (RuntimeError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"decode: {choice.describe()}", err=True)
    return choice.pipeline_decoder
