"""Render a ``ctzoo nas view`` page to PNG in headless chromium: ``python benchmarks/nas_explorer_screenshot.py
PAGE.html OUT.png [--width 1400 --height 1000] [--candidate ID | --no-click]``.

The browser (offline: every host name unresolvable), the wait until drawn, the real click on an SVG point, the
capture and the arguments are ``perf_report_screenshot.py``'s, imported. By default the best candidate by Dice is
clicked in the scatter, so the panel shows its architecture. ``tests/test_nas_explorer.py`` drives the page with
the same functions.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))  # appended: a benchmark never shadows an installed module
from perf_report_screenshot import (  # noqa: E402
    capture,
    click_point,
    parse_screenshot_arguments,
    screenshot_arguments,
)


def click_candidate(driver, candidate_id: str, plot: str = "#scatter", timeout_s: float = 5.0) -> None:
    """A real mouse click on the candidate's point in ``plot`` (``#scatter`` or ``#embedding``); waits until the
    page has selected it (the panel shows it, ``body[data-selected]``)."""
    if not click_point(driver, plot, candidate_id):
        raise LookupError(f"candidate {candidate_id!r} is not in {plot}")
    deadline = time.monotonic() + timeout_s
    while driver.execute_script("return document.body.dataset.selected") != candidate_id:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the page did not select {candidate_id!r} after the click")
        time.sleep(0.05)


def best_candidate(driver) -> str:
    """The id of the page's best candidate by Dice (of equal ones the fastest)."""
    return driver.execute_script("return DATA.candidates.find(c => c.rank === 1).id")


def screenshot(page: Path, out: Path, width: int = 1400, height: int = 1000, candidate: str | None = None,
               click: bool = True) -> None:
    """``page`` drawn in a ``width`` x ``height`` viewport, written to ``out`` (PNG), after a click on
    ``candidate`` (default: the best by Dice) unless ``click`` is False."""
    def select(driver) -> None:
        click_candidate(driver, candidate if candidate is not None else best_candidate(driver))

    capture(page, out, width, height, prepare=select if click else None)


def main(argv: list[str] | None = None) -> int:
    parser = screenshot_arguments(__doc__.split("\n\n")[0], "the HTML page of ctzoo nas view")
    parser.add_argument("--candidate", default=None, help="click this candidate (default: the best by Dice)")
    parser.add_argument("--no-click", action="store_true", help="leave the candidate panel empty")
    args = parse_screenshot_arguments(parser, argv)
    screenshot(args.page, args.out, args.width, args.height, candidate=args.candidate, click=not args.no_click)
    print(f"{args.out}: {args.width}x{args.height}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
