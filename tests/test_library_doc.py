"""docs/library.md: its in-process recipe runs as written (the doc cannot rot)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "library.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def test_the_doc_has_one_recipe() -> None:
    assert len(_python_blocks()) == 1


def test_the_recipe_runs(capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, object] = {"__name__": "library_doc"}
    exec(compile(_python_blocks()[0], str(DOC), "exec"), namespace)  # noqa: S102 - our own doc
    assert capsys.readouterr().out.startswith("accepted fleet adapter v1")
    outcome = namespace["outcome"]
    assert outcome.record.verdict == "accepted"  # type: ignore[attr-defined]
    replay = namespace["device"].receive(namespace["packet"], source="fleet")  # type: ignore[attr-defined]
    assert replay.record.verdict == "rejected"
    assert [r.code for r in replay.record.reasons] == ["already_active"]
