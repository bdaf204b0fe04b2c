"""Synthetic lesions for the DeepLesion miniature: where they may go, their shape, their HU, and drawing them.

Lesions live in LPS millimetres, so one lesion can be drawn on any grid (:func:`rasterise` on a
:class:`CaseGrid`, the 512 x 512 view of one case).

* **Regions** (:func:`source_regions`): per real CT volume, the tissue each lesion kind must lie in —
  organ labels where TotalSegmentator labelled the slice, HU rules elsewhere (lung = large air components
  inside the body, fat = -190..-30 HU inside the body) — each with a distance map (mm to the region's
  outside) so a centre at distance >= r holds a whole ball of radius r.
* **Shape** (:class:`Lesion`): an ellipsoid whose radius is scaled by ``1 + P(u)``, a random smooth
  degree-2/3 polynomial of the direction ``u`` bounded by ``amp`` (10-25 %), plus the lobes or spicules of its
  :class:`~ctzoo.datasets.deeplesion.lesion_shapes.LesionStyle`: a star-shaped lesion, not only a blob.
* **HU**: a base value from the kind's range, at least :data:`MIN_CONTRAST_HU` from the surrounding
  tissue where the range allows, plus a low-frequency texture (a few random plane waves), the style's wall or
  core, and grain with the surrounding tissue's own noise (:func:`tissue_stats`): a lesion as smooth as a
  drawing would be found by its missing noise alone.
* **Edge**: partial volume over the source's own voxel size, in-plane and across the slice thickness
  (:func:`rasterise`), so a lesion's edge is as sharp as the anatomy around it, no sharper.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ctzoo.datasets.deeplesion.lesion_shapes import LesionStyle
from ctzoo.datasets.deeplesion.recist import DEEPLESION_BOX_PAD

#: Lesion and tissue HU must differ by this much where the kind's range allows it (else: the farthest end).
MIN_CONTRAST_HU = 20.0
#: A lymph node's centre lies at most this far (mm) beyond its radius from the aorta or IVC.
NODE_VESSEL_GAP_MM = 15.0
#: Lung-nodule centres keep this far (mm) from the body's midline so they never sit in the trachea.
LUNG_MIDLINE_MM = 25.0
#: Nodes may sit in unlabelled tissue up to this HU (connective tissue, small vessels), not in bone or contrast.
NODE_MAX_HU = 150.0
MUSCLE_PREFIXES = ("autochthon", "iliopsoas", "gluteus")
#: TotalSegmentator labels of bones large enough to hold a lesion (ribs and small bones have no room).
BONE_PREFIXES = ("vertebrae_", "sacrum", "hip_", "femur_", "sternum", "humerus_", "scapula_")
#: Abdominal organs other than liver and kidney (their lesions are DeepLesion's "abdomen" type).
ABDOMINAL_ORGANS = ("spleen", "pancreas", "adrenal_gland_left", "adrenal_gland_right")
#: Grain added inside a lesion is the tissue's noise, capped (a shell over mixed tissue overestimates it).
MAX_GRAIN_SD_HU = 25.0
FAT_HU = (-190.0, -30.0)
IMAGE_SIZE = 512  # DeepLesion's slices (and this miniature's)
#: Slice index runs head to feet (z = origin - k * dz), as DICOM series usually do.
OUTPUT_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
#: An abutting lesion's surface comes this close (mm) to its region's edge: an organ wall, the pleura.
ABUT_MM = 2.5
#: At most this many candidate centres are kept per region (a deterministic stride through the rest).
_MAX_CANDIDATES = 200_000


@dataclass(frozen=True)
class LesionKind:
    """A lesion kind: its DeepLesion type code, the tissue it lives in, its HU range and size range (mm)."""

    name: str
    type_code: int  # Coarse_lesion_type 1-8; lymph nodes are 3 (mediastinum) in the thorax, else 2 (abdomen)
    region: str  # key of source_regions()
    organ: str
    hu_range: tuple[float, float]
    long_axis_mm: tuple[float, float]
    texture_sd: float  # HU of the lesion's internal texture
    max_tissue_hu: float = np.inf  # surroundings must be at most this dense (nodes are seen against fat)


KINDS = {kind.name: kind for kind in (
    LesionKind("liver", 4, "liver", "liver", (10.0, 70.0), (5.0, 150.0), 6.0),  # hypodense: metastasis, cyst
    LesionKind("lung", 5, "lung", "lung", (-50.0, 100.0), (5.0, 100.0), 8.0),  # solid nodule or mass
    LesionKind("kidney_cyst", 6, "kidney", "kidney", (0.0, 20.0), (5.0, 80.0), 2.0),
    LesionKind("kidney_solid", 6, "kidney", "kidney", (30.0, 60.0), (5.0, 80.0), 6.0),
    LesionKind("lymph_node", 2, "node", "tissue beside the aorta/IVC", (20.0, 60.0), (8.0, 60.0), 4.0,
               -60.0),
    LesionKind("mediastinal_node", 3, "mediastinum", "fat between the lungs", (20.0, 60.0), (8.0, 60.0), 4.0,
               -30.0),
    LesionKind("soft_tissue", 7, "soft", "muscle/fat", (20.0, 60.0), (8.0, 150.0), 6.0),
    LesionKind("abdomen_organ", 2, "abdomen_organ", "spleen/pancreas/adrenal", (0.0, 60.0), (5.0, 80.0), 6.0),
    LesionKind("bone_lytic", 1, "bone", "vertebra/pelvis/long bone", (10.0, 90.0), (5.0, 60.0), 8.0),
    LesionKind("bone_sclerotic", 1, "bone", "vertebra/pelvis/long bone", (450.0, 900.0), (5.0, 60.0), 30.0),
)}
#: If a kind cannot contrast with its tissue, its sibling is used instead (a cyst in dense kidney, ...).
SIBLING = {"kidney_cyst": "kidney_solid", "kidney_solid": "kidney_cyst", "bone_lytic": "bone_sclerotic",
           "bone_sclerotic": "bone_lytic"}


@dataclass
class Region:
    """Where lesions of one kind may be centred on a source grid."""

    name: str
    image: sitk.Image  # uint8 mask on the source grid (LPS geometry), for checks on other grids
    candidates_ijk: np.ndarray  # (N, 3) int source indices (i, j, k) of possible centres
    candidates_lps: np.ndarray  # (N, 3) their LPS mm
    margin_mm: float  # half a source voxel's diagonal: what the coarse distance map may be off by
    distance_mm: np.ndarray  # (N,) distance from each to the region's outside
    vessel_mm: np.ndarray | None = None  # (N,) distance to the aorta/IVC (lymph nodes only)


def _label_ids(names: dict[int, str], wanted) -> list[int]:
    return [value for value, name in names.items() if wanted(name)]


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    """(Z, Y, X) bool with the holes of every axial slice filled.

    One 2-D fill over all slices laid side by side, one empty column apart (20x faster than a call per
    slice): a hole enclosed within a slice stays enclosed, background at a slice's edge reaches the border.
    """
    z, y, x = mask.shape
    tiled = np.zeros((y, z, x + 1), np.uint8)
    tiled[:, :, :x] = mask.transpose(1, 0, 2)
    filled = sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray(tiled.reshape(y, z * (x + 1)))))
    return filled.reshape(y, z, x + 1)[:, :, :x].transpose(1, 0, 2).astype(bool)


def body_mask(hu: np.ndarray) -> np.ndarray:
    """(Z, Y, X) bool: the largest connected component above -500 HU, holes filled slice by slice.

    Filling per slice closes the lungs (a hole in every axial slice) even when the airway reaches
    the top of the volume, which a 3-D fill would leave open.
    """
    components = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray((hu > -500).astype(np.uint8))),
                                       sortByObjectSize=True)
    return _fill_slices(sitk.GetArrayViewFromImage(components) == 1)


def lung_mask(hu: np.ndarray, body: np.ndarray, labels: np.ndarray | None, names: dict[int, str],
              voxel_ml: float) -> np.ndarray:
    """(Z, Y, X) bool lungs: TotalSegmentator's lobes where the labels have them, else air inside the body in
    components of >= 200 ml and >= 10 % of the largest (bowel gas is smaller)."""
    lung_ids = _label_ids(names, lambda n: n.startswith("lung_"))
    if labels is not None and np.isin(labels, lung_ids).any():
        return np.isin(labels, lung_ids)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray((body & (hu < -400)).astype(
        np.uint8))), sortByObjectSize=True)
    labels = sitk.GetArrayFromImage(components)
    sizes = np.bincount(labels.ravel())[1:] * voxel_ml
    if not len(sizes):
        return np.zeros_like(body)
    keep = np.flatnonzero((sizes >= 200.0) & (sizes >= 0.1 * sizes[0])) + 1
    # vessels and bronchial walls are lung too (as in TotalSegmentator's lobes): fill them in per slice
    return _fill_slices(np.isin(labels, keep)) & body


def between_lungs(lung: np.ndarray) -> np.ndarray:
    """(Z, Y, X) bool: pixels of each image row strictly between the left lung's and the right lung's inner
    edges, on rows that cross both lungs (the midline split is the body's own: the lungs' bounding columns)."""
    z, y, x = lung.shape
    columns = np.flatnonzero(lung.any(axis=(0, 1)))
    if not len(columns):
        return np.zeros_like(lung)
    middle = (columns.min() + columns.max()) // 2
    index = np.arange(x)
    inner_left = np.where(lung[..., :middle], index[:middle], -1).max(axis=-1)  # (Z, Y) last lung pixel left
    inner_right = np.where(lung[..., middle:], index[middle:], x).min(axis=-1)  # first lung pixel right
    both = (inner_left >= 0) & (inner_right < x)
    return both[..., None] & (index > inner_left[..., None]) & (index < inner_right[..., None])


def _fat(hu: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Fat voxels, closed by one voxel so noisy voxels punch no holes."""
    fat = body & (hu >= FAT_HU[0]) & (hu <= FAT_HU[1])
    # dilation then erosion by the 3-D cross; border_value=1 keeps the erosion from eating the volume's faces
    closed = ndimage.binary_erosion(ndimage.binary_dilation(fat), border_value=1)
    return closed & body


