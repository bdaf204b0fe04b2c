"""The Specific Character Set (0008,0005) of the DICOM objects ctzoo writes (SR, SEG), from their source series.

A result copies the patient and study attributes of its source, so it should say them in the source's character
set, which the site's systems read. But the source's value is often not what a writer may put in a new object,
though every reader (pydicom's included) accepts it:

* ISO 2022 code extensions with an **empty first value**, ``\\ISO 2022 IR 87`` (Japanese) or ``\\ISO 2022 IR 149``
  (Korean): the form of PS3.5 Annex H and I, where the empty value means the default repertoire, ISO 2022 IR 6;
* **misspellings** (``ISO-IR 100``, ``ISO IR 100``, ``ISO_2022_IR_87``), corrected here as pydicom's decoder
  corrects them when reading;
* **repeated** values (``ISO_IR 100\\ISO_IR 100``), a stand-alone set (UTF-8, GB18030, GBK) followed by others
  (which pydicom ignores), or a multi-byte set first (it needs the default repertoire before it).

:func:`output_character_set` turns the source's value into a valid one that decodes the same way. highdicom
refuses some valid values (its enumeration has no ``ISO 2022 IR 149``), so the writers give it none and set the
value on the finished object with :func:`apply_character_set`, which also checks that every text of the object
(the patient's name from the source, class and model names) can be encoded in it: where one cannot, or the source
names a set nobody knows, the object is written in UTF-8 (``ISO_IR 192``), which encodes any text, so a name
always reads back as the source's reader decoded it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import pydicom
from pydicom.charset import python_encoding

UTF8 = "ISO_IR 192"
DEFAULT_REPERTOIRE = "ISO 2022 IR 6"
#: Sets that allow no code extensions (PS3.3 C.12.1.1.2, Table C.12-5).
_STAND_ALONE = ("ISO_IR 192", "GB18030", "GBK")
#: Multi-byte sets with code extensions: never the first value (G0 holds the default repertoire there).
_MULTI_BYTE = ("ISO 2022 IR 87", "ISO 2022 IR 159", "ISO 2022 IR 149", "ISO 2022 IR 58")
#: Value representations whose text the Specific Character Set encodes.
_TEXT_VRS = {"SH", "LO", "ST", "LT", "UC", "UT", "PN"}


def corrected_term(term: str) -> str | None:
    """A Specific Character Set value as DICOM spells it, correcting the misspellings pydicom's decoder corrects
    (``ISO-IR 100`` -> ``ISO_IR 100``, ``ISO_2022-IR 87`` -> ``ISO 2022 IR 87``); None for an unknown set."""
    term = term.strip()
    if re.match("^ISO[^_]IR", term):
        term = "ISO_IR" + term[6:]
    elif re.match("^(?=ISO.2022.IR.)(?!ISO 2022 IR )", term):
        term = "ISO 2022 IR " + term[12:]
    return term if term in python_encoding and term != "ISO_IR 6" else None


def output_character_set(source: str | Sequence[str] | None) -> list[str] | None:
    """The values of a new object's Specific Character Set for a source whose value is ``source``: ``[]`` for the
    default repertoire (no attribute), None when ``source`` names a set this cannot tell (then write UTF-8)."""
    terms = [source] if isinstance(source, str) else list(source or [])
    terms = [str(term).strip() for term in terms]
    if not any(terms):
        return []
    if not terms[0]:  # PS3.5 Annex H/I: an empty first value is the default repertoire, in G0
        terms[0] = DEFAULT_REPERTOIRE
    corrected = [corrected_term(term) for term in terms]
    if None in corrected:
        return None
    terms = list(dict.fromkeys(corrected))  # repeated values said nothing more
    if terms[0] in _STAND_ALONE:
        return terms[:1]
    terms = [term for term in terms if term not in _STAND_ALONE]
    if len(terms) == 1:
        single = terms[0]
        if single == DEFAULT_REPERTOIRE:
            return []
        if single not in _MULTI_BYTE:
            return terms
    if terms[0] in _MULTI_BYTE:
        terms.insert(0, DEFAULT_REPERTOIRE)
    # with code extensions every value names its ISO 2022 form (ISO_IR 100 -> ISO 2022 IR 100)
    return [term.replace("ISO_IR ", "ISO 2022 IR ") if term.replace("ISO_IR ", "ISO 2022 IR ") in python_encoding
            else term for term in terms]


def _python_encodings(terms: list[str]) -> list[str]:
    """Python codecs for ``terms``; the default repertoire is ASCII (pydicom reads it as Latin-1, but no other
    reader need)."""
    codecs = [python_encoding[term] for term in terms if term != DEFAULT_REPERTOIRE]
    return ["ascii", *codecs] if not terms or terms[0] == DEFAULT_REPERTOIRE else codecs


def _texts(dataset: pydicom.Dataset) -> Iterator[str]:
    for element in dataset.iterall():
        if element.VR in _TEXT_VRS and element.value is not None:
            values = element.value if element.VM > 1 else [element.value]
            yield from (str(value) for value in values)


def encodable(dataset: pydicom.Dataset, terms: list[str]) -> bool:
    """Whether every text of ``dataset`` (its sequences' included) can be written in character set ``terms``:
    each character in one of its sets (pydicom switches sets within a value)."""
    encodings = _python_encodings(terms)
    unusual = {char for text in _texts(dataset) if not text.isascii() for char in text if not char.isascii()}

    def fits(char: str) -> bool:
        for encoding in encodings:
            try:
                char.encode(encoding)
                return True
            except UnicodeError:
                continue
        return False

    return all(fits(char) for char in unusual)


def apply_character_set(dataset: pydicom.Dataset, source: pydicom.Dataset) -> list[str]:
    """Set ``dataset``'s Specific Character Set from ``source``'s (:func:`output_character_set`), or UTF-8 where
    that cannot encode its texts; returns the values set (``[]``: the default repertoire, no attribute)."""
    terms = output_character_set(source.get("SpecificCharacterSet"))
    if terms is None or not encodable(dataset, terms):
        terms = [UTF8]
    if "SpecificCharacterSet" in dataset:
        del dataset.SpecificCharacterSet
    if terms:
        dataset.SpecificCharacterSet = terms[0] if len(terms) == 1 else terms
    return terms
