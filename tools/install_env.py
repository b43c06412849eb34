"""Install the project's pinned environment into a virtual environment, using both cores (``make env``).

``pip install -c requirements.lock -e .[dev]`` runs on one core: it resolves, downloads, unpacks and
byte-compiles ~270 packages one after the other (about 3.5 minutes on the 2-core build machine, half
of it compiling). Every version is pinned in ``requirements.lock``, so nothing needs resolving:

1. the pins are installed with ``--no-deps`` by two pip processes side by side (torch, the largest
   wheel, with a third of the rest in one, the other two thirds in the other; they write disjoint
   files);
2. the project itself, editable, without dependencies;
3. ``pip check``: every installed distribution's requirements are met. When the lock misses one (a
   dependency added to pyproject.toml but not to the lock), the ordinary resolving install runs
   to complete the environment, and a note says to update the lock;
4. byte-compilation on all cores (the ``.pyc`` files pip would write on one, less those of the
   packages' own test suites).

Any failure of step 1 falls back to the ordinary install, so the result is the environment
``pip install -c requirements.lock -e .[dev]`` gives. Plain Python: it runs before anything is
installed.

    python3 tools/install_env.py --venv .venv [--lock requirements.lock]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PIP = ["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile"]


def pins(lock: Path) -> list[str]:
    """``name==version`` lines of the lock (comments and blank lines dropped)."""
    out = []
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def halves(lines: list[str]) -> tuple[list[str], list[str]]:
    """Two install lists of about equal work: torch with every third other pin, and the rest."""
    big = [p for p in lines if p.lower().startswith("torch==")]
    rest = [p for p in lines if p not in big]
    first = big + rest[0::3]
    return first, [p for p in rest if p not in first]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", default=".venv")
    ap.add_argument("--lock", default="requirements.lock")
    ap.add_argument("--extras", default="dev")
    a = ap.parse_args(argv)
    py = str(Path(a.venv) / "bin" / "python")
    t0 = time.perf_counter()
    full = [py, *PIP, "-c", a.lock, "-e", f".[{a.extras}]"]
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for k, part in enumerate(halves(pins(Path(a.lock)))):
            req = Path(tmp) / f"part{k}.txt"
            req.write_text("\n".join(part) + "\n")
            procs.append(subprocess.Popen([py, *PIP, "--no-deps", "-r", str(req)]))
        ok = all(p.wait() == 0 for p in procs)
    if not ok:
        print("install_env: the side-by-side install of the pins failed (see above); running the ordinary install",
              file=sys.stderr)
        subprocess.run(full, check=True)
    else:
        subprocess.run([py, *PIP, "--no-deps", "-e", "."], check=True)
        check = subprocess.run([py, "-m", "pip", "check"], capture_output=True, text=True)
        if check.returncode != 0:
            print(f"install_env: {a.lock} misses requirements ({check.stdout.strip()}); completing the environment "
                  f"with the ordinary install. Add the missing pins to {a.lock}.", file=sys.stderr)
            subprocess.run(full, check=True)
    # the packages' own test suites (a quarter of the files: pandas/tests, scipy/*/tests, ...) are never
    # imported by the study; Python compiles them on the fly should anything import them
    subprocess.run([py, "-c", "import compileall, re, sysconfig; compileall.compile_dir(sysconfig.get_paths()"
                    "['purelib'], quiet=2, workers=0, rx=re.compile(r'[/\\\\]tests?[/\\\\]'))"], check=True)
    print(f"install_env: {a.venv} ready in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
