"""Screenshots of a cohort report's three views (README figures): Summary, Group and Individual.

    python benchmarks/cohort_screenshots.py COHORT/report.html docs/images/cohort

writes ``docs/images/cohort-summary.png``, ``-group.png`` and ``-individual.png`` (the Individual view with the
first lesion of its list beside its last entry, a CT series when the cohort has one). Uses
:mod:`perf_report_screenshot`'s offline headless chromium.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perf_report_screenshot import headless_chromium, wait_until_drawn  # noqa: E402

VIEWS = ("summary", "group", "individual")


def show_view(driver, view: str) -> None:
    """Click the view's tab and wait until its plots are drawn."""
    driver.find_element("css selector", f"nav button[data-view='{view}']").click()
    wait_until_drawn(driver)


def pick_pair(driver, first: int = 0, second: int = 1) -> tuple[str, str]:
    """Choose the Individual view's lesions by their place in its list; return their ids."""
    from selenium.webdriver.support.ui import Select

    options = [o.get_attribute("value") for o in driver.find_elements("css selector", "#pick-a option")]
    Select(driver.find_element("id", "pick-a")).select_by_value(options[first])
    Select(driver.find_element("id", "pick-b")).select_by_value(options[second])
    return options[first], options[second]


def capture_views(page: Path, prefix: Path, width: int = 1400, height: int = 1000) -> list[Path]:
    written = []
    with tempfile.TemporaryDirectory(prefix="ctzoo-page-chromium-") as profile:
        driver = headless_chromium(Path(profile), width, height)
        try:
            driver.get(page.resolve().as_uri())
            wait_until_drawn(driver)
            for view in VIEWS:
                show_view(driver, view)
                if view == "individual":
                    pick_pair(driver, 0, -1)  # the first test lesion beside the last entry: a CT series
                out = prefix.with_name(f"{prefix.name}-{view}.png")
                if not driver.save_screenshot(str(out)):
                    raise RuntimeError(f"chromium could not write {out}")
                written.append(out)
        finally:
            driver.quit()
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="a cohort report (ctzoo cohort report)")
    parser.add_argument("prefix", type=Path, help="PNG path prefix: PREFIX-summary.png, ...")
    arguments = parser.parse_args()
    for path in capture_views(arguments.page, arguments.prefix):
        print(path)
