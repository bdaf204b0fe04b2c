"""Organ segmentation data: slice preprocessing and its inverse, class maps, labelled cases, the MSD reader,
template candidates and the training-slice dataset."""

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter

from ctzoo.datasets.seg_preprocessing import (
    SegPreprocessing,
    labels_to_slices,
    slices_to_volume_labels,
    volume_to_slices,
)
from ctzoo.datasets.segmentation import (
    ABDOMEN_CLASSES,
    DatasetError,
    SegCase,
    map_labels,
    msd_cases,
    split_slab,
    totalsegmentator_cases,
)
from ctzoo.datasets.segmentation_slices import (
    SegAugmentConfig,
    SliceCase,
    case_to_slices,
    kept_slices,
    template_candidates,
    template_set,
    template_slice_dataset,
)
from ctzoo.io import Volume, read_volume, volume_from_sitk, volume_to_sitk, write_volume
from ctzoo.training.engine import seed_everything


def tissue_labels(hu: np.ndarray) -> np.ndarray:
    """Stand-in organ labels with real anatomy's shapes, smooth like organ masks (HU smoothed in-plane first):
    1 = soft tissue, 2 = bone, 3 = fat."""
    hu = gaussian_filter(hu.astype(np.float32), sigma=(0, 4, 4))
    labels = np.zeros(hu.shape, np.uint8)
    labels[(hu > 0) & (hu < 100)] = 1
    labels[hu > 250] = 2
    labels[(hu > -150) & (hu < -50)] = 3
    return labels


def reoriented(volume, code: str):
    """The same physical volume stored in another orientation (axes permuted and flipped)."""
    return volume_from_sitk(sitk.DICOMOrient(volume_to_sitk(volume), code))


@pytest.fixture(scope="module")
def small_sample(sample_volume):
    """The embedded sample (LPS) with stand-in labels."""
    return SegCase("sample", sample_volume, tissue_labels(sample_volume.array))


@pytest.fixture(scope="module")
def ts_cases(fetched_samples):
    return totalsegmentator_cases()


def test_slices_shape_window_and_geometry(sample_volume):
    prep = SegPreprocessing()
    slices, geometry = volume_to_slices(sample_volume, prep)
    assert slices.shape == (20, 1, 256, 256) and slices.dtype == torch.float32
    assert 0.0 <= float(slices.min()) and float(slices.max()) <= 1.0
    assert geometry.resampled_hw == (250, 250) and geometry.offset == (3, 3)  # 500 mm field at 2 mm, centred
    assert geometry.spacing_zyx == pytest.approx((2.0, 2.0, 2.0))
    assert float(slices[:, 0, :3].max()) == 0.0  # padding is air, below the window


@pytest.mark.parametrize("code", ["LPS", "RAI", "PLI"])
def test_label_round_trip_in_any_orientation(small_sample, code):
    volume = reoriented(small_sample.image, code)
    labels = reoriented(small_sample.image.with_array(small_sample.labels), code).array.astype(np.uint8)
    assert volume.orientation == code
    prep = SegPreprocessing()
    slices, geometry = volume_to_slices(volume, prep)
    reference, _ = volume_to_slices(small_sample.image, prep)
    assert torch.equal(slices, reference)  # orientation on disk changes nothing the network sees
    back = slices_to_volume_labels(labels_to_slices(labels, volume, geometry), geometry, volume)
    assert back.shape == labels.shape and back.dtype == np.uint8
    assert (back == labels).mean() > 0.98  # only what 0.98 -> 2 -> 0.98 mm nearest resampling loses
    same_grid = SegPreprocessing(spacing_mm=float(volume.spacing[0]), size=(512, 512))
    _, exact = volume_to_slices(volume, same_grid)
    assert np.array_equal(slices_to_volume_labels(labels_to_slices(labels, volume, exact), exact, volume), labels)


