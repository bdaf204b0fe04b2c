"""YAML configs: the shipped one is valid; bad ones name the file and the field."""

from pathlib import Path

import pytest
from click.testing import CliRunner
from dicom_factory import SeriesSpec, make_slices, write_series

from ctzoo.cli import main
from ctzoo.config import ConfigError, load_config
from ctzoo.io import SeriesRules

CONFIGS = Path(__file__).parent.parent / "configs"


def test_shipped_rules_equal_the_defaults():
    assert load_config(CONFIGS / "series_selection.yaml", SeriesRules) == SeriesRules()


@pytest.mark.parametrize("text, field", [
    ("min_slices: -3\n", "min_slices"),
    ("orientation: diagonal\n", "orientation"),
    ("modalitys: [CT]\n", "modalitys"),
    ("slice_thickness_mm: [1, 2, 3]\n", "slice_thickness_mm"),
])
def test_bad_config_names_file_and_field(tmp_path, text, field):
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"{path}: {field}"):
        load_config(path, SeriesRules)


def test_not_yaml_or_not_a_mapping(tmp_path):
    (tmp_path / "a.yaml").write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "a.yaml", SeriesRules)
    (tmp_path / "b.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "b.yaml", SeriesRules)


def test_rules_file_changes_the_choice(tmp_path):
    thin = SeriesSpec(make_slices(6, seed=1), slice_thickness=1.0, description="thin")
    thick = SeriesSpec(make_slices(4, seed=2), slice_thickness=5.0, description="thick")
    write_series(tmp_path / "dicom" / "thin", thin)
    write_series(tmp_path / "dicom" / "thick", thick)
    rules = tmp_path / "rules.yaml"
    rules.write_text("slice_thickness_mm: [3, 6]\n")
    result = CliRunner().invoke(main, ["info", str(tmp_path / "dicom"), "--rules", str(rules)])
    assert result.exit_code == 0, result.output
    assert "series #2: CT 'thick', 4 slices, axial, thickness 5 mm  <- chosen" in result.output
    assert "skipped: slice thickness 1.0 outside [3.0, 6.0] mm" in result.output


def test_shipped_deeplesion_config_is_valid():
    from ctzoo.datasets.deeplesion.dataset import DeepLesionConfig

    cfg = load_config(CONFIGS / "deeplesion_mini.yaml", DeepLesionConfig)
    assert cfg.num_slices % 2 == 1 and cfg.norm_spacing_mm == 0.8
    assert cfg.images_root == Path("data/deeplesion-mini/Images_png")


@pytest.mark.parametrize("command", [
    ("train", "{binary}", "--out", "{out}"),
    ("info", "{sample}", "--rules", "{binary}"),
    ("place", "profile", "{binary}", "--out", "{out}/profile.json"),
], ids=lambda c: c[0])
def test_a_binary_file_as_config_is_one_line_naming_it(tmp_path, command):
    """A binary file given as a YAML config used to end in a UnicodeDecodeError traceback (train) or an error
    that did not name the file (info --rules)."""
    from ctzoo.datasets.samples import sample_ct_dicom

    binary = tmp_path / "ct.yaml"
    binary.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)))  # a gzip header, as a .nii.gz starts
    words = (word.format(binary=binary, sample=sample_ct_dicom(), out=tmp_path / "run") for word in command)
    result = CliRunner().invoke(main, list(words))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output == f"Error: {binary}: not a YAML config file (byte 1 is 0x8b: not UTF-8 text)\n"
