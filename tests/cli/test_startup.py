"""`--help` and `validate` start fast: they import neither torch nor the data stack."""

from __future__ import annotations

import subprocess
import sys

from tests.train_fixtures import ROOT

HEAVY = ("torch", "av", "zarr", "numpy", "peft", "transformers")

_PROBE = """
import runpy, sys
sys.argv = ["cosmos-train", *{args!r}]
try:
    runpy.run_module("cosmos_train", run_name="__main__")
except SystemExit:
    pass
print("IMPORTED", " ".join(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


def _heavy_imports(*args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _PROBE.format(args=list(args), heavy=HEAVY)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("IMPORTED"))
    return line.split()[1:]


def test_help_and_validate_import_no_torch():
    assert _heavy_imports("--help") == []
    assert _heavy_imports("run", "--help") == []
    assert _heavy_imports("validate", str(ROOT / "examples" / "tiny.toml")) == []
