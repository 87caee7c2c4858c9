"""Paired A/B of bench/w1_inprocess.py: this checkout against another, the same driver, short runs
alternated in two long-lived processes, so both see the same load (a benchmark, not a test).

    python bench/w1_pair.py /work/main                       # W1 deep, 30 runs of 10,000 each
    python bench/w1_pair.py /work/main --shape keeping-up --rounds 20
    python bench/w1_pair.py /work/main --shape w2 -n 5000

Each side runs under its own checkout's ``.venv/bin/python`` (falls back to this interpreter) with
``BENCH_ROOT`` set, so its broker code is measured under this file's driver.  Prints the min and
the median CPU seconds per 50,000 messages (per 10,000 tasks for w2) and the ratios this/other;
on a loaded machine the min is the steadier figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

def start(root: Path) -> subprocess.Popen:
    py = root / ".venv" / "bin" / "python"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('w1_inprocess', {str(HERE / 'w1_inprocess.py')!r})\n"
        "w = importlib.util.module_from_spec(spec); spec.loader.exec_module(w)\n"
        "import broker; print(broker.__file__, flush=True)\n"
        "for line in sys.stdin:\n"
        "    shape, n = line.split()\n"
        "    print(w.run_w2(int(n)) if shape == 'w2' else w.run_w1(int(n), shape == 'deep'), flush=True)\n"
    )
    p = subprocess.Popen([str(py) if py.exists() else sys.executable, "-c", code], cwd=root, text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=dict(os.environ, BENCH_ROOT=str(root)))
    print(f"{root}: broker from {p.stdout.readline().strip()}")
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("other", help="the other checkout (e.g. /work/main)")
    ap.add_argument("--shape", choices=["keeping-up", "deep", "w2"], default="deep")
    ap.add_argument("-n", type=int, default=10_000, help="messages (tasks) per run (default 10000)")
    ap.add_argument("--rounds", type=int, default=30, help="runs of each side, alternated (default 30)")
    a = ap.parse_args()
    sides = {"this": start(HERE.parent), "other": start(Path(a.other).resolve())}
    runs: dict[str, list[float]] = {k: [] for k in sides}
    try:
        for r in range(a.rounds):
            order = list(sides.items()) if r % 2 == 0 else list(reversed(sides.items()))
            for name, p in order:
                p.stdin.write(f"{a.shape} {a.n}\n")
                p.stdin.flush()
                runs[name].append(float(p.stdout.readline()))
    finally:
        for p in sides.values():
            p.stdin.close()
            p.wait()
    unit = 10_000 if a.shape == "w2" else 50_000
    for name, v in runs.items():
        print(f"{a.shape} {name}: min {min(v) * unit / a.n:.3f} median {statistics.median(v) * unit / a.n:.3f} "
              f"CPU-s per {unit:,} ({len(v)} runs of {a.n:,})")
    print(f"this/other: min {min(runs['this']) / min(runs['other']):.3f}, "
          f"median {statistics.median(runs['this']) / statistics.median(runs['other']):.3f}")
    print(f"command: python bench/w1_pair.py {a.other} --shape {a.shape} -n {a.n} --rounds {a.rounds}")


if __name__ == "__main__":
    main()
