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