def test_crop_keeps_the_centre_and_drops_the_rest(small_sample):
    prep = SegPreprocessing(spacing_mm=2.0, size=(128, 160))
    volume, labels = small_sample.image, small_sample.labels
    slices, geometry = volume_to_slices(volume, prep)
    assert slices.shape[2:] == (128, 160) and geometry.offset == (-61, -45)
    back = slices_to_volume_labels(labels_to_slices(labels, volume, geometry), geometry, volume)
    # kept: resampled rows 61..188 and columns 45..204 at 2 mm = voxels ~125..387 and ~92..418 at 0.98 mm
    assert (back[:, :120] == 0).all() and (back[:, 393:] == 0).all()
    assert (back[:, :, :88] == 0).all() and (back[:, :, 423:] == 0).all()
    _, full = volume_to_slices(volume, SegPreprocessing(spacing_mm=2.0, size=(256, 256)))
    uncropped = slices_to_volume_labels(labels_to_slices(labels, volume, full), full, volume)
    assert np.array_equal(back[:, 128:384, 96:416], uncropped[:, 128:384, 96:416])  # inside: as without crop


@pytest.mark.parametrize("shape,spacing", [((3, 40, 30), (7.0, 9.0, 2.0)), ((2, 300, 20), (0.7, 40.0, 2.0))],
                         ids=["both-axes-grow", "rows-grow-columns-shrink"])
def test_coarse_wide_slices_are_resampled_only_where_the_canvas_keeps_them(shape, spacing, monkeypatch):
    """Slices far wider than the canvas at coarse spacing (a 300-row slice at 40 mm is 6000 rows at 2 mm) used to
    be resampled whole before the crop kept 1/25 of them: no resize now makes more than the source or the canvas
    holds, the slices are those of the whole resample cropped (to float32 rounding), and labels go both ways as
    through the whole resample (nearest-exact) too."""
    import ctzoo.datasets.seg_preprocessing as seg

    prep = SegPreprocessing(spacing_mm=2.0, size=(64, 48))
    rng = np.random.default_rng(0)
    volume = seg.Volume(rng.normal(0, 300, shape).astype(np.float32), spacing)
    labels = rng.integers(0, 4, shape)
    resized = []

    class RecordedResize(seg.Resize):
        def __call__(self, images, *args, **kwargs):
            resized.append(tuple(self.spatial_size))
            return super().__call__(images, *args, **kwargs)

    monkeypatch.setattr(seg, "Resize", RecordedResize)
    hu, geometry = seg.resample_slices(volume, prep)
    assert geometry.resampled_hw[0] * geometry.resampled_hw[1] > max(shape[1] * shape[2], 64 * 48)
    assert all(h * w <= max(shape[1] * shape[2], 64 * 48) for h, w in resized), resized
    monkeypatch.undo()
    whole = seg._place(seg._resize(torch.from_numpy(volume.array), geometry.resampled_hw), prep.size,
                       geometry.offset, seg.AIR_HU)
    assert float((hu - whole).abs().max()) < 0.01  # HU
    on_slices = labels_to_slices(labels, volume, geometry)
    whole_labels = seg._place(seg._resize_labels(torch.from_numpy(labels), geometry.resampled_hw), prep.size,
                              geometry.offset, 0)
    assert torch.equal(on_slices, whole_labels)
    predicted = torch.from_numpy(rng.integers(0, 4, (shape[0], *prep.size)))
    back = seg._resize_labels(seg._place(predicted, geometry.resampled_hw, [-o for o in geometry.offset], 0),
                              shape[1:])
    assert np.array_equal(slices_to_volume_labels(predicted, geometry, volume), back.numpy().astype(np.uint8))


def test_real_labels_round_trip(ts_cases):
    for case in (ts_cases["train"][0], ts_cases["test"][0]):  # RAS NIfTI and LPS DICOM
        slices, geometry = volume_to_slices(case.image, SegPreprocessing())
        back = slices_to_volume_labels(labels_to_slices(case.labels, case.image, geometry), geometry, case.image)
        assert (back == case.labels).mean() > 0.98


def test_map_labels():
    names = {1: "spleen", 5: "liver", 27: "vertebrae_L1", 28: "vertebrae_T12", 9: "colon"}
    source = np.array([[0, 1, 5], [27, 28, 9]])
    classes = {"liver": ("liver",), "spleen": ("spleen",), "vertebrae": ("vertebrae_*",)}
    mapped = map_labels(source, names, classes)
    assert mapped.dtype == np.uint8 and mapped.tolist() == [[0, 2, 1], [3, 3, 0]]
    with pytest.raises(ValueError, match="class 'stomach': no source label"):
        map_labels(source, names, ABDOMEN_CLASSES)
    with pytest.raises(ValueError, match="matches classes"):
        map_labels(source, names, {"a": ("vertebrae_*",), "b": ("vertebrae_L1",)})


