"""DeepLesion's real format: DL_info.csv parsing, PNG slices, 2.5D context, resampling and RECIST targets."""

import dataclasses

import numpy as np
import pytest
import torch

from ctzoo.datasets.deeplesion.context import load_context_slices, neighbour_offsets
from ctzoo.datasets.deeplesion.dataset import (
    DeepLesionConfig,
    LoadDeepLesiond,
    SlicePreprocessing,
    collate_lesions,
    deeplesion_dataloader,
    deeplesion_dataset,
    key_slice_items,
    resample_and_window,
)
from ctzoo.datasets.deeplesion.info_csv import (
    COLUMNS,
    DLInfoError,
    LesionRow,
    read_dl_info,
    write_dl_info,
)
from ctzoo.datasets.deeplesion.png_slices import read_png_hu, write_png_hu
from ctzoo.datasets.deeplesion.recist import (
    RecistTargets,
    box_from_points,
    canonical_order,
    diameters,
    points_from_measurement,
    recist_centre,
)

# The first row of the real DL_info.csv, as published (quoted lists, 1-based pixels).
REAL_HEADER = ",".join(COLUMNS)
REAL_ROW = ('000001_01_01_109.png,1,1,1,109,"233.537, 95.0204, 234.057, 106.977, 231.169, 101.605, 236.252, '
            '101.724","226.169, 90.0204, 241.252, 111.977","11.9677, 5.10387","0.44666, 0.283794, 0.434454",3,0,'
            '"103, 115","0.488281, 0.488281, 5","512, 512","-175, 275",F,62,2')


def lesion_row(**changes) -> LesionRow:
    base = LesionRow(
        file_name="000007_02_01_012.png", patient_index=7, study_index=2, series_id=1, key_slice_index=12,
        measurement_coordinates=(11.0, 21.0, 31.0, 21.0, 21.0, 16.0, 21.0, 26.0), bounding_box=(6.0, 11.0, 36.0, 31.0),
        lesion_diameters_px=(20.0, 10.0), normalized_lesion_location=(0.5, 0.5, 0.5), coarse_lesion_type=4,
        possibly_noisy=False, slice_range=(10, 14), spacing_mm_px=(0.4, 0.4, 2.5), image_size=(40, 48),
        dicom_windows=(-175.0, 275.0), patient_gender="M", patient_age=None, train_val_test=1)
    return dataclasses.replace(base, **changes)


def write_series(root, row: LesionRow, rng=None):
    """Slices 10..14 of a 48 x 40 series whose HU encode (slice, row, column) so every read is checkable."""
    rng = rng or np.random.default_rng(0)
    truth = {}
    for s in range(row.slice_range[0], row.slice_range[1] + 1):
        hu = (np.arange(48)[:, None] * 3 + np.arange(40)[None, :] + 100 * s - 1000).astype(np.float32)
        write_png_hu(root / "Images_png" / row.series_folder / f"{s:03d}.png", hu)
        truth[s] = hu
    return truth


def test_real_row_parses(tmp_path):
    (tmp_path / "DL_info.csv").write_text(REAL_HEADER + "\n" + REAL_ROW + "\n")
    (row,) = read_dl_info(tmp_path / "DL_info.csv")
    assert row.key_slice_path == "000001_01_01/109.png"
    assert row.measurement_coordinates[:2] == (233.537, 95.0204)
    assert row.spacing_mm_px == (0.488281, 0.488281, 5.0) and row.image_size == (512, 512)
    assert row.split == "val" and row.lesion_type == "mediastinum" and row.patient_age == 62
    targets = RecistTargets.from_measurement(row.measurement_coordinates, row.spacing_mm_px[:2])
    # the published diameters and the published (1-based, padded) box follow from the end points
    assert targets.diameters_px[0] == pytest.approx(row.lesion_diameters_px[0], abs=1e-3)
    np.testing.assert_allclose(targets.box + 1.0, row.bounding_box, atol=1e-3)
    write_dl_info([row], tmp_path / "again.csv")
    assert read_dl_info(tmp_path / "again.csv") == [row]


