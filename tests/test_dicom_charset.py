"""The Specific Character Set of the SR and SEG ctzoo writes, from sources in the forms sites store: ISO 2022 code
extensions with an empty first value (Japanese, Korean: PS3.5 Annex H, I), misspelled or repeated values, Latin-1
bytes without a declared set. Each result is written, and its patient name reads back as the source's did."""

import copy
import dataclasses
import io
import warnings

import numpy as np
import pydicom
import pytest
from dicom_validation import assert_dciodvfy_clean

from ctzoo.io.dicom_charset import output_character_set
from ctzoo.io.dicom_seg import write_dicom_seg
from ctzoo.io.dicom_sr import write_recist_sr

JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"
KOREAN = "Hong^KilDong=洪^吉洞=홍^길동"
#: source (SpecificCharacterSet as stored, None: absent; the patient's name) -> the character set written
SOURCES = {
    "japanese": (["", "ISO 2022 IR 87"], JAPANESE, ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
    "korean": (["", "ISO 2022 IR 149"], KOREAN, ["ISO 2022 IR 6", "ISO 2022 IR 149"]),
    "misspelled": ("ISO-IR 100", "Müller^Jörg", "ISO_IR 100"),
    "repeated": (["ISO_IR 100", "ISO_IR 100"], "Müller^Jörg", "ISO_IR 100"),
    "undeclared latin-1": (None, "Müller^Jörg", "ISO_IR 192"),  # the default repertoire has no ü: UTF-8
    "utf-8": ("ISO_IR 192", "山田^太郎", "ISO_IR 192"),
}


@pytest.mark.parametrize(("source", "written"), [
    (None, []), ("", []), ("ISO_IR 100", ["ISO_IR 100"]), (["", "ISO 2022 IR 87"], ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
    (["", "ISO 2022 IR 149"], ["ISO 2022 IR 6", "ISO 2022 IR 149"]), ("ISO 2022 IR 6", []),
    ("ISO IR 100", ["ISO_IR 100"]), (["ISO_2022_IR_6", "ISO_2022-IR 87"], ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
    (["ISO_IR 100", "ISO_IR 100"], ["ISO_IR 100"]), ("ISO 2022 IR 87", ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
    (["ISO_IR 100", "ISO 2022 IR 87"], ["ISO 2022 IR 100", "ISO 2022 IR 87"]),
    (["ISO_IR 192", "ISO 2022 IR 87"], ["ISO_IR 192"]), (["", "ISO_IR 192"], []), ("KLINGON", None)])
def test_output_character_set(source, written):
    assert output_character_set(source) == written


def _stored(headers, charset, name):
    """``headers`` as a site stores them: the name encoded in ``charset`` in the file's bytes, then read back."""
    stored = []
    for ds in copy.deepcopy(headers):
        if charset is None:
            del ds.SpecificCharacterSet
        else:
            ds.SpecificCharacterSet = charset
        ds.PatientName = name
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns of the misspelled value it writes as given
            ds.save_as(buffer)
            buffer.seek(0)
            stored.append(pydicom.dcmread(buffer))
    return stored


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # reading the misspelled source
@pytest.mark.parametrize("source", SOURCES)
def test_sr_and_seg_keep_the_patient_name_in_a_valid_character_set(source, sample_volume, tmp_path):
    charset, name, expected = SOURCES[source]
    headers = _stored(sample_volume.dicom.headers, charset, name)
    assert str(headers[0].PatientName) == name  # what a reader of the source sees
    volume = dataclasses.replace(sample_volume, dicom=dataclasses.replace(sample_volume.dicom, headers=headers))
    labels = np.zeros(volume.array.shape, np.uint8)
    labels[4:6, 200:240, 200:240] = 1
    document = {"input": {}, "lesions": []}
    for path in (write_recist_sr(document, volume, tmp_path / "sr.dcm", "recistnet-mini", "0.3.0"),
                 write_dicom_seg(labels, volume, ["liver"], tmp_path / "seg.dcm", "template-seg", "0.1.0")):
        result = pydicom.dcmread(path)
        assert result.SpecificCharacterSet == expected
        assert str(result.PatientName) == name
        if source in ("japanese", "korean"):
            assert_dciodvfy_clean(path)