def test_totalsegmentator_cases(ts_cases):
    train, test = ts_cases["train"][0], ts_cases["test"][0]
    assert train.image.array.shape == (30, 101, 122) and test.image.array.shape == (20, 512, 512)
    for case in (train, test):  # the five abdominal classes are in every volume
        assert set(np.unique(case.labels)) == {0, 1, 2, 3, 4, 5}
    rest, slab = split_slab(train, 8)
    assert (rest.image.array.shape[0], slab.image.array.shape[0]) == (22, 8)
    assert slab.image.origin[2] == pytest.approx(rest.image.origin[2] + 22 * 3.0)  # superior end held out
    lps_labels = train.labels[:, ::-1, ::-1]  # RAS -> LPS flips rows and columns; k already goes up
    assert np.array_equal(np.concatenate([rest.labels, slab.labels]), lps_labels)
    assert np.array_equal(slab.image.array, train.image.array[22:, ::-1, ::-1])
    low, high = split_slab(train, 8, "inferior")
    assert low.image.array.shape[0] == 22 and high.image.origin[2] == pytest.approx(train.image.origin[2])


def write_msd(root: Path, volume, count: int, labels_key: str = "msd") -> Path:
    """A Medical Segmentation Decathlon folder of ``count`` 2-slice cases cut from ``volume``, every class in every
    case (labelled at full resolution, as organs are drawn: the thin bone would not survive the coarse grid's
    smoothing)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    entries = []
    for i in range(count):
        part = volume.with_array(volume.array)
        part.array = volume.array[2 * i:2 * i + 2, ::4, ::4].copy()
        part.spacing = (volume.spacing[0] * 4, volume.spacing[1] * 4, volume.spacing[2])
        part.dicom = None
        write_volume(part, root / "imagesTr" / f"case_{i:03d}.nii.gz", dtype="int16")
        labels = tissue_labels(volume.array[2 * i:2 * i + 2])[:, ::4, ::4]
        write_volume(part.with_array(labels), root / "labelsTr" / f"case_{i:03d}.nii.gz")
        entries.append({"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"})
    labels = ({"0": "background", "1": "soft", "2": "bone", "3": "fat"} if labels_key == "msd"
              else {"background": 0, "soft": 1, "bone": 2, "fat": 3})
    (root / "dataset.json").write_text(json.dumps({"name": "test", "labels": labels, "training": entries}))
    return root


@pytest.mark.parametrize("layout", ["msd", "nnunet_v2"])
def test_msd_reader(tmp_path, sample_volume, layout):
    root = write_msd(tmp_path / "Task99", sample_volume, 5, layout)
    cases = msd_cases(root)
    assert [len(cases[s]) for s in ("train", "val", "test")] == [3, 1, 1]
    assert [c.name for c in cases["test"]] == ["case_004"]  # split by listed order
    case = cases["train"][1]
    assert case.image.array.shape == (2, 128, 128)
    stored = read_volume(root / "labelsTr" / "case_001.nii.gz", dtype=None).array
    assert np.array_equal(case.labels, stored) and set(np.unique(stored)) == {0, 1, 2, 3}  # every label, ids kept
    bone = msd_cases(root, {"bone": ("bone",)}, val_fraction=0.0, test_fraction=0.4)
    assert [len(bone[s]) for s in ("train", "val", "test")] == [3, 0, 2]
    assert set(np.unique(bone["train"][0].labels)) <= {0, 1}


def test_msd_reader_errors(tmp_path, sample_volume):
    root = write_msd(tmp_path / "Task99", sample_volume, 3)
    index = json.loads((root / "dataset.json").read_text())
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"training\[1\]: label file .*case_001.nii.gz does not exist"):
        msd_cases(root)
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="dataset.json: not valid JSON"):
        msd_cases(root)
    (root / "dataset.json").write_text(json.dumps({"training": index["training"]}))
    with pytest.raises(DatasetError, match="needs 'labels' and 'training'"):
        msd_cases(root)
    (root / "dataset.json").write_text(json.dumps({**index, "labels": {"0": "background"}}))
    with pytest.raises(DatasetError, match="at least one class"):
        msd_cases(root)
    (root / "dataset.json").write_text(json.dumps({**index, "training": [index["training"][0], {"img": "x"}]}))
    with pytest.raises(DatasetError, match=r"training\[1\]: needs a 'image' path"):
        msd_cases(root)
    with pytest.raises(DatasetError, match="cannot read"):
        msd_cases(tmp_path / "nowhere")
    (root / "dataset.json").write_text(json.dumps({**index, "labels": {"0": "background", "2": "bone"},
                                                   "training": index["training"][:1]}))
    with pytest.raises(DatasetError, match=r"case_000.nii.gz: label values \[1, 3\] are not in dataset.json"):
        msd_cases(root, val_fraction=0, test_fraction=0)


def test_msd_labels_are_placed_by_their_header_not_their_shape(tmp_path, sample_volume):
    """A label file stored mirrored (its header saying so) has the image's shape: paired by shape, it would label
    the wrong side of the patient. It is put on the image's grid; a label elsewhere in space is refused."""
    root = write_msd(tmp_path / "Task99", sample_volume, 3)
    path = root / "labelsTr" / "case_001.nii.gz"
    stored = read_volume(path, dtype=None)
    direction = stored.direction.copy()
    direction[:, 0] *= -1  # columns run the other way...
    mirrored = Volume(stored.array[:, :, ::-1].copy(), stored.spacing,
                      tuple(stored.index_to_lps(np.array([stored.size[0] - 1.0, 0, 0]))), direction)
    write_volume(mirrored, path)  # ...and the header says so: the same labels in space
    case = msd_cases(root, val_fraction=0, test_fraction=0)["train"][1]
    assert np.array_equal(case.labels, stored.array)
    assert not np.array_equal(mirrored.array, case.labels)  # not the stored array
    write_volume(Volume(mirrored.array, mirrored.spacing, (500.0, 0.0, 0.0), direction), path)
    with pytest.raises(DatasetError, match=r"training\[1\]: label case_001.nii.gz, image case_001.nii.gz: label and "
                                           r"image do not share physical space: 0% of the label's foreground"):
        msd_cases(root, val_fraction=0, test_fraction=0)