@pytest.mark.parametrize("column, bad, message", [
    ("Measurement_coordinates", '"1, 2, 3"', "expected 8 comma-separated numbers"),
    ("Train_Val_Test", "4", "expected one of"),
    ("Spacing_mm_px_", '"0.5, 0.5, 0"', "expected positive"),
    ("File_name", "oops.png", "expected {patient}_{study}_{series}_{slice}.png"),
    ("Key_slice_index", "300", "300 outside Slice_range 103-115"),
    ("Patient_index", "inf", "not finite"),  # int() of an infinity is an OverflowError, not a ValueError
    ("Slice_range", '"103, 1e400"', "not finite"),
])
def test_malformed_value_names_row_and_column(tmp_path, column, bad, message):
    import csv
    import io

    values = next(csv.reader(io.StringIO(REAL_ROW)))
    values[COLUMNS.index(column)] = bad.strip('"')
    out = io.StringIO()
    csv.writer(out).writerow(values)
    (tmp_path / "DL_info.csv").write_text(REAL_HEADER + "\n" + REAL_ROW + "\n" + out.getvalue())
    with pytest.raises(DLInfoError, match=rf"DL_info.csv: row 3 \(.*\), column {column}: {message}"):
        read_dl_info(tmp_path / "DL_info.csv")


def test_missing_column_is_named(tmp_path):
    (tmp_path / "DL_info.csv").write_text(REAL_HEADER.replace(",Possibly_noisy", "") + "\n")
    with pytest.raises(DLInfoError, match="lacks column.*Possibly_noisy"):
        read_dl_info(tmp_path / "DL_info.csv")


def test_png_hu_roundtrip_is_exact(tmp_path):
    hu = np.random.default_rng(1).integers(-32768, 32767, size=(5, 7)).astype(np.float32)
    assert np.array_equal(read_png_hu(write_png_hu(tmp_path / "001.png", hu)), hu)
    with pytest.raises(ValueError, match="does not fit"):
        write_png_hu(tmp_path / "002.png", np.full((2, 2), 40000.0))


def test_context_slices_interpolate_and_repeat_edges(tmp_path):
    row = lesion_row()
    truth = write_series(tmp_path, row)
    # channels superior first: DeepLesion's PNG numbers run towards the feet, an LPS volume's index to the head
    assert neighbour_offsets(5, 2.0, 2.5, "feet") == [-1.6, -0.8, 0.0, 0.8, 1.6]
    assert neighbour_offsets(5, 2.0, 2.5, "head") == [1.6, 0.8, 0.0, -0.8, -1.6]
    planes = load_context_slices(tmp_path / "Images_png", row, num_slices=5, slice_interval_mm=2.0)
    # slice positions 10.4, 11.2, 12, 12.8, 13.6: linear between the two slices around each
    expected = [truth[10] * 0.6 + truth[11] * 0.4, truth[11] * 0.8 + truth[12] * 0.2, truth[12],
                truth[12] * 0.2 + truth[13] * 0.8, truth[13] * 0.4 + truth[14] * 0.6]
    for got, want in zip(planes, expected):
        np.testing.assert_allclose(got, want, atol=1e-3)
    edge = load_context_slices(tmp_path / "Images_png", dataclasses.replace(row, key_slice_index=14), 5, 2.5)
    for k, s in enumerate([12, 13, 14, 14, 14]):  # beyond Slice_range the edge slice repeats
        np.testing.assert_array_equal(edge[k], truth[s])
    flat = load_context_slices(tmp_path / "Images_png", dataclasses.replace(row, spacing_mm_px=(0.4, 0.4, 0.0)), 3)
    assert all(np.array_equal(p, truth[12]) for p in flat)


