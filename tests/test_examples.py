"""Every script under docs/examples runs as is, and the README's quick start is one of them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gymnasium")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "docs" / "examples").glob("*.py"))
EXPECT = {
    "quickstart.py": ["Success probability:", "Generated LoRA packet with", "Completed 2000"],
    "evolution.py": ["noise-free return before:", "round 3:"],
    "custom_policy.py": ["refused as expected: [state_dim_mismatch]", "custom policy"],
    "judicial_auditing.py": ["spiked reward: rejected ['reward_spike']", "frozen sensor: rejected"],
    "lora_distillation.py": ["device audit: accepted", "untrusted key: rejected ['unknown_key']"],
}


def test_every_example_is_checked() -> None:
    assert {p.name for p in EXAMPLES} == set(EXPECT)


def test_readme_quick_start_is_the_example() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    quick = (ROOT / "docs" / "examples" / "quickstart.py").read_text()
    body = quick.split('"""', 2)[2].lstrip("\n")
    assert any(block.strip() == body.strip() for block in blocks), "README quick start differs"


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script: Path) -> None:
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=400, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    for line in EXPECT[script.name]:
        assert line in out.stdout, out.stdout
