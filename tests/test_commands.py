"""The README's ways of running the tests: ./test.sh runs `python -m pytest -q tests`, which puts
the working folder on the path by itself; plain `pytest` from the activated venv, in any folder
of the repository, relies on pytest.ini to find the modules."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pytest_finds_the_modules_from_any_folder():
    # `python -m pytest` run inside tests/ puts tests/ on the path, not the root: as plain `pytest` does
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "test_attention.py"], cwd=os.path.join(ROOT, "tests"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "test_engines_agree_with_float64_reference" in proc.stdout
