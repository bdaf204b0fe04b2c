"""A miniature DeepLesion, in DeepLesion's exact on-disk layout, built from real CT with synthetic lesions.

``make_deeplesion_mini(OUT)`` writes::

    OUT/DL_info.csv                          one row per lesion, all 18 columns (write_dl_info)
    OUT/Images_png/{pat}_{study}_{series}/{slice:03d}.png   16-bit, HU + 32768, every slice of each Slice_range
    OUT/masks/{pat}_{study}_{series}/{slice:03d}_{k}.png    uint8 0/1 mask of lesion k on its key slice
    OUT/lesions.json                         truth per lesion (type, organ, HU, volume, mask) and per series
    OUT/NOTICE.md, OUT/LICENSE               provenance (TotalSegmentator 2.18.0 sample CT, Apache-2.0)

Each case (one series) is a different view of one of three real volumes: a slab of its slices, resampled
in-plane to 0.7-0.9 mm/px on a 512 x 512 grid (z kept as is), shifted, with mild noise; 1-4 lesions from
:mod:`ctzoo.datasets.deeplesion.lesion_synthesis` (shapes: :mod:`.lesion_shapes`) are drawn into it with a
partial-volume edge one source voxel wide and measured with :func:`ctzoo.datasets.deeplesion.measure.measure_recist`.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image
from tqdm import tqdm

from ctzoo.datasets import samples
from ctzoo.datasets.deeplesion import lesion_synthesis as synth
from ctzoo.datasets.deeplesion.info_csv import (
    LESION_TYPES,
    SPLITS,
    LesionRow,
    write_dl_info,
)
from ctzoo.datasets.deeplesion.lesion_shapes import draw_style
from ctzoo.datasets.deeplesion.measure import measure_recist
from ctzoo.datasets.deeplesion.png_slices import write_png_hu
from ctzoo.datasets.deeplesion.recist import (
    DEEPLESION_BOX_PAD,
    box_from_points,
    diameters,
)
from ctzoo.io import read_volume, volume_to_sitk
from ctzoo.io.atomic import atomic_folder

IMAGE_SIZE = synth.IMAGE_SIZE
PIXEL_MM = (0.7, 0.9)  # DeepLesion's typical in-plane spacing
CONTEXT_MM = 30.0  # DeepLesion ships about +-30 mm of slices around each key slice
#: Measured long axes kept; nominal ones are log-normal around DeepLesion's median of about 20 mm (a few mm to
#: over 100 mm), truncated to the kind's range and to the room its tissue has.
LONG_AXIS_MM = (5.0, 150.0)
SIZE_MEDIAN_MM, SIZE_LOG_SD = 36.0, 0.7  # 28: the measured axial long axis runs ~0.75x the nominal 3-D one
SMALL_LESION_MM = (5.0, 12.0)
#: Extra attempts a case gets while it holds no lesion yet.
MORE_ATTEMPTS_FOR_FIRST = 300
#: Share of lesions placed against their tissue's edge: juxtapleural nodules, subcapsular liver lesions, ...
ABUT_SHARE = 0.3
SMALL_CASE_EVERY = 6  # cases 1, 7, 13, ... hold only small lesions: mostly lesion-free context slices
NOISE_SD_HU = (3.0, 8.0)
AIR_HU = -1024.0
#: DICOM window per Coarse_lesion_type (bone, mediastinum and lung as DeepLesion's common presets).
WINDOWS = {1: (-450.0, 1050.0), 2: (-175.0, 275.0), 3: (-160.0, 240.0), 4: (-175.0, 275.0), 5: (-1350.0, 150.0),
           6: (-175.0, 275.0), 7: (-175.0, 275.0), 8: (-175.0, 275.0)}
#: Kind weights from DeepLesion's type shares (stats.DEEPLESION_TYPE_COUNTS, %): lung 24, liver 13, kidney 5 (two
#: variants), bone 3 (two variants); nodes carry mediastinum (17) and part of abdomen (22) with the other
#: abdominal organs; soft tissue carries soft tissue (7) and pelvis (9). A slab offers only the kinds it has room for.
KIND_WEIGHTS = {"liver": 13.0, "lung": 24.0, "kidney_cyst": 2.5, "kidney_solid": 2.5, "lymph_node": 14.0,
                "mediastinal_node": 30.0, "soft_tissue": 5.0, "abdomen_organ": 10.0, "bone_lytic": 0.6,
                "bone_sclerotic": 0.5}
#: Node and soft-tissue lesions below the iliac crests (this far down the body) are typed pelvis (8).
PELVIS_BODY_Z = 0.41


@dataclass
class Source:
    """One real CT volume with the regions lesions may occupy."""

    name: str
    image: sitk.Image  # HU float32, LPS
    regions: dict[str, synth.Region]
    body_box: np.ndarray  # (2, 2) LPS x, y min and max of the body
    lung_fraction: np.ndarray  # (Z,) lung area / body area per source slice (thorax vs abdomen)
    body_z: tuple[float, float]  # approximate position in the body (0 vertex, 1 soles) of its top and bottom slice


#: name -> (approximate body position of the top and bottom slice, from the anatomy the scan covers)
SOURCE_BODY_Z = {"example_ct.nii.gz": (0.30, 0.50), "sample_ct (DICOM)": (0.305, 0.33),
                 "aorta_example_ct.nii.gz": (0.15, 0.33)}


def _slab_offset(full: np.ndarray, part: np.ndarray) -> int:
    """Index of the slab of ``full`` (Z, Y, X) equal to ``part``: example_ct_sm is example_ct[82:112], though
    both headers carry the same origin, so example_seg's labels are placed by content, not by geometry."""
    for k in range(full.shape[0] - part.shape[0] + 1):
        if np.array_equal(full[k], part[0]) and np.array_equal(full[k:k + len(part)], part):
            return k
    raise samples.SampleError("example_ct_sm.nii.gz is no slab of example_ct.nii.gz; fetch the samples again")


