"""JPEG 2000 decoded in batches by nvImageCodec (ctzoo.io.nvimgcodec_decode) and chosen per run (--decode).

On machines without a GPU the real library runs on its CPU backend (OpenJPEG), the same code path up to the device
the decoder is built on; every result is compared with GDCM's decode of the same real CT slices."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pydicom
import pytest
import torch
from click.testing import CliRunner

from ctzoo.cli import main
from ctzoo.datasets.samples import sample_ct_dicom
from ctzoo.inference.decoding import choose_decoder, decoder_check
from ctzoo.io import DicomError, read_volume
from ctzoo.io.nvimgcodec_decode import decoder_for

pytest.importorskip("nvidia.nvimgcodec", reason="nvImageCodec is in ctzoo's test extra")

CPU_DECODER = "nvimgcodec:cpu"


def _sample_files():
    return sorted(p for p in sample_ct_dicom().iterdir() if p.name.startswith("CT."))


def _copy_sample(folder, change=None):
    """The sample series in ``folder``; ``change(k, dataset)`` edits slice k before it is written."""
    folder.mkdir()
    for k, path in enumerate(_sample_files()):
        ds = pydicom.dcmread(path)
        if change is not None:
            change(k, ds)
        ds.save_as(folder / path.name)
    return folder


def _read(folder, decoder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_volume(folder, progress=False, decoder=decoder).array


def test_sample_ct_decodes_to_gdcms_hu_every_slice_by_nvimgcodec():
    decoded = decoder_for(CPU_DECODER).stored_values([str(p) for p in _sample_files()])
    assert all(values is not None and values.shape == (512, 512) and values.dtype == np.uint16 for values in decoded)
    reference, result = _read(sample_ct_dicom(), None), _read(sample_ct_dicom(), CPU_DECODER)
    assert result.dtype == np.float32 and np.array_equal(result, reference)
    assert -1100 < result.min() < -900 and result.max() > 500  # real HU: air and bone


def test_each_slices_own_rescale_and_a_mixed_series_give_the_same_hu(tmp_path):
    def change(k, ds):
        ds.RescaleSlope, ds.RescaleIntercept = ("0.37", "-1000.3") if k % 2 else ("1", "-1024")
        if k % 5 == 0:  # uncompressed slices between the JPEG 2000 ones
            ds.decompress()

    folder = _copy_sample(tmp_path / "mixed", change)
    reference, result = _read(folder, None), _read(folder, CPU_DECODER)
    assert np.array_equal(result, reference)
    assert not np.array_equal(reference, _read(sample_ct_dicom(), None))  # the slopes did change the HU


def test_a_signed_jpeg2000_slice_gives_gdcms_hu(tmp_path):
    """Whoever decodes it (nvImageCodec's CPU backend refuses this stream, so GDCM takes it there; nvJPEG2000 on a
    GPU decodes it), a signed slice must come back as GDCM's HU, never as unsigned values."""
    def change(k, ds):
        if k == 2:  # stored = HU, PixelRepresentation 1, re-encoded as lossless JPEG 2000
            hu = (ds.pixel_array.astype(np.int32) - 1024).astype(np.int16)
            ds.decompress()
            ds.PixelRepresentation, ds.BitsStored, ds.HighBit, ds.RescaleIntercept = 1, 16, 15, "0"
            ds.PixelData = hu.tobytes()
            ds.compress(pydicom.uid.JPEG2000Lossless)

    folder = _copy_sample(tmp_path / "signed", change)
    assert pydicom.dcmread(sorted(folder.iterdir())[2]).PixelRepresentation == 1
    assert np.array_equal(_read(folder, CPU_DECODER), _read(folder, None))