def _region(name: str, mask: np.ndarray, reference: sitk.Image, min_radius_mm: float,
            vessels: np.ndarray | None = None, centre_ok: np.ndarray | None = None) -> Region:
    """Distance map of ``mask`` and the voxels far enough inside to centre the smallest lesion."""
    mask = mask.copy()
    # the volume's own faces are a region boundary too: nothing may be centred where it could leave the scan
    mask[[0, -1]] = False
    mask[:, [0, -1]] = False
    mask[:, :, [0, -1]] = False
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.CopyInformation(reference)
    distance = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(image, insideIsPositive=True, squaredDistance=False,
                                                                   useImageSpacing=True))
    ok = mask & (distance >= min_radius_mm) & (True if centre_ok is None else centre_ok)
    flat = np.flatnonzero(ok)
    flat = flat[:: max(1, len(flat) // _MAX_CANDIDATES + 1)] if len(flat) > _MAX_CANDIDATES else flat
    kji = np.stack(np.unravel_index(flat, mask.shape), axis=1)
    ijk = kji[:, ::-1]
    affine = np.asarray(reference.GetDirection()).reshape(3, 3) * np.asarray(reference.GetSpacing())
    lps = ijk @ affine.T + np.asarray(reference.GetOrigin())
    vessel_mm = None
    if vessels is not None:
        vessel_image = sitk.GetImageFromArray(vessels.astype(np.uint8))
        vessel_image.CopyInformation(reference)
        vessel_distance = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
            vessel_image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True))
        vessel_mm = vessel_distance.ravel()[flat]
    return Region(name, image, ijk, lps, 0.5 * float(np.linalg.norm(reference.GetSpacing())), distance.ravel()[flat],
                  vessel_mm)