def test_a_label_saved_without_its_images_header_is_refused(tmp_path, sample_volume):
    """The image's array, saved with default geometry (1 mm voxels; here at the image's origin, so its foreground
    lies inside the image): resampled by its header it would shrink into a corner of the image."""
    root = write_msd(tmp_path / "Task99", sample_volume, 3)
    path = root / "labelsTr" / "case_001.nii.gz"
    stored = read_volume(path, dtype=None)
    write_volume(Volume(stored.array, (1.0, 1.0, 1.0), stored.origin, stored.direction), path)
    with pytest.raises(DatasetError, match=r"training\[1\]: label case_001.nii.gz, image case_001.nii.gz: label and "
                                           r"image do not share physical space: the label has the image's array shape "
                                           r"but covers another region \(label \(2, 128, 128\) voxels, .* spacing "
                                           r"\[1.0, 1.0, 1.0\] mm.*; image \(2, 128, 128\) voxels, .* spacing \[3.906"):
        msd_cases(root, val_fraction=0, test_fraction=0)


def test_a_case_listed_twice_is_refused(tmp_path, sample_volume):
    """Split by position, a case listed twice could be trained on and tested on."""
    root = write_msd(tmp_path / "Task99", sample_volume, 5)
    index = json.loads((root / "dataset.json").read_text())
    index["training"][4] = {**index["training"][4], "image": index["training"][0]["image"]}
    (root / "dataset.json").write_text(json.dumps(index))
    with pytest.raises(DatasetError, match=r"dataset.json: training\[4\]: image file .*case_000.nii.gz is also listed "
                                           r"in training\[0\]; list each case once"):
        msd_cases(root)
    index["training"][4] = index["training"][1]
    (root / "dataset.json").write_text(json.dumps(index))
    with pytest.raises(DatasetError, match=r"training\[4\]: image file .*case_001.nii.gz is also listed in "
                                           r"training\[1\]"):
        msd_cases(root)


