"""What a DeepLesion folder holds: lesion counts by type and split, and lesion sizes."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from ctzoo.datasets.deeplesion.info_csv import LESION_TYPES, SPLITS, LesionRow

#: Long-axis bins (mm) of the size histogram; RECIST's measurable-lesion threshold is 10 mm.
SIZE_BINS_MM = (0, 10, 20, 30, 40, 60, 80, 120, 1000)
#: DeepLesion's coarse types over its 9,816 typed lesions (val + test: 4,889 + 4,927, the official split sizes;
#: Yan et al., J. Med. Imaging 5(3) 036501, 2018). Pass the real DL_info.csv as a reference to compare with it.
DEEPLESION_TYPE_COUNTS = {"lung": 2394, "abdomen": 2166, "mediastinum": 1638, "liver": 1318, "pelvis": 869,
                          "soft tissue": 677, "kidney": 490, "bone": 264}
#: DeepLesion's long axes in summary (no histogram without the download): median about 20 mm, a few mm to
#: over 100 mm.
DEEPLESION_MEDIAN_LONG_AXIS_MM = 20.0


def long_axis_mm(row: LesionRow) -> float:
    """The long diameter in mm (DeepLesion pixels are square in-plane; x spacing is used)."""
    return row.lesion_diameters_px[0] * row.spacing_mm_px[0]


def lesion_stats(rows: list[LesionRow]) -> dict[str, Any]:
    """Counts a user checks first: lesions, key images, patients per split; lesions by type x split; sizes."""
    by_split: dict[str, Any] = {}
    for code, split in SPLITS.items():
        chosen = [r for r in rows if r.train_val_test == code]
        by_split[split] = {
            "lesions": len(chosen),
            "key_images": len({r.file_name for r in chosen}),
            "patients": len({r.patient_index for r in chosen}),
            "possibly_noisy": sum(r.possibly_noisy for r in chosen),
        }
    types = Counter((r.lesion_type, r.split) for r in rows)
    sizes = np.array([long_axis_mm(r) for r in rows])
    histogram, _ = np.histogram(sizes, bins=SIZE_BINS_MM)
    return {
        "lesions": len(rows),
        "key_images": len({r.file_name for r in rows}),
        "patients": len({r.patient_index for r in rows}),
        "series": len({r.series_folder for r in rows}),
        "by_split": by_split,
        "by_type": {name: {split: types.get((name, split), 0) for split in SPLITS.values()}
                    for name in LESION_TYPES.values() if any(types.get((name, s), 0) for s in SPLITS.values())},
        "long_axis_mm": {
            "median": float(np.median(sizes)) if sizes.size else None,
            "bins": [f"{a}-{b}" for a, b in zip(SIZE_BINS_MM[:-2], SIZE_BINS_MM[1:-1])] + [f"{SIZE_BINS_MM[-2]}+"],
            "counts": histogram.tolist(),
        },
    }


def format_stats(stats: dict[str, Any]) -> str:
    """The table ``ctzoo data stats`` prints."""
    splits = list(SPLITS.values())
    lines = [f"{stats['lesions']} lesions on {stats['key_images']} key images, {stats['series']} series, "
             f"{stats['patients']} patients", "", f"{'':14s}" + "".join(f"{s:>8s}" for s in splits)]
    for field in ("lesions", "key_images", "patients", "possibly_noisy"):
        lines.append(f"{field:14s}" + "".join(f"{stats['by_split'][s][field]:8d}" for s in splits))
    lines += ["", "lesions by type"]
    for name, counts in stats["by_type"].items():
        lines.append(f"  {name:12s}" + "".join(f"{counts[s]:8d}" for s in splits))
    lines += ["", f"long axis (median {stats['long_axis_mm']['median']:.1f} mm)" if stats["lesions"] else ""]
    peak = max(stats["long_axis_mm"]["counts"] + [1])
    for label, count in zip(stats["long_axis_mm"]["bins"], stats["long_axis_mm"]["counts"]):
        lines.append(f"  {label:>9s} mm {count:7d} {'#' * round(40 * count / peak)}")
    return "\n".join(lines)


def type_shares(types: list[str]) -> dict[str, float]:
    """Share of each DeepLesion type (DEEPLESION_TYPE_COUNTS' order) among ``types``; 'unknown' is left out."""
    known = [t for t in types if t != "unknown"]
    return {name: known.count(name) / max(len(known), 1) for name in DEEPLESION_TYPE_COUNTS}


def deeplesion_reference(rows: list[LesionRow] | None = None) -> dict[str, Any]:
    """DeepLesion's type shares and long axes: from a real ``DL_info.csv``'s rows (typed val/test lesions; sizes
    of every lesion) when given, else the published type counts and median (no size histogram)."""
    if rows:
        sizes = [long_axis_mm(r) for r in rows]
        return {"source": "DL_info.csv", "type_shares": type_shares([r.lesion_type for r in rows]),
                "long_axis_mm": sizes, "median_long_axis_mm": float(np.median(sizes))}
    total = sum(DEEPLESION_TYPE_COUNTS.values())
    return {"source": "published (Yan et al. 2018): 9,816 typed val/test lesions",
            "type_shares": {name: count / total for name, count in DEEPLESION_TYPE_COUNTS.items()},
            "long_axis_mm": None, "median_long_axis_mm": DEEPLESION_MEDIAN_LONG_AXIS_MM}