def test_loaded_sample_hu_spacing_and_points(tmp_path):
    row = lesion_row()
    truth = write_series(tmp_path, row)
    native = DeepLesionConfig(root=tmp_path, norm_spacing_mm=None, window_hu=(-32768, 32767),
                              output_range=(-32768, 32767))
    sample = LoadDeepLesiond(native)({"context_row": row, "lesions": [row], "file_name": row.file_name})
    np.testing.assert_allclose(sample["image"][1].numpy(), truth[12], atol=1e-2)  # exact HU through the window
    # 1-based (11, 21)..(31, 21) long axis and (21, 16)..(21, 26) short axis -> 0-based, canonical order
    np.testing.assert_allclose(sample["keypoints"][0].numpy(), [[10, 20], [30, 20], [20, 15], [20, 25], [20, 20]])
    np.testing.assert_allclose(sample["diameters_mm"][0].numpy(), [8.0, 4.0], atol=1e-5)

    resampled = DeepLesionConfig(root=tmp_path, norm_spacing_mm=0.8)  # 0.4 -> 0.8 mm/px halves the image
    sample = LoadDeepLesiond(resampled)({"context_row": row, "lesions": [row], "file_name": row.file_name})
    assert sample["image"].shape == (3, 24, 20)
    np.testing.assert_allclose(sample["spacing_mm"].numpy(), [0.8, 0.8])
    np.testing.assert_allclose(sample["keypoints"][0].numpy(),
                               (np.array([[10, 20], [30, 20], [20, 15], [20, 25], [20, 20]]) + 0.5) / 2 - 0.5)
    np.testing.assert_allclose(sample["diameters_mm"][0].numpy(), [8.0, 4.0], atol=1e-5)  # mm survive resampling
    # every point still sits on the same anatomy: the HU ramp sampled at the moved point equals the original
    hu = resampled.window_hu[0] + sample["image"][1].numpy().astype(np.float64) * np.diff(resampled.window_hu)[0]
    for (x, y), (x0, y0) in zip(sample["keypoints"][0].numpy(), [[10, 20], [30, 20], [20, 15], [20, 25], [20, 20]]):
        x1, y1 = int(x), int(y)
        fx, fy = x - x1, y - y1
        value = ((1 - fy) * ((1 - fx) * hu[y1, x1] + fx * hu[y1, x1 + 1])
                 + fy * ((1 - fx) * hu[y1 + 1, x1] + fx * hu[y1 + 1, x1 + 1]))
        assert value == pytest.approx(truth[12][y0, x0], abs=1.0)
    assert np.all(sample["image"].numpy() >= 0) and np.all(sample["image"].numpy() <= 1)


def test_extra_windows_stack_channels_window_by_window():
    hu = np.stack([np.linspace(-1200, 400, 64 * 64).reshape(64, 64) + 10 * k for k in range(3)])
    cfg = SlicePreprocessing(norm_spacing_mm=None, window_hu=(-1024, 3071), extra_windows_hu=[(-160, 240),
                                                                                                (-1350, 150)])
    assert cfg.in_channels == 9 and SlicePreprocessing().in_channels == 3
    image, _ = resample_and_window(hu, (0.8, 0.8), cfg)
    assert image.shape == (9, 64, 64)
    for w, (low, high) in enumerate([(-1024, 3071), (-160, 240), (-1350, 150)]):
        expected = np.clip((hu - low) / (high - low), 0, 1)
        np.testing.assert_allclose(image[3 * w:3 * w + 3].numpy(), expected, atol=1e-5)


def test_recist_conversions_by_hand():
    # axis-aligned cross, given in scrambled order and 0-based
    points = points_from_measurement([30, 20, 10, 20, 20, 25, 20, 15], one_based=False)
    np.testing.assert_allclose(points, [[10, 20], [30, 20], [20, 15], [20, 25], [20, 20]])
    np.testing.assert_allclose(box_from_points(points, pad=5), [5, 10, 35, 30])
    pixels, mm = diameters(points, (0.5, 2.0))
    np.testing.assert_allclose(pixels, [20, 10])
    np.testing.assert_allclose(mm, [10, 20])  # anisotropic pixels: the "short" axis in pixels is longer in mm
    # a lesion rotated by 30 degrees, long axis 20 px, short 8 px, crossing 3 px off the long axis' middle
    angle = np.deg2rad(30)
    u, v = np.array([np.cos(angle), np.sin(angle)]), np.array([-np.sin(angle), np.cos(angle)])
    centre = np.array([50.0, 60.0])
    ends = [centre - 7 * u, centre + 13 * u, centre - 4 * v, centre + 4 * v]
    points = points_from_measurement(np.concatenate(ends), one_based=False)
    np.testing.assert_allclose(points[4], centre, atol=1e-9)  # the intersection, not the mean
    np.testing.assert_allclose(diameters(points)[0], [20, 8], atol=1e-9)
    np.testing.assert_allclose(points[0], centre - 7 * u)  # left end first
    np.testing.assert_allclose(points[2], centre + 4 * v)  # v points left-down: its +4 end is the left one
    np.testing.assert_allclose(box_from_points(points), [*np.min(ends, axis=0), *np.max(ends, axis=0)])
    # a vertical axis orders top first; a flip restores order via canonical_order
    flipped = points.copy()
    flipped[:, 0] = 100 - flipped[:, 0]
    reordered = canonical_order(flipped)
    assert reordered[0, 0] < reordered[1, 0] and reordered[2, 0] < reordered[3, 0]
    assert np.allclose(canonical_order([[5, 9], [5, 1], [0, 0], [1, 0]])[:2], [[5, 1], [5, 9]])
    # parallel (malformed) axes fall back to the mean of the end points
    np.testing.assert_allclose(recist_centre(np.array([[0, 0], [10, 0], [0, 2], [10, 2]], float)), [5, 1])