def source_regions(image: sitk.Image, labels: np.ndarray | None, labelled: np.ndarray, names: dict[int, str],
                   body: np.ndarray, lung: np.ndarray) -> dict[str, Region]:
    """Regions of one real CT volume.

    ``image``: the CT (HU, LPS); ``labels``: (Z, Y, X) organ labels on its grid or None; ``labelled``: (Z,) bool,
    the slices the labels cover (elsewhere only HU rules are used, and organ kinds are not placed);
    ``body``, ``lung``: (Z, Y, X) bool from :func:`body_mask` and :func:`lung_mask`.
    """
    hu = sitk.GetArrayViewFromImage(image)
    spacing = image.GetSpacing()
    half_diagonal = 0.5 * float(np.linalg.norm(spacing))  # margin for the source grid's coarseness
    min_radius = 2.5 + half_diagonal
    known = np.zeros_like(body) if labels is None else (labelled[:, None, None] & np.ones_like(body))
    labels = np.zeros(hu.shape, np.uint8) if labels is None else labels
    fat = _fat(hu, body) & ~lung
    ids = {name: _label_ids(names, lambda n, wanted=wanted: n in wanted) for name, wanted in (
        ("liver", ("liver",)), ("kidney", ("kidney_left", "kidney_right")),  # not their cyst labels
        ("vessels", ("aorta", "inferior_vena_cava")), ("abdomen_organ", ABDOMINAL_ORGANS))}
    ids["bone"] = _label_ids(names, lambda n: n.startswith(BONE_PREFIXES))
    muscle = known & np.isin(labels, _label_ids(names, lambda n: n.startswith(MUSCLE_PREFIXES)))
    columns = np.flatnonzero(body.any(axis=(0, 1)))
    midline = 0.5 * (columns.min() + columns.max()) if len(columns) else hu.shape[2] / 2
    off_midline = (np.abs(np.arange(hu.shape[2]) - midline) * spacing[0] >= LUNG_MIDLINE_MM)[None, None, :]
    vessels = known & np.isin(labels, ids["vessels"])
    masks = {
        "liver": (known & np.isin(labels, ids["liver"]), {}),
        "kidney": (known & np.isin(labels, ids["kidney"]), {}),
        "abdomen_organ": (known & np.isin(labels, ids["abdomen_organ"]), {}),
        "bone": (known & np.isin(labels, ids["bone"]), {}),  # labelled slices only: contrast mimics bone's HU
        "lung": (lung, {"centre_ok": off_midline}),
        # nodes displace the unlabelled fat and connective tissue around the great vessels
        "node": (known & body & ~lung & (labels == 0) & (hu >= FAT_HU[0]) & (hu <= NODE_MAX_HU), {"vessels": vessels}),
        "soft": (muscle | (fat & (~known | (labels == 0))), {}),
        # mediastinal nodes displace the fat between the lungs (HU rules: no chest here has labels)
        "mediastinum": (fat & between_lungs(lung) & (~known | (labels == 0)), {}),
    }
    regions = {name: _region(name, mask, image, min_radius, **extra)
               for name, (mask, extra) in masks.items() if mask.any() and (name != "node" or vessels.any())}
    return {name: region for name, region in regions.items() if len(region.distance_mm)}


