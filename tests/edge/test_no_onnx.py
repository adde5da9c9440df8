"""Edge tests run on a device's dependencies: no ``onnx``, no exporter, no server code.

They load the prebuilt bundles of tests/fixtures/bundles; the exporter's tests live in
tests/server/test_export.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
FORBIDDEN = re.compile(r"^\s*(?:import|from)\s+((?:onnx|plasma\.server|tests\.fixtures)\b\S*)",
                       re.MULTILINE)

BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "onnx" or name.startswith(("onnx.", "plasma.server")):
            raise ImportError(f"{name} is blocked: edge tests must not need it")
        return None
sys.meta_path.insert(0, Block())
import pytest
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", sys.argv[1]]))
"""


def test_edge_tests_and_helpers_import_no_onnx_nor_server() -> None:
    for path in sorted([*(TESTS / "edge").glob("*.py"), *(TESTS / "helpers").glob("*.py")]):
        if path == Path(__file__).resolve():
            continue
        found = FORBIDDEN.findall(path.read_text())
        assert not found, f"{path.relative_to(TESTS)} imports {found}"


def test_edge_tests_collect_with_onnx_blocked() -> None:
    done = subprocess.run([sys.executable, "-c", BLOCK, str(TESTS / "edge")], capture_output=True,
                          text=True, cwd=TESTS.parent, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "tests collected" in done.stdout, done.stdout[-500:]