def _blank_labels(path: Path, value: int | None = None) -> None:
    """Set every voxel of the label file at ``path`` (of label ``value`` only, when given) to background."""
    stored = read_volume(path, dtype=None)
    write_volume(stored.with_array(np.where((stored.array == value) if value else True, 0, stored.array)), path)


@pytest.mark.parametrize("split, case", [("val", "case_003"), ("test", "case_004")])
def test_val_or_test_cases_without_labels_are_refused(tmp_path, sample_volume, split, case):
    """Dice is nan on them: best.pt would never be written (val), nothing compared (test)."""
    root = write_msd(tmp_path / "Task99", sample_volume, 5)
    _blank_labels(root / "labelsTr" / f"{case}.nii.gz")
    with pytest.raises(DatasetError, match=rf"dataset.json: the {split} cases \['{case}'\] hold no voxel of any class"):
        msd_cases(root)


def test_a_class_missing_from_the_training_cases_is_refused(tmp_path, sample_volume):
    root = write_msd(tmp_path / "Task99", sample_volume, 5)
    for i in range(3):  # the training cases; the val and test cases keep their bone
        _blank_labels(root / "labelsTr" / f"case_{i:03d}.nii.gz", value=2)
    with pytest.raises(DatasetError, match=r"dataset.json: classes \['bone'\] have no voxel in the training cases "
                                           r"\(case_000 to case_002\); drop them from data.classes"):
        msd_cases(root)
    assert [len(v) for v in msd_cases(root, {"soft": ("soft",), "fat": ("fat",)}).values()] == [3, 1, 1]

def test_template_candidates():
    labels = torch.zeros(4, 8, 8, dtype=torch.long)
    labels[0, 0, 0], labels[1, :2, 0] = 1, torch.tensor([1, 2])
    labels[2, :3, 0] = torch.tensor([1, 2, 3])
    assert template_candidates(labels, 3).tolist() == [2]
    assert template_candidates(labels[:2], 3).tolist() == [1]  # nobody has all: those with the most
    assert template_candidates(labels[:2].numpy()).tolist() == [1]


def test_kept_slices_thins_empty_ones():
    labels = torch.zeros(10, 4, 4, dtype=torch.long)
    labels[4:6, 0, 0] = 1
    assert kept_slices(labels, 0.25).tolist() == [0, 4, 5, 9]
    assert kept_slices(labels, 0.0).tolist() == [4, 5]
    assert len(kept_slices(labels, 1.0)) == 10


def test_training_dataset_items(small_sample):
    prep = SegPreprocessing(spacing_mm=4.0, size=(128, 128))
    case = case_to_slices(small_sample, prep)
    assert isinstance(case, SliceCase) and case.labels.shape == (20, 128, 128)
    dataset = template_slice_dataset([case], 3, prep, SegAugmentConfig(), repeats=2)
    assert len(dataset) == 40
    seed_everything(7, dataset)
    first = [dataset[i] for i in (0, 5)]
    seed_everything(7, dataset)
    again = [dataset[i] for i in (0, 5)]
    for item, same in zip(first, again):  # seeded like every engine epoch: replayable
        assert set(item) == {"image", "label", "template"}
        assert item["image"].shape == (1, 128, 128) and item["image"].dtype == torch.float32
        assert item["label"].shape == (1, 128, 128) and item["label"].dtype == torch.int64
        assert item["template"].shape == (4, 128, 128)
        assert set(torch.unique(item["template"][1:]).tolist()) <= {0.0, 1.0}
        assert (item["template"][1:].sum(0) <= 1).all()  # one class per pixel
        assert all(torch.equal(item[k], same[k]) for k in item)
    plain = template_slice_dataset([case], 3, prep, augment=None)
    item = plain[3]
    assert torch.equal(item["image"], case.images[3])
    stored = [k for k in range(20) if torch.equal(case.images[k], item["template"][:1])]
    assert stored and stored[0] != 3  # the template is another training slice, unaugmented
    images, masks, sources = template_set([case], 3, max_templates=4)
    assert images.shape == (4, 1, 128, 128) and masks.shape == (4, 3, 128, 128) and len(sources) == 4