def _in_box(region: Region, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    return np.all((region.candidates_lps >= low) & (region.candidates_lps <= high), axis=1)


def pick_centre(rng: np.random.Generator, region: Region, radius_mm: float, low: np.ndarray,
                high: np.ndarray, abut: bool = False) -> int | None:
    """Index into ``region.candidates_*`` of a random centre holding a ball of ``radius_mm``, inside [low, high] mm.

    ``abut``: only centres whose ball reaches within :data:`ABUT_MM` of the region's edge (a nodule on the
    pleura, a lesion under the liver's capsule); falls back to any centre when none does.
    """
    ok = _in_box(region, low, high) & (region.distance_mm >= radius_mm + region.margin_mm)
    if abut and (ok & (region.distance_mm <= radius_mm + region.margin_mm + ABUT_MM)).any():
        ok &= region.distance_mm <= radius_mm + region.margin_mm + ABUT_MM
    if region.vessel_mm is not None:
        ok &= region.vessel_mm <= radius_mm + region.margin_mm + NODE_VESSEL_GAP_MM
    choices = np.flatnonzero(ok)
    return int(choices[rng.integers(len(choices))]) if len(choices) else None


def largest_radius(region: Region, low: np.ndarray, high: np.ndarray) -> float:
    """The largest ball radius (mm) any candidate centre inside [low, high] holds (0 when none)."""
    ok = _in_box(region, low, high)
    if region.vessel_mm is not None:  # a node as large as its room must still reach a vessel
        ok &= region.vessel_mm - NODE_VESSEL_GAP_MM <= region.distance_mm
    return float(region.distance_mm[ok].max()) - region.margin_mm if ok.any() else 0.0


def choose_hu(rng: np.random.Generator, hu_range: tuple[float, float], tissue_hu: float) -> float:
    """A base HU in ``hu_range`` at least MIN_CONTRAST_HU from ``tissue_hu``; the farthest end if none is."""
    lo, hi = hu_range
    parts = [(lo, min(hi, tissue_hu - MIN_CONTRAST_HU)), (max(lo, tissue_hu + MIN_CONTRAST_HU), hi)]
    parts = [(a, b) for a, b in parts if b > a]
    if not parts:
        return lo if abs(lo - tissue_hu) >= abs(hi - tissue_hu) else hi
    widths = np.array([b - a for a, b in parts])
    u = rng.uniform(0.0, widths.sum())  # uniform over both parts together
    index = int(u >= widths[0])
    return float(parts[index][0] + u - widths[:index].sum())


def can_contrast(hu_range: tuple[float, float], tissue_hu: float) -> bool:
    return hu_range[0] <= tissue_hu - MIN_CONTRAST_HU or hu_range[1] >= tissue_hu + MIN_CONTRAST_HU


def _monomials(u: np.ndarray) -> np.ndarray:
    """(N, 16) degree-2 and degree-3 monomials of unit directions ``u`` (N, 3): real spherical harmonics <= 3."""
    x, y, z = u[:, 0], u[:, 1], u[:, 2]
    return np.stack([x * x, y * y, z * z, x * y, x * z, y * z,
                     x ** 3, y ** 3, z ** 3, x * x * y, x * x * z, y * y * x, y * y * z, z * z * x, z * z * y,
                     x * y * z], axis=1)


def _sphere(count: int = 600) -> np.ndarray:
    """(count, 3) near-uniform unit vectors (Fibonacci sphere), to bound the shape polynomial."""
    k = np.arange(count) + 0.5
    z = 1 - 2 * k / count
    phi = np.pi * (1 + 5 ** 0.5) * k
    r = np.sqrt(1 - z * z)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


_SPHERE = _sphere()
#: Normalised on the 600 directions, |P(u)| may exceed amp between them by <= 1.8 % (measured densely).
_BOUND_SLACK = 1.02


@dataclass
class Lesion:
    """One synthetic lesion in LPS mm."""

    kind: LesionKind
    centre: np.ndarray  # (3,) LPS mm
    radii: np.ndarray  # (3,) mm, semi-axes before the radial perturbation
    rotation: np.ndarray  # (3, 3) columns: the semi-axes' directions in LPS
    shape: np.ndarray  # (16,) coefficients of the radial perturbation, scaled so |P(u)| <= amp
    amp: float
    hu: float  # base HU
    tissue_hu: float  # median HU of the surrounding tissue (source volume)
    waves: np.ndarray  # (W, 3) wave vectors (rad/mm) of the texture
    phases: np.ndarray  # (W,)
    type_code: int
    style: LesionStyle = LesionStyle()
    factor_max: float = 1.0  # bound on the radial factor over all directions (see make_lesion)
    grain_sd: float = 0.0  # HU: the surrounding tissue's noise, added inside the lesion
    grain_seed: int = 0
    edge_mm: float = 0.0  # width of the partial-volume ramp (0: one grid pixel)

    @property
    def max_radius(self) -> float:
        """No point of the lesion is farther than this (mm) from its centre."""
        return float(self.radii.max() * self.factor_max)

    def _rays(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distance from the centre (N,) and the surface's distance along the same ray (N,), mm."""
        v = (np.asarray(points, dtype=np.float64) - self.centre) @ self.rotation  # lesion frame
        norm = np.linalg.norm(v, axis=1)
        u = np.where(norm[:, None] > 1e-9, v / np.maximum(norm, 1e-9)[:, None], np.array([1.0, 0.0, 0.0]))
        return norm, radial_factor(u, self.shape, self.style) / np.linalg.norm(u / self.radii, axis=1)

    def signed_distance(self, points: np.ndarray) -> np.ndarray:
        """(N,) mm from ``points`` (N, 3) LPS to the surface along the ray from the centre; > 0 inside.

        Along-ray distance, not Euclidean: close enough for a one-voxel soft edge on near-round blobs.
        """
        norm, surface = self._rays(points)
        return surface - norm

    def hu_at(self, points: np.ndarray) -> np.ndarray:
        """(N,) lesion HU at ``points`` (N, 3) LPS: base plus texture within the kind's HU range, then the style's
        wall or core (grain is added by :func:`rasterise`)."""
        offsets = np.asarray(points, dtype=np.float64) - self.centre
        amplitude = self.kind.texture_sd * np.sqrt(2.0 / len(self.phases))  # the sum's sd is texture_sd
        texture = amplitude * np.cos(offsets @ self.waves.T + self.phases).sum(axis=1)
        # a small lesion sees only part of a wave, which need not average out: keep it in the kind's range
        hu = np.clip(self.hu + texture, *self.kind.hu_range)
        norm, surface = self._rays(points)
        return self.style.profile(hu, surface - norm, norm / np.maximum(surface, 1e-9))


def radial_factor(u: np.ndarray, shape: np.ndarray, style: LesionStyle) -> np.ndarray:
    """(N,) radius scale along unit directions ``u`` (N, 3): smooth irregularity plus the style's bumps."""
    return 1.0 + _monomials(u) @ shape + style.bumps(u)


def make_lesion(rng: np.random.Generator, kind: LesionKind, centre: np.ndarray, long_axis_mm: float,
                tissue: TissueStats, type_code: int, style: LesionStyle = LesionStyle(),
                edge_mm: float = 0.0) -> Lesion:
    """A random lesion of nominal long axis ``long_axis_mm`` at ``centre`` with HU contrasting the tissue."""
    amp = float(rng.uniform(0.10, 0.25))
    coefficients = rng.normal(size=16)
    coefficients *= amp / np.abs(_monomials(_SPHERE) @ coefficients).max()
    # the factor peaks on a bump's axis or between the sphere's sample directions (slack): bound both
    probes = np.concatenate([_SPHERE, style.directions])
    factor_max = float(radial_factor(probes, coefficients, style).max()) * _BOUND_SLACK
    semi = long_axis_mm / 2 / factor_max  # the lesion's longest radius <= long_axis / 2
    radii = semi * np.array([1.0, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)])
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    rotation = q * np.sign(np.diag(r))  # a uniformly random rotation (or reflection: the blob does not care)
    waves_count = 4
    directions = rng.normal(size=(waves_count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    waves = directions * (2 * np.pi / rng.uniform(4.0, 12.0, size=(waves_count, 1)))  # wavelengths 4-12 mm
    return Lesion(kind, np.asarray(centre, dtype=np.float64), radii, rotation, coefficients, amp,
                  choose_hu(rng, kind.hu_range, tissue.median_hu), tissue.median_hu, waves,
                  rng.uniform(0, 2 * np.pi, size=waves_count), type_code, style, factor_max,
                  min(tissue.noise_sd_hu, MAX_GRAIN_SD_HU), int(rng.integers(2 ** 31)), edge_mm)


@dataclass(frozen=True)
class TissueStats:
    """What surrounds a lesion in the source CT: its median HU and its noise (sd, HU)."""

    median_hu: float
    noise_sd_hu: float = 0.0


def tissue_stats(image: sitk.Image, centre_ijk: np.ndarray, radius_mm: float, shell_mm: float = 5.0) -> TissueStats:
    """The source HU in the shell ``radius_mm``..``radius_mm + shell_mm`` around a candidate centre: the tissue a
    reader sees around the lesion (organ, fat, or whatever abuts it).

    Median for its density; noise from differences of in-plane neighbours in the shell (robust sd / sqrt 2), which
    edges between tissues barely move, unlike the shell's own spread.
    """
    spacing = np.asarray(image.GetSpacing())
    reach = np.ceil((radius_mm + shell_mm) / spacing).astype(int)
    low = np.maximum(centre_ijk - reach, 0)
    high = np.minimum(centre_ijk + reach + 1, image.GetSize())
    offsets = np.meshgrid(*((np.arange(low[a], high[a]) - centre_ijk[a]) * spacing[a] for a in (2, 1, 0)),
                          indexing="ij")
    distance = np.sqrt(sum(o ** 2 for o in offsets))
    hu = sitk.GetArrayViewFromImage(image)[tuple(slice(low[a], high[a]) for a in (2, 1, 0))]
    shell = (distance >= radius_mm) & (distance <= radius_mm + shell_mm)
    pairs = shell[..., 1:] & shell[..., :-1]
    steps = np.diff(hu.astype(np.float64), axis=-1)[pairs]
    noise = 1.4826 * float(np.median(np.abs(steps - np.median(steps)))) / np.sqrt(2.0) if steps.size else 0.0
    return TissueStats(float(np.median(hu[shell])), noise)


@dataclass
class CaseGrid:
    """The 512 x 512 x slices grid of one case, in LPS; slice k lies at z = origin[2] - k * spacing[2]."""

    origin: np.ndarray  # (3,) LPS mm of pixel (0, 0) of slice 0
    spacing: tuple[float, float, float]
    slices: int
    source_slices: tuple[int, int]  # first and last source slice of the slab

    def reference(self, first: tuple[int, int, int], size: tuple[int, int, int]) -> sitk.Image:
        """An empty image on this grid starting at index ``first`` (i, j, k) with ``size`` (i, j, k)."""
        image = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
        image.SetSpacing(self.spacing)
        image.SetDirection(OUTPUT_DIRECTION)
        image.SetOrigin(tuple(float(v) for v in self.points(np.array([first]))[0]))
        return image

    def points(self, ijk: np.ndarray) -> np.ndarray:
        """LPS mm (N, 3) of grid indices (N, 3) in (i, j, k) order."""
        return self.origin + np.asarray(ijk, dtype=np.float64) * np.array(self.spacing) * np.array([1.0, 1.0, -1.0])

    def centre_box(self, radius_mm: float) -> tuple[np.ndarray, np.ndarray]:
        """LPS bounds for centres of lesions of ``radius_mm`` that stay clear of the image edge (box pad + 3 px)
        and of the first and last slice."""
        s, _, dz = self.spacing
        edge = (DEEPLESION_BOX_PAD + 3) * s + radius_mm
        low = self.origin + np.array([edge, edge, -(self.slices - 1) * dz + radius_mm + dz])
        high = self.origin + np.array([(IMAGE_SIZE - 1) * s - edge, (IMAGE_SIZE - 1) * s - edge, -radius_mm - dz])
        return low, high


@dataclass
class Placed:
    """A lesion drawn on a case grid: its partial-volume fraction in a box of the grid."""

    lesion: Lesion
    first: np.ndarray  # (3,) grid index (i, j, k) of the box corner
    alpha: np.ndarray  # (K, J, I) fraction of each voxel that is lesion (0.5 = on the surface)
    hu: np.ndarray  # (K, J, I) lesion HU

    @property
    def key_slice(self) -> int:
        """0-based grid slice where the lesion's cross-section (alpha >= 0.5) is largest."""
        return int(self.first[2] + np.argmax((self.alpha >= 0.5).sum(axis=(1, 2))))

    def key_mask(self) -> np.ndarray:
        """(512, 512) bool lesion mask on the key slice."""
        mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
        k = self.key_slice - self.first[2]
        i, j = self.first[0], self.first[1]
        mask[j:j + self.alpha.shape[1], i:i + self.alpha.shape[2]] = self.alpha[k] >= 0.5
        return mask


#: Partial volume across a slice's thickness: the lesion is sampled at these offsets (in slice spacings).
_THICKNESS_SAMPLES = (-1.0 / 3.0, 0.0, 1.0 / 3.0)


def _grain(seed: int, shape: tuple[int, ...], grain_px: float) -> np.ndarray:
    """(K, J, I) unit-sd noise with the in-plane correlation of a source voxel ``grain_px`` grid pixels wide: the
    source's noise, upsampled to the finer grid, is blotchy, not white."""
    white = np.random.default_rng(seed).standard_normal(shape)
    if grain_px <= 1.0:
        return white
    smooth = ndimage.gaussian_filter(white, (0.0, grain_px / 2, grain_px / 2), mode="wrap")
    return smooth / max(float(smooth.std()), 1e-6)


def rasterise(lesion: Lesion, grid: CaseGrid) -> Placed:
    """Partial-volume fraction: a linear ramp across the surface, alpha = 0.5 + distance / edge (the lesion's
    ``edge_mm``, at least one pixel), averaged over the slice's thickness; HU with the tissue's grain."""
    s, _, dz = grid.spacing
    edge = max(s, lesion.edge_mm)
    reach = lesion.max_radius + edge + s
    low = np.floor((lesion.centre - reach - grid.origin) * [1, 1, -1] / grid.spacing).astype(int)
    high = np.ceil((lesion.centre + reach - grid.origin) * [1, 1, -1] / grid.spacing).astype(int)
    first, last = np.minimum(low, high), np.maximum(low, high)
    first = np.maximum(first, 0)
    last = np.minimum(last, [IMAGE_SIZE - 1, IMAGE_SIZE - 1, grid.slices - 1])
    k, j, i = np.meshgrid(*(np.arange(first[a], last[a] + 1) for a in (2, 1, 0)), indexing="ij")
    points = grid.points(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1))
    alpha = np.mean([np.clip(0.5 + lesion.signed_distance(points + [0.0, 0.0, t * dz]) / edge, 0.0, 1.0)
                     for t in _THICKNESS_SAMPLES], axis=0).reshape(k.shape)
    hu = lesion.hu_at(points).reshape(k.shape) + lesion.grain_sd * _grain(lesion.grain_seed, k.shape, edge / s)
    return Placed(lesion, first, alpha.astype(np.float32), hu.astype(np.float32))


def inside_region(placed: Placed, region: Region, grid: CaseGrid) -> bool:
    """Every voxel the lesion touches lies in its region (labels or HU mask moved to the grid by nearest neighbour)."""
    reference = grid.reference(tuple(placed.first), placed.alpha.shape[::-1])
    moved = sitk.Resample(region.image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return bool(np.all(sitk.GetArrayViewFromImage(moved)[placed.alpha > 0]))
