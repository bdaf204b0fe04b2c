"""Real CT that ships with ctzoo, and more that ``ctzoo data fetch-samples`` fetches.

* Embedded: the 20-slice JPEG 2000 CT series from the TotalSegmentator 2.18.0
  source distribution (Apache-2.0; see ``sample_ct/NOTICE.md``).
* Fetched: CT volumes with organ labels from the same sdist, downloaded from
  PyPI by pip, checked against a pinned sha256 and extracted into a cache
  (``$CTZOO_CACHE``, else ``$XDG_CACHE_HOME/ctzoo``, else ``~/.cache/ctzoo``).
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from ctzoo.io.atomic import atomic_folder

SDIST_REQUIREMENT = "totalsegmentator==2.18.0"
SDIST_NAME = "totalsegmentator-2.18.0.tar.gz"
SDIST_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
_PREFIX = "totalsegmentator-2.18.0/"
_REFERENCE = _PREFIX + "tests/reference_files/"

#: What fetch-samples extracts: cache name -> (member of the sdist, what it is).
FETCHED_SAMPLES: dict[str, tuple[str, str]] = {
    "example_ct_sm.nii.gz": (_REFERENCE + "example_ct_sm.nii.gz", "CT, 122x101x30 voxels at 3 mm"),
    "example_seg.nii.gz": (_REFERENCE + "example_seg.nii.gz",
                           "TotalSegmentator 'total' organ labels for example_ct_sm.nii.gz"),
    "example_ct.nii.gz": (_REFERENCE + "example_ct.nii.gz", "CT, 122x101x112 voxels at 3 mm"),
    "example_seg_dicom.nii.gz": (_REFERENCE + "example_seg_dicom.nii.gz",
                                 "TotalSegmentator 'total' organ labels for the embedded DICOM sample"),
    "aorta_example_ct.nii.gz": (_REFERENCE + "aorta_report/example_ct.nii.gz", "CT, 233x167x191 voxels at 1.5 mm"),
    "LICENSE": (_PREFIX + "LICENSE", "Apache-2.0 licence of TotalSegmentator"),
}
#: Label names (value -> organ) of the 'total' task, parsed from the sdist into this file.
LABELS_FILE = "total_labels.json"
MANIFEST_FILE = "manifest.json"


class SampleError(RuntimeError):
    """Samples that cannot be fetched or found; the message says what to do."""


def sample_ct_dicom() -> Path:
    """Folder of the embedded 20-slice CT DICOM series (512 x 512 x 20, JPEG 2000 lossless)."""
    return Path(str(resources.files("ctzoo.datasets").joinpath("sample_ct")))


def write_sample(out: str | Path, force: bool = False) -> tuple[Path, str]:
    """Write the embedded sample CT to ``out`` so every example in the docs has an input; returns (path, what).

    ``out`` ending in ``.nii.gz``/``.nii``/``.nrrd``/``.mha``: the volume in that format (int16 HU, geometry kept);
    ``.zip``: the DICOM series zipped, as ``POST /studies`` takes it; anything else: a folder holding the DICOM
    files with their licence and notice. Written under a temporary name and renamed; an existing ``out`` is
    refused unless ``force``.
    """
    import zipfile

    from ctzoo.io import read_volume, write_volume
    from ctzoo.io.atomic import atomic_path
    from ctzoo.io.image_files import ITK_WRITE_SUFFIXES, NIFTI_SUFFIXES, file_suffix

    out, source = Path(out), sample_ct_dicom()
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    files = sorted(p for p in source.iterdir() if p.is_file() and p.name.startswith("CT."))
    suffix = file_suffix(out)
    if suffix in NIFTI_SUFFIXES + ITK_WRITE_SUFFIXES:
        if out.is_dir():
            raise FileExistsError(f"{out} is a folder; name a file to write the volume to")
        volume = read_volume(source, progress=False)
        return write_volume(volume, out, dtype="int16"), f"{' x '.join(map(str, volume.size))} voxels, int16 HU"
    if suffix == ".zip":
        with atomic_path(out) as partial, zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED) as archive:
            for path in files:  # JPEG 2000 inside already: deflating gains nothing
                archive.write(path, f"sample_ct/{path.name}")
        return out, f"zipped DICOM series, {len(files)} files"
    with atomic_folder(out) as staging:
        for path in [*files, source / "LICENSE", source / "NOTICE.md"]:
            shutil.copy2(path, staging / path.name)
    return out, f"DICOM series: {len(files)} files, LICENSE, NOTICE.md"


def cache_dir() -> Path:
    """Where fetched data lives: ``$CTZOO_CACHE``, else ``$XDG_CACHE_HOME/ctzoo``, else ``~/.cache/ctzoo``."""
    if os.environ.get("CTZOO_CACHE"):
        return Path(os.environ["CTZOO_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ctzoo"


def samples_dir(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "samples" / "totalsegmentator-2.18.0"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _offline_help(cache: Path, cached_sha256: str | None = None) -> str:
    """What to do without PyPI; ``cached_sha256``: the digest of the sdist already in the cache, which failed."""
    cached = cache / "downloads" / SDIST_NAME
    failed = ("" if cached_sha256 is None else
              f"\nThe file at {cached} has sha256 {cached_sha256}, not the pinned {SDIST_SHA256} (an incomplete "
              "copy?): replace it.")
    return (f"If this machine is offline, run on one with PyPI access:\n"
            f"  pip download --no-deps --no-binary :all: {SDIST_REQUIREMENT} -d DIR\n"
            f"copy DIR/{SDIST_NAME} here, then:\n"
            f"  ctzoo data fetch-samples --from-file {SDIST_NAME}\n"
            f"(or put it at {cached}){failed}")


def _download_sdist(cache: Path, timeout: float, cached_sha256: str | None = None) -> Path:
    """pip-download the sdist into the cache (atomically) and return its path; ``cached_sha256`` as for
    :func:`_offline_help`."""
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", SDIST_REQUIREMENT, "-d", tmp]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise SampleError(f"pip download of {SDIST_REQUIREMENT} timed out after {timeout:.0f} s.\n"
                              + _offline_help(cache, cached_sha256)) from exc
        fetched = Path(tmp) / SDIST_NAME
        if done.returncode != 0 or not fetched.exists():
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise SampleError(f"pip could not download {SDIST_REQUIREMENT} (exit {done.returncode}):\n{tail}\n"
                              + _offline_help(cache, cached_sha256))
        target = downloads / SDIST_NAME
        os.replace(fetched, target)
    return target


def _verified(sdist: Path) -> Path:
    actual = sha256_of(sdist)
    if actual != SDIST_SHA256:
        raise SampleError(f"{sdist}: sha256 {actual} does not match the pinned {SDIST_SHA256}; "
                          "refusing to use it (damaged download or a different file)")
    return sdist


def _total_labels(source: str) -> dict[str, str]:
    """The 'total' class map from TotalSegmentator's map_to_binary.py, read as data (never executed)."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "class_map" for t in node.targets):
            class_map = node.value
            for key, value in zip(class_map.keys, class_map.values):
                if isinstance(key, ast.Constant) and key.value == "total":
                    return {str(k): v for k, v in ast.literal_eval(value).items()}
    raise SampleError("map_to_binary.py in the sdist has no class_map['total']")


