"""The README's tour runs as written, block by block, in order.

Every fenced block of "## A tour" (but the signed-tasks one, which needs keys made on the spot, and the
example app, which tests/e2e/test_example.py runs) is taken from README.md as it is: a Python
block whose first line names a file (``# proj/tasks.py``) is written to that file; a ``sh`` block is
run as a command (``brokerd-worker`` in the background, anything else to completion); every other
Python block runs in a fresh interpreter, in order, from the project directory.  The one edit: the
README's address, ``127.0.0.1:7700``, becomes the test's brokerd.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.broker import ROOT

BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
README_ADDRESS = "127.0.0.1:7700"
TIMEOUT = 60.0  # seconds for one block on a loaded CI box


def section(text: str, heading: str, next_heading: str) -> str:
    start = text.index(heading)
    return text[start:text.index(next_heading, start + len(heading))]


def tour_blocks(text: str) -> list[tuple[str, str]]:
    # Signed tasks need keys made on the spot (their own tests run them); the example app is
    # run by test_example.py; the rest of the tour is here.
    parts = section(text, "## A tour", "### Signed tasks") + section(text, "### Messages, without the task layer", "\n### ")
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(parts)]


def test_the_tour_has_the_blocks_this_test_runs():
    kinds = [k for k, _ in tour_blocks((ROOT / "README.md").read_text())]
    assert kinds.count("python") >= 3 and kinds.count("sh") >= 2, kinds


def test_the_readme_tour_runs_as_written(broker, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"  # as with the venv activated
    background: list[subprocess.Popen] = []
    ran = []
    try:
        for kind, code in tour_blocks((ROOT / "README.md").read_text()):
            code = code.replace(README_ADDRESS, broker.address)
            first = code.splitlines()[0]
            if kind == "python" and re.fullmatch(r"# [\w/]+\.py", first.strip()):
                path = project / first.strip()[2:]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(code)
                ran.append(f"wrote {path.name}")
            elif kind == "python":
                p = subprocess.run([sys.executable, "-c", code], cwd=project, env=env, capture_output=True,
                                   text=True, timeout=TIMEOUT)
                assert p.returncode == 0, f"README block failed:\n{code}\n--- stderr ---\n{p.stderr}"
                ran.append("python")
            elif kind == "sh":
                for line in code.splitlines():
                    command = line.split("#", 1)[0].strip()
                    if not command:
                        continue
                    argv = shlex.split(command)
                    if argv[0] == "brokerd-worker":
                        background.append(subprocess.Popen(argv, cwd=project, env=env, stdout=subprocess.DEVNULL,
                                                           stderr=subprocess.DEVNULL))
                    else:
                        p = subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True,
                                           timeout=TIMEOUT)
                        assert p.returncode == 0, f"README command failed: {command}\n{p.stderr}"
                    ran.append(argv[0])
        assert ran.count("python") >= 3 and "brokerd-worker" in ran and "brokerd-beat" in ran, ran
        schedules = broker.admin("SCHEDULES\n")
        assert "top-papers-hourly" in schedules and "cleanup" in schedules, schedules
    finally:
        for p in background:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