def test_lesion_free_slices_keep_away_from_noisy_lesions_and_out_of_evaluation(tmp_path):
    """A dropped noisy lesion is still a lesion: no lesion-free slice is drawn next to it. Val and test are scored
    on their key slices alone (DeepLesion's protocol) unless lesion-free slices are asked for."""
    kept = lesion_row(slice_range=(4, 20))
    noisy = lesion_row(slice_range=(4, 20), file_name="000007_02_01_005.png", key_slice_index=5, possibly_noisy=True)
    rows = [kept, noisy]
    negatives = [i for i in key_slice_items(rows, "train", negatives_per_series=20) if not i["lesions"]]
    # 14 mm (half the 8 mm long axis + 10 mm) at 2.5 mm/slice from slices 12 and 5: only 18..20 are far from both
    assert [int(i["file_name"][-7:-4]) for i in negatives] == [18, 19, 20]

    test = lesion_row(slice_range=(4, 20), file_name="000008_01_01_012.png", patient_index=8, train_val_test=3)
    write_dl_info([kept, test], tmp_path / "DL_info.csv")
    for row in (kept, test):  # the folders only: counting items reads no slice
        (tmp_path / "Images_png" / row.series_folder).mkdir(parents=True, exist_ok=True)
    cfg = DeepLesionConfig(root=tmp_path, negatives_per_series=1)
    assert [len(deeplesion_dataset(cfg, split)) for split in ("train", "test", "all")] == [2, 1, 4]
    assert len(deeplesion_dataset(cfg, "test", lesion_free_per_series=1)) == 2


def test_a_lesion_free_slice_reads_its_neighbours_in_one_chosen_range():
    """A far slice inside the Slice_range of two lesions is read in the wider range, in every series (the choice
    once followed Python's string hashing, which differs between processes: a resumed run read other edges)."""
    rows = []
    for patient in range(12):
        folder = f"{patient + 10:06d}_01_01"
        rows += [lesion_row(file_name=f"{folder}_012.png", patient_index=patient + 10, slice_range=(4, 20)),
                 lesion_row(file_name=f"{folder}_012.png", patient_index=patient + 10, slice_range=(2, 22))]
    negatives = [i for i in key_slice_items(rows, "train", negatives_per_series=20) if not i["lesions"]]
    assert len(negatives) == 12 * 10  # slices 2..6 and 18..22 of each series
    assert {i["context_row"].slice_range for i in negatives} == {(2, 22)}


