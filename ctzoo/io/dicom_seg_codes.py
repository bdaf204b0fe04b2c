"""What a DICOM SEG segment is, coded from its class name: property category, type and modifier (DICOM CID 7150).

A viewer or PACS groups and colours segments by their codes, and a study's organs, vessels and tumours are
different categories of thing. A type is only taken from the list DICOM gives for its category, so the category
always matches the type (CID 7150 and the category's own list):

======================================  ===============  ==============================================
category                                type list        e.g.
======================================  ===============  ==============================================
Anatomical Structure (SCT 91723000)     CID 7192         liver, aorta, blood vessel, vertebra, kidney
Morphologically Abnormal Structure      CID 7194         neoplasm, primary or secondary neoplasm, lesion,
(SCT 49755003)                                           mass, nodule, cyst
Tissue (SCT 85756007)                   CID 7191         adipose tissue, muscle tissue, soft tissue
Body Substance (SCT 91720002)           CID 7197         bile, urine, gas
Physical Object (SCT 260787004)         CID 7193         stent, catheter
======================================  ===============  ==============================================

A class name is matched, case and separators aside (``inferior_vena_cava`` = ``InferiorVenaCava``), as a whole,
then singular (``kidneys``), then by its words:

* ``left``/``right`` become the type's laterality modifier (``kidney_left`` -> Kidney, modifier Left; not for an
  abnormal structure, whose side is its region's);
* a word naming a tumour or lesion (``tumour``, ``cancer``, ``metastases``, ``cyst``...; ``cancer primaries`` ->
  Neoplasm, primary) makes a morphologically abnormal type, and the other words its anatomic region where CID 4
  has one (``colon cancer primaries`` -> region Colon);
* ``vessel`` is Blood vessel;
* else the longest run of words that names a concept (``urinary_bladder`` -> Bladder; ``bowel`` is read as
  intestine, ``fat`` as adipose tissue).

A name none of this matches (an abbreviation, another language) is coded Tissue / Tissue, neutral rather than
wrong, and logged once as a warning: such a class should be renamed.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

log = logging.getLogger(__name__)

_CATEGORIES = codes.cid7150
#: Category, and the keywords of the types DICOM lists for it, in the order a name is looked up.
_TYPE_LISTS = ((_CATEGORIES.AnatomicalStructure, codes.cid7192),
               (_CATEGORIES.MorphologicallyAbnormalStructure, codes.cid7194),
               (_CATEGORIES.Tissue, codes.cid7191),
               (_CATEGORIES.BodySubstance, codes.cid7197),
               (_CATEGORIES.PhysicalObject, codes.cid7193))
_NOT_A_STRUCTURE = {"Background", "Normal"}  # in CID 7194, but not what a class of a segmenter is
#: Words of a class name that name a morphologically abnormal structure (CID 7194 keyword).
_ABNORMAL_WORDS = {
    **dict.fromkeys(("tumour", "tumor", "tumours", "tumors", "cancer", "cancers", "carcinoma", "carcinomas",
                     "neoplasm", "neoplasms", "malignancy", "malignancies"), "Neoplasm"),
    **dict.fromkeys(("metastasis", "metastases", "metastatic"), "NeoplasmSecondary"),
    **dict.fromkeys(("lesion", "lesions"), "Lesion"), **dict.fromkeys(("mass", "masses"), "Mass"),
    **dict.fromkeys(("nodule", "nodules"), "Nodule"), **dict.fromkeys(("cyst", "cysts"), "Cyst"),
}
_PRIMARY_WORDS = {"primary", "primaries"}
_VESSEL_WORDS = {"vessel", "vessels", "vasculature"}
_LATERALITY = {"left": codes.SCT.Left, "right": codes.SCT.Right}
#: Plurals that are not the singular plus s.
_IRREGULAR_SINGULAR = {"vertebrae": "vertebra", "vertebras": "vertebra"}
#: Words of class names (TotalSegmentator's, e.g.) for what DICOM names otherwise.
_SYNONYMS = {"bowel": ["intestine"], "fat": ["adipose", "tissue"]}


@dataclass(frozen=True)
class SegmentCoding:
    """The codes of one segment: category (CID 7150), type (from the category's list), the type's laterality
    modifier and, for an abnormal structure, the anatomic region it lies in (CID 4); ``known`` False when the name
    matched nothing and the codes are the neutral Tissue / Tissue."""

    category: Code
    type: Code
    modifier: Code | None = None
    anatomic_region: Code | None = None
    known: bool = True


def _camel(words: list[str]) -> str:
    return "".join(word.capitalize() for word in words)


def _typed(keyword: str, lists=_TYPE_LISTS) -> tuple[Code, Code] | None:
    """``(category, type)`` for a CID keyword, from the first category whose list has it."""
    if keyword in _NOT_A_STRUCTURE:
        return None
    for category, types in lists:
        if keyword in types.dir():
            return category, getattr(types, keyword)
    return None


def _singular(word: str) -> str:
    if word in _IRREGULAR_SINGULAR:
        return _IRREGULAR_SINGULAR[word]
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def _whole(words: list[str]) -> tuple[Code, Code] | None:
    """The name as one concept of any category, as written or with its last word singular."""
    if not words:
        return None
    return _typed(_camel(words)) or _typed(_camel([*words[:-1], _singular(words[-1])]))


def _longest_run(words: list[str]) -> tuple[Code, Code] | None:
    """The longest run of ``words`` that names a concept (``urinary bladder`` -> Bladder)."""
    for length in range(len(words) - 1, 0, -1):
        for start in range(len(words) - length + 1):
            if found := _whole(words[start:start + length]):
                return found
    return None


def _region(words: list[str]) -> Code | None:
    """The anatomic region (CID 4) that ``words`` name, if any (``colon``, ``liver``)."""
    for length in range(len(words), 0, -1):
        for start in range(len(words) - length + 1):
            keyword = _camel(words[start:start + length])
            if keyword in codes.cid4.dir():
                return getattr(codes.cid4, keyword)
    return None


@functools.lru_cache(maxsize=1024)  # also: the warning for an unknown name is logged once per process
def segment_coding(class_name: str) -> SegmentCoding:
    """The codes of a segment labelled ``class_name`` (see the module docstring)."""
    split = re.split(r"[^a-z0-9]+", re.sub(r"([a-z])([A-Z])", r"\1 \2", class_name).lower())
    words = [synonym for w in split if w for synonym in _SYNONYMS.get(w, [w])]
    side = next((_LATERALITY[w] for w in words if w in _LATERALITY), None)
    words = [w for w in words if w not in _LATERALITY]
    found = _whole(words)
    if found:
        return SegmentCoding(*found, modifier=side)
    abnormal = [w for w in words if w in _ABNORMAL_WORDS]
    if abnormal:
        keyword = _ABNORMAL_WORDS[abnormal[0]]
        if keyword == "Neoplasm" and _PRIMARY_WORDS & set(words):
            keyword = "NeoplasmPrimary"
        rest = [w for w in words if w not in _ABNORMAL_WORDS and w not in _PRIMARY_WORDS]
        category, type_ = _typed(keyword)
        return SegmentCoding(category, type_, anatomic_region=_region(rest))  # laterality: of a region, not coded
    if _VESSEL_WORDS & set(words):
        return SegmentCoding(*_typed("BloodVessel"), modifier=side)
    found = _longest_run(words)
    if found:
        return SegmentCoding(*found, modifier=side)
    log.warning("segment %r: no anatomical or morphologic concept of that name (DICOM CID 7192/7194); coded as "
                "Tissue, Tissue (SCT 85756007). Name the class as the structure is named (e.g. 'liver', "
                "'liver tumour') for a specific code", class_name)
    return SegmentCoding(_CATEGORIES.Tissue, codes.cid7191.Tissue, known=False)
