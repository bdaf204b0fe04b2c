"""Render a ``ctzoo perf report`` page to PNG in headless chromium: ``python benchmarks/perf_report_screenshot.py
REPORT.html OUT.png [--width 1400 --height 1000] [--no-click] [--stage S] [--profiled]``.

Needs Debian's ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``, ``/usr/bin/chromedriver``) and the
``selenium`` package (the ``test`` extra). The browser runs with a fresh profile and with every host name
unresolvable, so the picture is what the page draws offline. The slowest anomaly is clicked first (a real click
on its timeline point), so the provenance panel shows it. ``tests/test_perf_report.py`` drives the page with the
same browser and click (:func:`headless_chromium`, :func:`wait_until_drawn`, :func:`click_anomaly`).
``benchmarks/nas_explorer_screenshot.py`` imports them (and :func:`click_point`, :func:`capture` and the
arguments) for the NAS explorer page.
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
    if not click_point(driver, "#timeline", anomaly_id):
        raise LookupError(f"anomaly {anomaly_id} is not in the timeline")
    deadline, heading = time.monotonic() + timeout_s, f"Anomaly #{anomaly_id}:" if exact else "Anomaly #"
    while not driver.execute_script("const h = document.querySelector('#provenance h3');"
                                    "return h !== null && h.textContent.startsWith(arguments[0])", heading):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the provenance panel did not show anomaly {anomaly_id} after the click")
        time.sleep(0.05)


def click_point(driver, plot: str, point_id) -> bool:
    """A real mouse click (pointer to the SVG marker, a pause, a click) on the first point of the plot at CSS
    selector ``plot`` whose ``customdata[0]`` is ``point_id``; False if there is none. ``tests/test_nas_explorer.py``
    and ``nas_explorer_screenshot.py`` click with it too."""
    from selenium.webdriver.common.action_chains import ActionChains

    point = driver.execute_script("""
        for (const trace of document.querySelectorAll(arguments[0] + ' .scatterlayer .trace')) {
          const customdata = trace.__data__[0].trace.customdata;  // the figure's data, bound to the SVG by d3
          for (const point of trace.querySelectorAll('path.point'))
            if (customdata && customdata[point.__data__.i][0] === arguments[1]) return point;
        }
        return null;""", plot, point_id)
    if point is None:
        return False
    ActionChains(driver).move_to_element(point).pause(0.3).click().perform()
    return True


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
    def click(driver) -> None:
        slowest = slowest_anomaly(driver, stage, profiled) if click_slowest else None
        if slowest is not None:
            click_anomaly(driver, slowest, exact=False)
            if profiled:  # its point may lie under a neighbour's: open it as the click handler would
                driver.execute_script("showAnomaly(arguments[0])", slowest)

    capture(report, out, width, height, prepare=click)


def capture(page: Path, out: Path, width: int = 1400, height: int = 1000, prepare=None) -> None:
    """``page`` as drawn in a fresh offline chromium with a ``width`` x ``height`` viewport, written to ``out``
    (PNG); ``prepare(driver)``, if given, runs once every plot is drawn (a click, say)."""
    with tempfile.TemporaryDirectory(prefix="ctzoo-page-chromium-") as profile:
        driver = headless_chromium(Path(profile), width, height)
        try:
            driver.get(Path(page).resolve().as_uri())
            wait_until_drawn(driver)
            if prepare is not None:
                prepare(driver)
            if not driver.save_screenshot(str(out)):
                raise RuntimeError(f"chromium could not write {out}")
        finally:
            driver.quit()


def screenshot_arguments(description: str, page_help: str) -> argparse.ArgumentParser:
    """The arguments every page screenshot takes: the page, the PNG and the viewport."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("page", type=Path, help=page_help)
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1000)
    return parser


def parse_screenshot_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``argv`` parsed; a usage error if the page does not exist."""
    args = parser.parse_args(argv)
    if not args.page.is_file():
        parser.error(f"{args.page} does not exist")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = screenshot_arguments(__doc__.split("\n\n")[0], "the HTML page of ctzoo perf report")
    parser.add_argument("--no-click", action="store_true", help="leave the provenance panel empty (by default the "
                        "slowest anomaly is clicked)")
    parser.add_argument("--stage", default=None, help="click the slowest anomaly of this stage")
    parser.add_argument("--profiled", action="store_true", help="click the slowest anomaly with a deep profile")
    args = parse_screenshot_arguments(parser, argv)
    screenshot(args.page, args.out, args.width, args.height, click_slowest=not args.no_click, stage=args.stage,
               profiled=args.profiled)
    print(f"{args.out}: {args.width}x{args.height}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