def _manifest_ok(folder: Path) -> bool:
    """Whether ``folder`` holds every sample as its manifest recorded it (size and sha256: the samples are ~13 MB,
    hashed in tens of milliseconds). A missing, truncated or damaged manifest means fetch again, never a crash."""
    try:
        recorded = json.loads((folder / MANIFEST_FILE).read_text())["files"]
        return set(FETCHED_SAMPLES) <= set(recorded) and all(_sample_ok(folder / name, info)
                                                             for name, info in recorded.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _sample_ok(path: Path, recorded: dict) -> bool:
    return (path.is_file() and path.stat().st_size == recorded["bytes"]
            and ("sha256" not in recorded or sha256_of(path) == recorded["sha256"]))


def fetch_samples(cache: Path | None = None, from_file: Path | None = None, force: bool = False,
                  timeout: float = 600.0) -> Path:
    """Make sure the fetched samples are in the cache; return their folder.

    Order: an already complete cache (unless ``force``); ``from_file``; a cached sdist; pip download.
    The sdist's sha256 is always checked; extraction goes to a temporary folder renamed into place.
    """
    cache = cache or cache_dir()
    target = samples_dir(cache)
    if not force and from_file is None and _manifest_ok(target):
        return target
    if from_file is not None:
        from_file = _verified(Path(from_file))  # a wrong file is refused before anything is written
    with _cache_lock(cache):  # two processes (test workers, jobs) fetching at once: one fetches, the other waits
        if not force and from_file is None and _manifest_ok(target):
            return target
        return _fetch_locked(cache, target, from_file, timeout)


@contextlib.contextmanager
def _cache_lock(cache: Path) -> Iterator[None]:
    """An exclusive lock on ``cache/.fetch.lock`` for as long as the block runs (released if the process dies)."""
    import fcntl

    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".fetch.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fetch_locked(cache: Path, target: Path, from_file: Path | None, timeout: float) -> Path:
    cached = cache / "downloads" / SDIST_NAME
    cached_sha256 = sha256_of(cached) if from_file is None and cached.exists() else None
    if from_file is not None:
        sdist = from_file
    elif cached_sha256 == SDIST_SHA256:
        sdist = cached
    else:
        sdist = _verified(_download_sdist(cache, timeout, cached_sha256))
    with atomic_folder(target) as staging:
        files = {}
        with tarfile.open(sdist, "r:gz") as archive:
            for name, (member, description) in FETCHED_SAMPLES.items():
                with archive.extractfile(member) as src, open(staging / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                files[name] = {"member": member, "description": description, "bytes": (staging / name).stat().st_size,
                               "sha256": sha256_of(staging / name)}
            with archive.extractfile(_PREFIX + "totalsegmentator/map_to_binary.py") as src:
                labels = _total_labels(src.read().decode("utf-8"))
        (staging / LABELS_FILE).write_text(json.dumps(labels, indent=1))
        (staging / MANIFEST_FILE).write_text(json.dumps(
            {"source": SDIST_REQUIREMENT, "sdist_sha256": SDIST_SHA256, "licence": "Apache-2.0 (see LICENSE)",
             "files": files}, indent=1))
    return target


def sample_path(name: str, cache: Path | None = None) -> Path:
    """Path of one fetched sample (a key of :data:`FETCHED_SAMPLES` or the labels file)."""
    if name not in FETCHED_SAMPLES and name != LABELS_FILE:
        raise SampleError(f"no sample {name!r}; known: {', '.join([*FETCHED_SAMPLES, LABELS_FILE])}")
    path = samples_dir(cache) / name
    if not path.exists():
        raise SampleError(f"{name} is not fetched yet; run: ctzoo data fetch-samples")
    return path


#: The distinct real CT scans ctzoo can reach (example_ct_sm is a slab of example_ct): short name -> cache name,
#: or None for the embedded DICOM series.
REAL_CT_SCANS: dict[str, str | None] = {"example_ct": "example_ct.nii.gz", "sample_ct": None,
                                        "aorta_example_ct": "aorta_example_ct.nii.gz"}


def real_ct_scan(name: str) -> Path:
    """Path of a real CT scan of :data:`REAL_CT_SCANS` (fetching the samples if needed)."""
    if name not in REAL_CT_SCANS:
        raise SampleError(f"no real CT scan {name!r}; known: {', '.join(REAL_CT_SCANS)}")
    cached = REAL_CT_SCANS[name]
    return sample_ct_dicom() if cached is None else fetch_samples() / cached