def _make_source(name: str, image: sitk.Image, labels: np.ndarray | None, labelled: np.ndarray,
                 names: dict[int, str]) -> Source:
    hu = sitk.GetArrayViewFromImage(image)
    body = synth.body_mask(hu)
    lung = synth.lung_mask(hu, body, labels, names, float(np.prod(image.GetSpacing())) / 1000.0)
    regions = synth.source_regions(image, labels, labelled, names, body, lung)
    j, i = np.nonzero(body.any(axis=0))
    corners = [image.TransformIndexToPhysicalPoint((int(a), int(b), 0))[:2]
               for a, b in ((i.min(), j.min()), (i.max(), j.max()))]
    box = np.sort(np.array(corners), axis=0)  # sorted: the source's axes may point either way
    fraction = lung.sum(axis=(1, 2)) / np.maximum(body.sum(axis=(1, 2)), 1)
    return Source(name, image, regions, box, fraction, SOURCE_BODY_Z[name])


@functools.lru_cache(maxsize=1)
def load_sources(folder: str) -> tuple[Source, ...]:
    """The three distinct real volumes (example_ct_sm is a crop of example_ct), with their regions. Cached."""
    root = Path(folder)
    names = {int(k): v for k, v in json.loads((root / samples.LABELS_FILE).read_text()).items()}
    ct = read_volume(root / "example_ct.nii.gz")
    offset = _slab_offset(ct.array, read_volume(root / "example_ct_sm.nii.gz").array)
    seg = read_volume(root / "example_seg.nii.gz", dtype=None).array
    labels = np.zeros(ct.array.shape, np.uint8)
    labels[offset:offset + len(seg)] = seg
    labelled = np.zeros(len(labels), bool)
    labelled[offset:offset + len(seg)] = True
    with warnings.catch_warnings():  # the embedded sample's repaired UIDs are reported by ctzoo info, not here
        warnings.simplefilter("ignore")
        dicom = volume_to_sitk(read_volume(samples.sample_ct_dicom(), progress=False))
    # their label file is LAS, ours LPS, on the same voxel centres: nearest neighbour moves it exactly
    seg_dicom = volume_to_sitk(read_volume(root / "example_seg_dicom.nii.gz", dtype=None))
    dicom_labels = sitk.GetArrayFromImage(sitk.Resample(seg_dicom, dicom, sitk.Transform(), sitk.sitkNearestNeighbor,
                                                        0, sitk.sitkUInt8))
    aorta = volume_to_sitk(read_volume(root / "aorta_example_ct.nii.gz"))
    return (_make_source("example_ct.nii.gz", volume_to_sitk(ct), labels, labelled, names),
            _make_source("sample_ct (DICOM)", dicom, dicom_labels, np.ones(dicom.GetSize()[2], bool), names),
            _make_source("aorta_example_ct.nii.gz", aorta, None, np.zeros(aorta.GetSize()[2], bool), names))


