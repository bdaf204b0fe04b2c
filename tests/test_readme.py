"""The README as a newcomer uses it: its examples run as written, its links lead somewhere, it stays short.

Blocks marked ``<!-- example -->`` need no outside service and run here in order, in one empty folder, with this
environment's ``ctzoo`` first on PATH (the serve example gets a free port instead of 8000). The set-up commands
(``ci:main``, ``ci:test``) are run by CI itself; the PACS examples need an Orthanc and are covered by the PACS
tests and ``tests/smoke_install.py``.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from contextlib import closing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 250


def example_blocks(text: str) -> list[str]:
    """The fenced blocks that follow a ``<!-- example -->`` line."""
    return re.findall(r"^<!-- example -->\n```bash\n(.*?)^```", text, flags=re.S | re.M)


def _free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_readme_examples_run_as_written(tmp_path):
    blocks = example_blocks(README.read_text())
    assert len(blocks) >= 2, "the README lost its runnable examples"
    port = str(_free_port())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("CTZOO_SERVE_TOKENS", None)
    for block in blocks:
        script = block.replace("localhost:8000", f"localhost:{port}")
        if "ctzoo serve" in script:
            script = script.replace("ctzoo serve ", f"ctzoo serve --port {port} --threads 1 ", 1)
            script = "trap 'kill $(jobs -p) 2>/dev/null' EXIT\n" + script  # no server outlives a failure
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=480)
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"README example failed ({done.returncode}):\n{block}\n---\n{output[-4000:]}"
        assert "Traceback" not in output, output[-4000:]
        if "ctzoo serve" in script:
            assert '"lesions"' in done.stdout and "shutting down" in done.stderr, output[-4000:]
    assert (tmp_path / "results" / "ct" / "detections.json").is_file()
    assert (tmp_path / "results" / "ct" / "overlay.png").is_file()
    assert (tmp_path / "results" / "ct" / "labels.nii.gz").is_file()
    assert (tmp_path / "ct.nrrd").is_file()


def test_readme_is_short_and_its_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES, "move detail into docs/ and link it"
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    docs = sorted((ROOT / "docs").glob("*.md"))
    assert docs and all(f"docs/{page.name}" in links for page in docs), "every docs/ page is linked from the README"
    for page in [README, *docs]:
        for target in re.findall(r"\]\(([^)#\s:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_readme_commands_name_real_commands_and_files():
    """Every ``ctzoo ...`` line in the README's code blocks names a real command, and every configs/ file it
    mentions exists: examples that are not run still must not drift."""
    from click.testing import CliRunner

    from ctzoo.cli import main

    text = README.read_text()
    code = "\n".join(re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M))
    for line in code.splitlines():
        found = re.search(r"\bctzoo ((?:[a-z][a-z-]*)(?: [a-z][a-z-]*)?)", line)
        if found is None or "pip install" in line:
            continue
        words = found.group(1).split()
        result = CliRunner().invoke(main, [*words, "--help"])
        if result.exit_code != 0:  # a second word may be an argument, not a subcommand
            result = CliRunner().invoke(main, [words[0], "--help"])
        assert result.exit_code == 0, f"README line names no command: {line}\n{result.output}"
    for config in re.findall(r"configs/[\w.-]+\.yaml", text):
        assert (ROOT / config).is_file(), f"README names {config}, which does not exist"
