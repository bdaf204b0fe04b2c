"""``ctzoo smap view``'s reading of a map file and the page's words, on map files written here (no secure run: the
run itself and the drawn page are tested in test_smap_secure.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ctzoo.cli import main
from ctzoo.smap.page import build_figure, read_map, render_map_html
from ctzoo.smap.site_file import read_site, site_digest, write_site


def make_site(path: Path, count: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    return write_site({"features": rng.normal(0, 1, (count, 8)).astype(np.float32),
                       "labels": rng.integers(1, 4, count).astype(np.int16),
                       "scores": np.full(count, np.nan, np.float32),
                       "meta": {"kind": "annotated", "model": "m", "model_version": "1", "weights": "w"}}, path)


def write_map(path: Path, site: Path, plaintext: bool = False, shared: bool = False, **changes) -> Path:
    """A map file as ``ctzoo smap party --out`` writes it for party 0 of two sites of 3 points and a helper."""
    own = np.random.default_rng(1).normal(0, 1, (3, 2))
    arrays = {"index": 0, "shared": shared, "plaintext": plaintext, "site_digest": site_digest(site),
              "counts": np.asarray([3, 3, 0]), "own": own, "extent": np.asarray([-3.0, 3.0, -3.0, 3.0]),
              "density": np.full((4, 4), 0), "others_density": np.full((4, 4), 0)}
    arrays["density"][0, :3], arrays["others_density"][0, :3] = 2, 1
    if shared:
        arrays.update(all_points=np.vstack([own, own + 1]), all_sites=np.repeat([0, 1], 3),
                      all_labels=np.ones(6, np.int64))
    arrays.update(changes)
    with open(path, "wb") as handle:
        np.savez(handle, **{name: np.asarray(value) for name, value in arrays.items() if value is not None})
    return path


@pytest.mark.parametrize("plaintext, shared, says, never", [
    (False, False, "computed on secret shares", "in the clear"),
    (False, True, "Every site then agreed to share its points", "counts per cell"),
    (True, True, "computed in the clear (--insecure-plaintext)", "secret shares")])
def test_the_page_says_how_the_map_was_computed(tmp_path, plaintext, shared, says, never):
    site = make_site(tmp_path / "site.npz")
    page = render_map_html(read_map(write_map(tmp_path / "map.npz", site, plaintext, shared), read_site(site)))
    note = page[page.index("<p class='note'>"):page.index("<div id='map'>")]
    assert says in note and never not in note


def test_a_map_file_without_the_record_of_how_it_was_computed_is_refused(tmp_path):
    site = make_site(tmp_path / "site.npz")
    old = write_map(tmp_path / "old.npz", site, plaintext=None)
    result = CliRunner().invoke(main, ["smap", "view", str(old), "--site", str(site)])
    assert result.exit_code == 1 and "written by an older ctzoo smap party (it lacks plaintext)" in result.output


def test_the_page_refuses_another_site_file_with_as_many_points(tmp_path):
    """Another site file of as many points (a site's features written again: its rows are shuffled afresh) would
    label the wrong points: refused, by the digest the map file records."""
    site, other = make_site(tmp_path / "site.npz"), make_site(tmp_path / "again.npz", seed=1)
    ran_with = write_map(tmp_path / "map.npz", site)
    assert len(read_site(other)["labels"]) == len(read_site(site)["labels"])
    result = CliRunner().invoke(main, ["smap", "view", str(ran_with), "--site", str(other)])
    assert result.exit_code == 1 and "was computed from another site file than" in result.output
    assert "give the site file this party ran with" in result.output and not (tmp_path / "map.html").exists()
    assert CliRunner().invoke(main, ["smap", "view", str(ran_with), "--site", str(site)]).exit_code == 0


def test_the_page_says_when_the_secure_precision_search_saturated(tmp_path):
    """The bit a secure run opens when some point's precision search ended at an end of its range; map files from
    before it (no such array) read as not saturated."""
    site = make_site(tmp_path / "site.npz")
    for saturated in (True, False, None):
        data = read_map(write_map(tmp_path / "map.npz", site, p_saturated=saturated), read_site(site))
        page = render_map_html(data)
        note = page[page.index("<p class='note'>"):page.index("<div id='map'>")]
        assert ("The secure precision search saturated for some point" in note) == bool(saturated)


def test_the_page_numbers_the_sites_from_1_skipping_helpers(tmp_path):
    """Party 2 of a site, a helper and a site is site 2 of 2, in the summary and the legend alike (the page used
    to say "Site 2 of 2" for party 2 but "Site 0 of 3" for party 0 without helpers, and "site 0", "site 2" in the
    legend)."""
    site = make_site(tmp_path / "site.npz")
    own = np.random.default_rng(1).normal(0, 1, (3, 2))
    for index, counts, summary in ((2, [3, 0, 3], "Site 2 of 2 (and 1 helper)"), (0, [3, 3, 3], "Site 1 of 3 ·")):
        sites = np.repeat(np.arange(len(counts)), counts)
        data = read_map(write_map(tmp_path / "map.npz", site, shared=True, index=index, counts=np.asarray(counts),
                                  all_points=np.vstack([own + k for k in range(len(sites) // 3)]), all_sites=sites,
                                  all_labels=np.ones(len(sites), np.int64)), read_site(site))
        page = render_map_html(data)
        assert summary in page[page.index("<p id='summary'>"):page.index("<p class='note'>")]
        legend = [trace["name"] for trace in build_figure(data)["data"]]
        if index == 2:
            assert legend == ["site 1 (3)", "site 2 (this site) (3)"]
        else:
            assert legend == ["site 1 (this site) (3)", "site 2 (3)", "site 3 (3)"]