def test_a_corrupt_frame_fails_with_the_reference_message(tmp_path):
    def change(k, ds):
        if k == 3:
            frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
            ds.PixelData = pydicom.encaps.encapsulate([frame[:len(frame) // 2]])

    folder = _copy_sample(tmp_path / "corrupt", change)
    messages = []
    for decoder in (None, CPU_DECODER):
        with pytest.raises(DicomError, match="cannot decode pixel data") as error:
            _read(folder, decoder)
        messages.append(str(error.value).split("GDCMImageIO")[0])
    assert messages[0] == messages[1] and _copy_sample.__name__ not in messages[0]
    assert sorted(p.name for p in folder.iterdir())[3] in messages[0]  # names the file


def test_choose_decoder_rules():
    assert choose_decoder("auto", "cpu").spec == "gdcm"
    assert choose_decoder("gdcm", "cuda:0").reason == "asked for"
    assert choose_decoder("auto", "cuda:0", engine="ray").spec == "gdcm"
    with pytest.raises(ValueError, match="--engine local"):
        choose_decoder("nvimgcodec", "cpu", engine="ray")
    with pytest.raises(ValueError, match="unknown decoder"):
        choose_decoder("nvjpeg", "cpu")
    chosen = choose_decoder("nvimgcodec", "cpu")
    assert chosen.spec == CPU_DECODER and chosen.pipeline_decoder == CPU_DECODER
    assert chosen.check == {"decoder": CPU_DECODER, "slices": 20, "decoded": 20, "differing_voxels": 0,
                            "passed": True, "failures": []}
    assert "identical HU to GDCM" in chosen.describe()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback where CUDA is absent")
def test_auto_without_a_usable_gpu_falls_back_to_gdcm_and_says_why():
    chosen = choose_decoder("auto", "cuda:0")
    assert chosen.spec == "gdcm" and "could not start on cuda:0" in chosen.reason
    with pytest.raises(RuntimeError, match="could not start on cuda:0"):
        decoder_check("nvimgcodec:cuda:0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (docs/development.md: checks on a lent GPU)")
def test_auto_on_a_gpu_takes_nvimgcodec_after_its_check():
    chosen = choose_decoder("auto", "cuda")
    assert chosen.spec == "nvimgcodec:cuda", chosen.reason
    assert chosen.check["decoded"] == chosen.check["slices"] == 20 and chosen.check["differing_voxels"] == 0


def test_infer_decodes_with_nvimgcodec_in_spawned_readers(tmp_path):
    documents = {}
    for decode in ("gdcm", "nvimgcodec"):
        out = tmp_path / decode
        result = CliRunner().invoke(main, ["infer", "--decode", decode, "--layout", "shared", "--workers", "1",
                                           "--out", str(out), "--no-overlay"])
        assert result.exit_code == 0, result.output
        assert ("by nvImageCodec on cpu (identical HU" in result.output) == (decode == "nvimgcodec")
        documents[decode] = json.loads((out / "sample_ct" / "detections.json").read_text())
    assert documents["nvimgcodec"]["runtime"]["decoder"] == CPU_DECODER
    assert documents["gdcm"]["runtime"]["decoder"] == "gdcm"
    assert documents["nvimgcodec"]["lesions"] == documents["gdcm"]["lesions"] != []


def test_infer_refuses_nvimgcodec_on_ray():
    result = CliRunner().invoke(main, ["infer", "--decode", "nvimgcodec", "--engine", "ray"])
    assert result.exit_code == 2 and "--engine local" in result.output


def test_the_pacs_check_and_a_served_study_decode_with_the_chosen_decoder(tmp_path):
    """ctzoo pacs (its config's decode) and ctzoo serve (--decode) hand the resolved decoder to their reads."""
    from fastapi.testclient import TestClient
    from pydantic import ValidationError
    from upload_builders import zip_bytes

    from ctzoo.export.repository import export_model
    from ctzoo.io.dicom_scan import SeriesRules
    from ctzoo.pacs.config import PacsConfig
    from ctzoo.pacs.core import check_series
    from ctzoo.serve.app import create_app
    from ctzoo.serve.studies import study_router

    assert PacsConfig.model_validate({"decode": "nvimgcodec"}).decode == "nvimgcodec"
    with pytest.raises(ValidationError, match="decode"):
        PacsConfig.model_validate({"decode": "nvjpeg"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        volumes = [check_series(sample_ct_dicom(), SeriesRules(min_slices=10), decoder=spec)
                   for spec in (None, CPU_DECODER)]
    assert np.array_equal(volumes[0].array, volumes[1].array)

    export_model("recistnet-mini", tmp_path / "repo", progress=lambda message: None)
    upload = zip_bytes({f"series/{p.name}": p.read_bytes() for p in _sample_files()})
    answers = {}
    for spec in (None, CPU_DECODER):
        router = study_router("cpu", state_dir=tmp_path / f"state-{spec}", decoder=spec)
        with TestClient(create_app(tmp_path / "repo", ["token"], device="cpu", extra_routers=[router])) as client:
            reply = client.post("/studies/recistnet-mini", content=upload, headers={"Authorization": "Bearer token"})
        assert reply.status_code == 200, reply.text
        answers[spec] = reply.json()
    assert answers[CPU_DECODER]["runtime"]["decoder"] == CPU_DECODER
    assert answers[None]["runtime"]["decoder"] == "gdcm"
    assert answers[CPU_DECODER]["lesions"] == answers[None]["lesions"]
