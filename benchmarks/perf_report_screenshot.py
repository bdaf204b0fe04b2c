"""Render a ``ctzoo perf report`` page to PNG in headless chromium: ``python benchmarks/perf_report_screenshot.py
REPORT.html OUT.png [--width 1400 --height 1000] [--no-click] [--stage S] [--profiled]``.

Needs Debian's ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``, ``/usr/bin/chromedriver``) and the
``selenium`` package (the ``test`` extra). The browser runs with a fresh profile and with every host name
unresolvable, so the picture is what the page draws offline. The slowest anomaly is clicked first (a real click
on its timeline point), so the provenance panel shows it. ``tests/test_perf_report.py`` drives the page with the
same browser and click (:func:`headless_chromium`, :func:`wait_until_drawn`, :func:`click_anomaly`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

CHROMEDRIVER = "/usr/bin/chromedriver"


def headless_chromium(user_data_dir: Path, width: int = 1400, height: int = 1000):
    """A selenium driver for a fresh headless chromium that makes no network connection of its own."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1",
                     # any host name fails to resolve: a page that fetched something would show it broken
                     "--host-resolver-rules=MAP * ~NOTFOUND",
                     f"--window-size={width},{height}", f"--user-data-dir={user_data_dir}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    # --window-size sets the window; the page should get exactly width x height
    inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    driver.set_window_size(width + width - inner[0], height + height - inner[1])
    return driver


def wait_until_drawn(driver, timeout_s: float = 30.0) -> None:
    """Wait until the page's script has drawn every plot (it sets ``body[data-ready]``)."""
    deadline = time.monotonic() + timeout_s
    while driver.execute_script("return document.body && document.body.dataset.ready") != "true":
        if time.monotonic() > deadline:
            raise TimeoutError(f"the report did not finish drawing within {timeout_s:.0f} s")
        time.sleep(0.05)


def click_anomaly(driver, anomaly_id: int, timeout_s: float = 5.0, exact: bool = True) -> None:
    """A real mouse click on the anomaly's point in the timeline (a pointer move to the SVG marker, then a click:
    plotly's own hit detection picks the point and the page's ``plotly_click`` handler fills the provenance panel);
    waits until the panel shows that anomaly (``exact=False``: any anomaly; two at the same time and latency, such
    as requests merged into one batch, share one point, and plotly picks the one drawn on top)."""
    from selenium.webdriver.common.action_chains import ActionChains

    point = driver.execute_script("""
        for (const trace of document.querySelectorAll('#timeline .scatterlayer .trace')) {
          const customdata = trace.__data__[0].trace.customdata;  // the figure's data, bound to the SVG by d3
          for (const point of trace.querySelectorAll('path.point'))
            if (customdata[point.__data__.i][0] === arguments[0]) return point;
        }""", anomaly_id)
    if point is None:
        raise LookupError(f"anomaly {anomaly_id} is not in the timeline")
    ActionChains(driver).move_to_element(point).pause(0.3).click().perform()
    deadline, heading = time.monotonic() + timeout_s, f"Anomaly #{anomaly_id}:" if exact else "Anomaly #"
    while not driver.execute_script("const h = document.querySelector('#provenance h3');"
                                    "return h !== null && h.textContent.startsWith(arguments[0])", heading):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the provenance panel did not show anomaly {anomaly_id} after the click")
        time.sleep(0.05)


def slowest_anomaly(driver, stage: str | None = None, profiled: bool = False) -> int | None:
    """The id of the page's longest anomaly in seconds, of ``stage`` if given, with a deep profile if ``profiled``
    (None when there is none)."""
    return driver.execute_script("const a = DATA.anomalies.filter(x => (arguments[0] === null || x.stage === "
                                 "arguments[0]) && (!arguments[1] || x.profile)).sort((x, y) => y.seconds - "
                                 "x.seconds)[0]; return a === undefined ? null : a.id", stage, profiled)


def screenshot(report: Path, out: Path, width: int = 1400, height: int = 1000, click_slowest: bool = True,
               stage: str | None = None, profiled: bool = False) -> None:
    """``report`` as drawn in a ``width`` x ``height`` viewport, written to ``out`` (PNG); with ``click_slowest``
    the slowest anomaly (of ``stage``, if given; with a deep profile if ``profiled``, then opened through the
    page's own ``showAnomaly`` if the click landed on a neighbour) is clicked first, so the provenance panel is
    filled. Its point must not lie under another: in a dense cluster plotly picks the point on
    top."""
    with tempfile.TemporaryDirectory(prefix="perf-report-chromium-") as profile:
        driver = headless_chromium(Path(profile), width, height)
        try:
            driver.get(Path(report).resolve().as_uri())
            wait_until_drawn(driver)
            slowest = slowest_anomaly(driver, stage, profiled) if click_slowest else None
            if slowest is not None:
                click_anomaly(driver, slowest, exact=False)
                if profiled:  # its point may lie under a neighbour's: open it as the click handler would
                    driver.execute_script("showAnomaly(arguments[0])", slowest)
            if not driver.save_screenshot(str(out)):
                raise RuntimeError(f"chromium could not write {out}")
        finally:
            driver.quit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="the HTML page of ctzoo perf report")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--no-click", action="store_true", help="leave the provenance panel empty (by default the "
                        "slowest anomaly is clicked)")
    parser.add_argument("--stage", default=None, help="click the slowest anomaly of this stage")
    parser.add_argument("--profiled", action="store_true", help="click the slowest anomaly with a deep profile")
    args = parser.parse_args(argv)
    if not args.report.is_file():
        parser.error(f"{args.report} does not exist")
    screenshot(args.report, args.out, args.width, args.height, click_slowest=not args.no_click, stage=args.stage,
               profiled=args.profiled)
    print(f"{args.out}: {args.width}x{args.height}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