@dataclass(frozen=True)
class CasePlan:
    """Who a case belongs to: DeepLesion's patient/study/series identity, split and demographics."""

    index: int
    patient: int
    study: int
    series: int
    split: int  # 1 train, 2 val, 3 test
    source: int
    gender: str
    age: int
    small: bool

    @property
    def folder(self) -> str:
        return f"{self.patient:06d}_{self.study:02d}_{self.series:02d}"


def plan_cases(cases: int, seed: int, n_sources: int, test_source: int | None = None) -> list[CasePlan]:
    """Patients with 1-2 studies each (>= 3 patients when cases >= 3), split ~60/20/20 by patient.

    All studies of a patient come from the same real volume, as a patient's follow-ups would. With
    ``test_source`` (an index into the sources), every patient of that volume is a test patient and no other
    is: the test split is anatomy the model never saw; the others split ~75/25 into train and val.
    """
    rng = np.random.default_rng((seed, 1))
    patients = cases if cases < 3 else max(3, round(cases / 1.5))
    studies = np.ones(patients, int)
    studies[rng.choice(patients, cases - patients, replace=False)] += 1
    held_out = max(1, round(0.2 * patients)) if patients >= 3 else 0
    split = np.ones(patients, int)
    order = rng.permutation(patients)
    split[order[:held_out]], split[order[held_out:2 * held_out]] = 2, 3
    source_order = rng.permutation(n_sources)
    source = source_order[np.arange(patients) % n_sources]
    if test_source is not None:
        held = source == test_source
        if not 0 <= test_source < n_sources or not held.any() or (~held).sum() < 2:
            raise ValueError(f"holding a scan out needs at least {n_sources} patients (cases >= 4): one for test, "
                             "two from the other scans for train and val")
        split = np.where(held, 3, 1)
        others = order[source[order] != test_source]  # the same random patient order, test patients removed
        split[others[:max(1, round(0.25 * len(others)))]] = 2
    plans = []
    for p in range(patients):
        gender, age = str(rng.choice(["M", "F"])), int(rng.integers(25, 86))
        for study in range(1, studies[p] + 1):
            index = len(plans)
            plans.append(CasePlan(index, p + 1, study, int(rng.integers(1, 4)), int(split[p]),
                                  int(source[p]), gender, age + study - 1,
                                  index % SMALL_CASE_EVERY == 1))
    return plans


def source_index(name: str) -> int:
    """Index of a source volume given its name or the name's stem (``example_ct``, ``sample_ct``,
    ``aorta_example_ct``)."""
    stems = [n.split(" ")[0].removesuffix(".nii.gz") for n in SOURCE_BODY_Z]
    for i, full in enumerate(SOURCE_BODY_Z):
        if name in (full, stems[i]):
            return i
    raise ValueError(f"unknown source {name!r}; choose one of {', '.join(stems)}")