def test_dataset_groups_lesions_and_loads_with_workers(tmp_path):
    first = lesion_row(slice_range=(4, 20))
    second = lesion_row(slice_range=(4, 20), measurement_coordinates=(5.0, 5.0, 9.0, 5.0, 7.0, 4.0, 7.0, 6.0),
                        bounding_box=(0.0, -1.0, 14.0, 11.0), lesion_diameters_px=(4.0, 2.0))
    noisy = lesion_row(slice_range=(4, 20), possibly_noisy=True)
    other = lesion_row(slice_range=(4, 20), file_name="000008_01_01_012.png", patient_index=8, train_val_test=3)
    write_series(tmp_path, first)
    write_series(tmp_path, other)
    write_dl_info([first, second, noisy, other], tmp_path / "DL_info.csv")
    items = key_slice_items(read_dl_info(tmp_path / "DL_info.csv"), "train")
    assert [len(i["lesions"]) for i in items] == [2]  # two lesions on one key slice; the noisy one dropped
    assert len(key_slice_items(read_dl_info(tmp_path / "DL_info.csv"), "train", drop_noisy=False)[0]["lesions"]) == 3
    with_negatives = key_slice_items(read_dl_info(tmp_path / "DL_info.csv"), "all", negatives_per_series=1)
    negatives = [i for i in with_negatives if not i["lesions"]]
    # 14 mm (half the 8 mm long axis + 10 mm) from slice 12 at 2.5 mm/slice: slices 4..6 and 18..20 qualify
    assert len(negatives) == 2 and all(abs(int(i["file_name"][-7:-4]) - 12) >= 6 for i in negatives)

    cfg = DeepLesionConfig(root=tmp_path, negatives_per_series=1)
    dataset = deeplesion_dataset(cfg, "all", cache=True)
    assert len(dataset) == 4
    batch = next(iter(deeplesion_dataloader(dataset, batch_size=4, shuffle=False, num_workers=2)))
    assert batch["image"].shape == (4, 3, 24, 20)
    assert sorted(k.shape[0] for k in batch["keypoints"]) == [0, 0, 1, 2]
    assert all(isinstance(b, torch.Tensor) and b.shape[1:] == (4,) for b in batch["boxes"])
    assert collate_lesions([dataset[0]])["image"].shape == (1, 3, 24, 20)
    # images of different sizes are zero-padded right and bottom, so every pixel keeps its coordinates
    small = {**dataset[0], "image": torch.ones(3, 20, 22)}
    padded = collate_lesions([dataset[0], small])["image"]
    assert padded.shape == (2, 3, 24, 22) and torch.equal(padded[0, :, :, :20], torch.as_tensor(dataset[0]["image"]))
    assert padded[1, :, :20, :22].eq(1).all() and padded[1, :, 20:].eq(0).all() and padded[0, :, :, 20:].eq(0).all()


def test_dataset_with_augmentation_keeps_points_on_anatomy(tmp_path):
    """Loader + MONAI keypoint augmentation end to end: the inverted points are the CSV's, whatever the seed."""
    from ctzoo.datasets.keypoint_transforms import (
        invert_keypoints,
        recist_train_transforms,
    )

    row = lesion_row(slice_range=(4, 20))
    write_series(tmp_path, row)
    write_dl_info([row], tmp_path / "DL_info.csv")
    cfg = DeepLesionConfig(root=tmp_path, norm_spacing_mm=0.4)
    original = LoadDeepLesiond(cfg)(key_slice_items([row])[0])["keypoints"]
    for seed in range(4):
        augment = recist_train_transforms(spatial_size=(64, 64), seed=seed, lesion_keys=("lesion_types",))
        sample = deeplesion_dataset(cfg, "train", transform=augment)[0]
        assert sample["image"].shape == (3, 64, 64)
        if len(sample["keypoints"]):
            np.testing.assert_allclose(invert_keypoints(sample, sample["keypoints"]), original, atol=1e-3)


def test_missing_images_or_series_folders_are_named_before_any_slice_is_read(small_deeplesion_mini, tmp_path):
    """A DL_info.csv without its Images_png (or with part of it) ended in MONAI's RuntimeError traceback from
    inside the transform chain, the FileNotFoundError buried in it."""
    root = tmp_path / "dl"
    root.mkdir()
    (root / "DL_info.csv").write_bytes((small_deeplesion_mini / "DL_info.csv").read_bytes())
    cfg = DeepLesionConfig(root=root)
    with pytest.raises(FileNotFoundError, match="Images_png folder is missing"):
        deeplesion_dataset(cfg, "all")
    series = sorted(p.name for p in (small_deeplesion_mini / "Images_png").iterdir())
    (root / "Images_png").mkdir()
    (root / "Images_png" / series[0]).symlink_to(small_deeplesion_mini / "Images_png" / series[0])
    with pytest.raises(FileNotFoundError, match=f"{len(series) - 1} of the {len(series)} series folders"):
        deeplesion_dataset(cfg, "all")