def choose_grid(rng: np.random.Generator, source: Source) -> synth.CaseGrid:
    """A slab of >= half the source's slices (>= 16), a 0.7-0.9 mm/px grid holding the whole body, shifted <= 20 mm."""
    nz = source.image.GetSize()[2]
    dz = source.image.GetSpacing()[2]
    count = int(rng.integers(min(nz, max(16, nz // 2)), nz + 1))
    first = int(rng.integers(0, nz - count + 1))
    z_top = max(source.image.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in (first, first + count - 1))
    extent = source.body_box[1] - source.body_box[0]
    pixel = round(max(rng.uniform(*PIXEL_MM), float(extent.max()) / (IMAGE_SIZE - 16)), 4)
    slack = np.maximum((IMAGE_SIZE - 16) * pixel - extent, 0.0) / 2
    shift = rng.uniform(-1, 1, size=2) * np.minimum(slack, 20.0)
    centre = source.body_box.mean(axis=0) + shift
    origin = np.array([*(centre - (IMAGE_SIZE - 1) / 2 * pixel), z_top])
    return synth.CaseGrid(origin, (pixel, pixel, dz), count, (first, first + count - 1))


def _kind_choices(source: Source, grid: synth.CaseGrid) -> tuple[list[str], np.ndarray]:
    """Kinds with room for at least a 5 mm lesion in this slab, and their normalised weights."""
    names = [n for n, kind in synth.KINDS.items()
             if kind.region in source.regions and synth.largest_radius(source.regions[kind.region],
                                                                      *grid.centre_box(2.5)) >= 2.5]
    weights = np.array([KIND_WEIGHTS[n] for n in names])
    return names, weights / max(weights.sum(), 1e-9)


def _type_code(source: Source, kind: synth.LesionKind, centre: np.ndarray) -> int:
    """The kind's type, except nodes in the thorax (mediastinum, 3) and nodes and soft tissue in the pelvis (8)."""
    if kind.name in ("lymph_node", "soft_tissue") and _body_z(source, float(centre[2])) >= PELVIS_BODY_Z:
        return 8
    if kind.name == "lymph_node":
        source_slice = source.image.TransformPhysicalPointToIndex(tuple(float(c) for c in centre))[2]
        return 3 if source.lung_fraction[source_slice] > 0.25 else kind.type_code
    return kind.type_code


def nominal_long_axis(rng: np.random.Generator, low_mm: float, high_mm: float) -> float:
    """A nominal long axis (mm): log-normal around SIZE_MEDIAN_MM, truncated to [low_mm, high_mm]."""
    if high_mm <= SMALL_LESION_MM[1]:  # the small-lesion cases: log-uniform in their narrow range
        return float(np.exp(rng.uniform(np.log(low_mm), np.log(high_mm))))
    for _ in range(50):
        size = float(SIZE_MEDIAN_MM * np.exp(SIZE_LOG_SD * rng.standard_normal()))
        if low_mm <= size <= high_mm:
            return size
    return float(np.clip(SIZE_MEDIAN_MM, low_mm, high_mm))


def place_lesions(rng: np.random.Generator, source: Source, grid: synth.CaseGrid, count: int,
                  small: bool) -> list[synth.Placed]:
    """Up to ``count`` non-overlapping lesions inside their tissue, the grid and the slab, RECIST long axis 5-150 mm."""
    names, weights = _kind_choices(source, grid)
    placed: list[synth.Placed] = []
    for attempt in range(30 * count + MORE_ATTEMPTS_FOR_FIRST):
        # a case needs one lesion: a slab with little room gets more attempts before it is given up
        if len(placed) == count or not names or (placed and attempt >= 30 * count):
            break
        kind = synth.KINDS[names[rng.choice(len(names), p=weights)]]
        region = source.regions[kind.region]
        long_axis = nominal_long_axis(rng, *(SMALL_LESION_MM if small else kind.long_axis_mm))
        # no larger than the tissue holds here (the centre with most room qualifies then, so a centre exists)
        long_axis = min(long_axis, 2 * synth.largest_radius(region, *grid.centre_box(long_axis / 2)))
        chosen = synth.pick_centre(rng, region, long_axis / 2, *grid.centre_box(long_axis / 2),
                                   abut=rng.random() < ABUT_SHARE)
        if long_axis < LONG_AXIS_MM[0] or chosen is None:
            continue
        centre = region.candidates_lps[chosen]
        if any(np.linalg.norm(centre - p.lesion.centre) < long_axis / 2 + p.lesion.max_radius + 2 for p in placed):
            continue
        tissue = synth.tissue_stats(source.image, region.candidates_ijk[chosen], long_axis / 2)
        if not synth.can_contrast(kind.hu_range, tissue.median_hu) and kind.name in synth.SIBLING:
            kind = synth.KINDS[synth.SIBLING[kind.name]]
        if not synth.can_contrast(kind.hu_range, tissue.median_hu) or tissue.median_hu > kind.max_tissue_hu:
            continue  # e.g. a node against soft tissue of its own density: a reader would not see it either
        type_code = _type_code(source, kind, centre)
        style = draw_style(rng, kind.name, long_axis)
        # the source's own voxel blurs the anatomy's edges: a lesion's edge is no sharper
        edge_mm = float(min(source.image.GetSpacing()[:2]))
        candidate = synth.rasterise(synth.make_lesion(rng, kind, centre, long_axis, tissue, type_code, style,
                                                      edge_mm), grid)
        if not synth.inside_region(candidate, region, grid):
            continue
        _, _, measured_mm = _recist(candidate.key_mask(), grid)
        if LONG_AXIS_MM[0] <= measured_mm[0] <= LONG_AXIS_MM[1]:
            placed.append(candidate)
    return placed


def _recist(mask: np.ndarray, grid: synth.CaseGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """End points (4, 2) 0-based, rounded as written; diameters in pixels (2,) and mm (2,)."""
    points = np.round(measure_recist(mask, grid.spacing[:2]).reshape(4, 2) + 1, 3) - 1  # what the CSV will hold
    pixels, mm = diameters(points, grid.spacing[:2])
    return points, pixels, mm


def _case_image(rng: np.random.Generator, source: Source, grid: synth.CaseGrid, placed: list[synth.Placed], first: int,
                last: int, noise_sd: float) -> np.ndarray:
    """(last - first + 1, 512, 512) HU of grid slices first..last: resampled CT, lesions blended in, noise added."""
    reference = grid.reference((0, 0, first), (IMAGE_SIZE, IMAGE_SIZE, last - first + 1))
    # NaN marks pixels outside the scanned field of view (ITK's own inside test); they become air, noise-free
    hu = sitk.GetArrayFromImage(sitk.Resample(source.image, reference, sitk.Transform(), sitk.sitkLinear, np.nan,
                                              sitk.sitkFloat32))
    for p in placed:  # lesions lie inside the body, so never outside the field of view
        k0, k1 = max(p.first[2], first), min(p.first[2] + p.alpha.shape[0] - 1, last)
        if k0 <= k1:
            box = (slice(p.first[1], p.first[1] + p.alpha.shape[1]), slice(p.first[0], p.first[0] + p.alpha.shape[2]))
            own = slice(k0 - p.first[2], k1 - p.first[2] + 1)
            case = (slice(k0 - first, k1 - first + 1), *box)
            hu[case] = p.alpha[own] * p.hu[own] + (1 - p.alpha[own]) * hu[case]
    for plane in hu:  # slice by slice: a whole-slab noise array would double the memory held
        fov = np.isfinite(plane)
        plane += noise_sd * rng.standard_normal(plane.shape, dtype=np.float32) * fov
        plane[~fov] = AIR_HU
    return np.clip(hu, AIR_HU, 3071.0, out=hu)


def _body_z(source: Source, z_mm: float) -> float:
    """Approximate position in the body (0 vertex .. 1 soles) of LPS height ``z_mm`` in ``source``."""
    size = source.image.GetSize()
    ends = [source.image.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in (0, size[2] - 1)]
    top, bottom = max(ends), min(ends)
    return source.body_z[0] + (top - z_mm) / (top - bottom) * (source.body_z[1] - source.body_z[0])


def build_case(plan: CasePlan, source: Source, seed: int, root: Path,
               write_slice: Callable[[Path, np.ndarray], object] = write_png_hu
               ) -> tuple[list[LesionRow], list[dict], dict]:
    """Draw, measure and write one case; returns its DL_info rows, lesion records and series record.

    ``write_slice(path, hu)`` writes one (512, 512) HU slice as a DeepLesion PNG (possibly later, in a thread).
    """
    rng = np.random.default_rng((seed, 2, plan.index))
    grid = choose_grid(rng, source)
    placed = sorted(place_lesions(rng, source, grid, int(rng.integers(1, 5)), plan.small), key=lambda p: p.key_slice)
    if not placed:
        raise RuntimeError(f"case {plan.folder}: no lesion fits {source.name}; try another seed")
    s, _, dz = grid.spacing
    ranges = []
    for p in placed:
        # about +-30 mm of context as DeepLesion ships, more when the lesion itself is taller
        half = round(max(CONTEXT_MM, p.lesion.max_radius + dz) / dz)
        ranges.append((max(0, p.key_slice - half), min(grid.slices - 1, p.key_slice + half)))
    written = sorted({k for lo, hi in ranges for k in range(lo, hi + 1)})
    noise_sd = float(rng.uniform(*NOISE_SD_HU))
    hu = _case_image(rng, source, grid, placed, written[0], written[-1], noise_sd)
    for k in written:
        write_slice(root / "Images_png" / plan.folder / f"{k + 1:03d}.png", hu[k - written[0]])
    touched = sorted({int(p.first[2] + k) + 1 for p in placed for k in np.flatnonzero((p.alpha > 0).any(axis=(1, 2)))})
    rows, records = [], []
    for number, (p, (lo, hi)) in enumerate(zip(placed, ranges), start=1):
        mask = p.key_mask()
        points, pixels, mm = _recist(mask, grid)
        key = p.key_slice + 1
        mask_file = f"masks/{plan.folder}/{key:03d}_{number}.png"
        (root / mask_file).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8)).save(root / mask_file, format="PNG")
        rows_cols = np.argwhere(mask).mean(axis=0)
        z = float(grid.points(np.array([[0, 0, p.key_slice]]))[0, 2])
        code = p.lesion.type_code
        rows.append(LesionRow(
            file_name=f"{plan.folder}_{key:03d}.png", patient_index=plan.patient, study_index=plan.study,
            series_id=plan.series, key_slice_index=key, measurement_coordinates=tuple((points + 1).ravel().tolist()),
            bounding_box=tuple((box_from_points(points, DEEPLESION_BOX_PAD) + 1).round(3).tolist()),
            lesion_diameters_px=tuple(pixels.round(4).tolist()),
            normalized_lesion_location=(round(rows_cols[1] / IMAGE_SIZE, 4), round(rows_cols[0] / IMAGE_SIZE, 4),
                                        round(_body_z(source, z), 4)),
            coarse_lesion_type=code if plan.split in (2, 3) else -1, possibly_noisy=False,
            slice_range=(lo + 1, hi + 1), spacing_mm_px=(s, s, dz), image_size=(IMAGE_SIZE, IMAGE_SIZE),
            dicom_windows=WINDOWS[code], patient_gender=plan.gender, patient_age=float(plan.age),
            train_val_test=plan.split))
        voxel_mm3 = s * s * dz
        records.append({
            "file_name": rows[-1].file_name, "folder": plan.folder, "key_slice": key, "lesion": number,
            "mask_file": mask_file, "split": SPLITS[plan.split], "type": code, "type_name": LESION_TYPES[code],
            "kind": p.lesion.kind.name, "organ": p.lesion.kind.organ, "style": p.lesion.style.name,
            "grain_sd_hu": round(p.lesion.grain_sd, 2), "hu": round(p.lesion.hu, 2),
            "hu_range": list(p.lesion.kind.hu_range), "texture_sd_hu": p.lesion.kind.texture_sd,
            "tissue_hu": round(p.lesion.tissue_hu, 2), "volume_mm3": round(float(p.alpha.sum()) * voxel_mm3, 1),
            "long_axis_mm": round(float(mm[0]), 3), "short_axis_mm": round(float(mm[1]), 3),
            "centre_lps_mm": [round(float(c), 3) for c in p.lesion.centre], "source": source.name})
    series = {"folder": plan.folder, "patient": plan.patient, "split": SPLITS[plan.split], "source": source.name,
              "source_slices": list(grid.source_slices), "slices": grid.slices, "spacing_mm": list(grid.spacing),
              "noise_sd_hu": round(noise_sd, 3), "small_lesions_only": plan.small,
              "written_slices": [k + 1 for k in written], "lesion_slices": touched}
    return rows, records, series


def prepare_target(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} is not empty; pass --force to replace it")


def _write_cases_serially(plans: list[CasePlan], sources: tuple[Source, ...], seed: int, root: Path,
                          progress: bool) -> list[tuple[list[LesionRow], list[dict], dict]]:
    # PNG encoding dominates the run time and Pillow releases the GIL while it encodes: one case's slices
    # are encoded in threads while the next case is built (at most two cases' slices are held)
    built = []
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        pending: list[Future] = []

        def submit(path: Path, hu: np.ndarray) -> None:
            pending.append(pool.submit(write_png_hu, path, hu))  # the current case's list

        for plan in tqdm(plans, desc="deeplesion-mini", unit="case", disable=not progress):
            previous, pending = pending, []
            built.append(build_case(plan, sources[plan.source], seed, root, submit))
            for future in previous:
                future.result()  # re-raises a failed write
        for future in pending:
            future.result()
    return built


def _init_case_worker(folder: str) -> None:
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)  # the processes are the parallelism
    load_sources(folder)


def _build_case_in_worker(plan: CasePlan, folder: str, seed: int, root: Path):
    return build_case(plan, load_sources(folder)[plan.source], seed, root)


def _write_cases_in_processes(plans: list[CasePlan], folder: str, seed: int, root: Path, workers: int,
                              progress: bool) -> list[tuple[list[LesionRow], list[dict], dict]]:
    # every case draws from its own generator (seed, plan index), so the order the processes finish in
    # cannot change a byte; "spawn" because ITK's thread pool does not survive a fork
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_case_worker,
                             initargs=(folder,)) as pool:
        futures = [pool.submit(_build_case_in_worker, plan, folder, seed, root) for plan in plans]
        bar = tqdm(total=len(plans), desc="deeplesion-mini", unit="case", disable=not progress)
        built = []
        for future in futures:
            built.append(future.result())
            bar.update()
        bar.close()
    return built


def make_deeplesion_mini(out: Path, cases: int = 24, seed: int = 0, force: bool = False,
                         progress: bool = True, workers: int = 1, test_source: str | None = None) -> Path:
    """Write a miniature DeepLesion of ``cases`` series to ``out`` (see the module docstring); return ``out``.

    Deterministic for a seed, whatever ``workers`` (processes building cases; 1 builds them here, encoding
    PNGs in threads). Built in a hidden staging folder beside ``out`` and renamed into place at the end
(:func:`~ctzoo.io.atomic.atomic_folder`, which also removes the staging folders of killed builds).
    A non-empty ``out`` is refused unless ``force``. Fetches the TotalSegmentator samples if the cache lacks them.
    ``test_source`` (see :func:`source_index`) puts every case of that real volume, and only those, in the test
    split (:func:`plan_cases`).
    """
    if cases < 1:
        raise ValueError("cases must be at least 1")
    if workers < 1:
        raise ValueError("workers must be at least 1")
    out = Path(out)
    prepare_target(out, force)
    folder = samples.fetch_samples()
    held_out = None if test_source is None else source_index(test_source)
    plans = plan_cases(cases, seed, len(SOURCE_BODY_Z), held_out)  # one entry per source volume
    progress = progress and sys.stderr.isatty()
    with atomic_folder(out) as partial:
        workers = min(workers, cases)
        if workers == 1:
            built = _write_cases_serially(plans, load_sources(str(folder)), seed, partial, progress)
        else:
            built = _write_cases_in_processes(plans, str(folder), seed, partial, workers, progress)
        rows = [row for case_rows, _, _ in built for row in case_rows]
        lesions = [lesion for _, case_lesions, _ in built for lesion in case_lesions]
        series = [case_series for _, _, case_series in built]
        write_dl_info(rows, partial / "DL_info.csv")
        test_name = None if held_out is None else list(SOURCE_BODY_Z)[held_out]
        summary = {"seed": seed, "cases": cases, "test_source": test_name, "series": series, "lesions": lesions}
        (partial / "lesions.json").write_text(json.dumps(summary, indent=1) + "\n")
        (partial / "NOTICE.md").write_text(notice(seed, cases, test_name))
        shutil.copyfile(folder / "LICENSE", partial / "LICENSE")
    return out


def notice(seed: int, cases: int, test_source: str | None = None) -> str:
    """NOTICE.md: where the images come from and every choice the generator made."""
    kinds = "\n".join(f"| {k.name} | {k.type_code} | {k.organ} | {k.hu_range[0]:g}..{k.hu_range[1]:g} | "
                      f"{k.long_axis_mm[0]:g}-{k.long_axis_mm[1]:g} |" for k in synth.KINDS.values())
    (px0, px1), (sd0, sd1), (small0, small1) = PIXEL_MM, NOISE_SD_HU, SMALL_LESION_MM
    node_fat, node_max, node_gap = synth.KINDS["lymph_node"].max_tissue_hu, synth.NODE_MAX_HU, synth.NODE_VESSEL_GAP_MM
    every = SMALL_CASE_EVERY
    split_note = ("Three real scans recur across patients and splits: use this to test pipelines, not to measure "
                  "generalisation." if test_source is None else
                  f"Held-out source: every test case, and no other, comes from `{test_source}`, so the test split "
                  "is anatomy that training and validation never show; train and val share the other two scans.")
    return f"""# DeepLesion miniature (ctzoo make-deeplesion-mini, seed {seed}, {cases} cases)

The images derive from the sample CT of **TotalSegmentator 2.18.0** (Apache-2.0, see `LICENSE`):
`example_ct.nii.gz` with `example_seg.nii.gz` (labels of its slices 82-111, the slab `example_ct_sm.nii.gz`
is), the embedded 20-slice DICOM series with `example_seg_dicom.nii.gz`, and `aorta_example_ct.nii.gz`
(no labels). The anatomy is real; every lesion is **synthetic**. {split_note}

Layout as DeepLesion: `DL_info.csv` (1-based pixels), `Images_png/{{patient}}_{{study}}_{{series}}/{{slice}}.png`
(uint16 = HU + 32768, only each lesion's Slice_range). Extras: `masks/{{folder}}/{{slice}}_{{k}}.png` (uint8
0/1, the folder's k-th lesion on its key slice) and `lesions.json` (true type, organ, HU, volume; per series
the source slab, spacing, noise, written slices and slices any lesion touches).

* Patients: max(3, round(cases / 1.5)) (one per case below 3 cases), 1-2 studies each, all from one scan.
  Split by patient 20 % val, 20 % test (>= 1 each), rest train; types only for val/test (train -1) as in
  DeepLesion, true types in `lesions.json`. Series_ID 1-3, sex and age 25-85 random, Possibly_noisy 0.
* View: a slab of >= half the scan's slices (>= 16), z spacing kept (3, 2 or 1.5 mm), slice 1 the most
  superior; in-plane SimpleITK linear resampling to {px0}-{px1} mm/px (more if the body needs it), 512 x 512,
  body centred and shifted <= 20 mm, -1024 HU outside the scanned field, white noise sd {sd0:g}-{sd1:g} HU.
* Lesions: 1-4 a case, kinds weighted toward DeepLesion's type shares where the slab has room; an ellipsoid
  (random axes 0.6-1 x, random rotation) whose radius varies by a smooth random degree-2/3 polynomial of
  direction (10-25 %) and, by style, lobes or spicules; styles round, lobulated, spiculated, rim-enhancing
  (+30-90 HU wall), necrotic (core 25-50 HU lower) or cavitating (air core, lung). Nominal long axis
  log-normal around {SIZE_MEDIAN_MM:g} mm ({small0:g}-{small1:g} mm log-uniform in every {every}th case from the
  second), truncated to the kind's range and capped by the room in the tissue, kept if the measured long axis
  is {LONG_AXIS_MM[0]:g}-{LONG_AXIS_MM[1]:g} mm; {ABUT_SHARE:.0%} placed against their tissue's edge (pleura, organ
  capsule). Base HU in the kind's range, >= {synth.MIN_CONTRAST_HU:g} HU from the median of a 5 mm shell around it
  (kidney cyst/solid and lytic/sclerotic bone swap, else rejected); texture: 4 plane waves of 4-12 mm, clipped
  to the range, plus grain with the shell's own noise (sd from neighbour differences, <= {synth.MAX_GRAIN_SD_HU:g} HU,
  correlated over a source voxel); partial-volume edge one source voxel wide, averaged over the slice
  thickness. Wholly inside its tissue (checked on the case grid):

| kind | type | tissue | HU | long axis mm |
|---|---|---|---|---|
{kinds}

* Tissue: TotalSegmentator labels on labelled slices (liver, kidneys, spleen/pancreas/adrenals, vertebrae and
  large bones, lungs, aorta/IVC, back/psoas/gluteal muscles); else body = largest component > -500 HU, holes filled per slice; lung = air < -400 HU in it,
  components >= 200 ml; fat = -190..-30 HU. Nodes: unlabelled tissue -190..{node_max:g} HU within {node_gap:g} mm
  of the aorta/IVC, surroundings <= {node_fat:g} HU; type 3 where the lungs fill over 25 % of the body slice,
  else 2; mediastinal nodes (type 3) also in fat between the two lungs' inner edges (HU rules). Nodes and soft
  tissue below the iliac crests (body z >= {PELVIS_BODY_Z:g}) are type 8. Lung nodules keep
  {synth.LUNG_MIDLINE_MM:g} mm off the midline (no trachea). Bone lesions (type 1) only in labelled bone.
* RECIST by `measure_recist` on the key slice (largest cross-section): long axis = max Feret diameter
  between mask pixel centres; short axis = longest inside chord perpendicular to it. Boxes: end points
  padded by 5 px. Slice_range: +-max(30 mm, lesion radius + one slice), clipped to the series.
* Normalized_lesion_location: mask centroid x / 512, y / 512, and z = approximate body position (vertex 0,
  soles 1) from the anatomy each scan covers: example_ct 0.30-0.50, DICOM sample 0.305-0.33, aorta
  example 0.15-0.33. DICOM_windows: lung -1350, 150; mediastinum -160, 240; others -175, 275.
"""
