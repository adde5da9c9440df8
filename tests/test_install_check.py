"""CI proves that Plasma works wherever it is installed: the README's install lines are the ones
``deploy/scripts/check-install.sh`` runs, and the README's test command (what CI runs) runs it.

The check itself (a wheel, fresh virtual environments, the quick start, a demo and a device
daemon from a temporary directory) takes minutes; ``run-tests.sh`` runs it before pytest."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "deploy" / "scripts"


def _install_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, re.S)[0]


def test_the_readme_install_lines_are_the_ones_ci_runs() -> None:
    readme = set(re.findall(r"^pip install '\.\[([a-z,]+)\]'", _install_block(), re.M))
    check = (SCRIPTS / "check-install.sh").read_text()
    ci = set(re.findall(r'pip install "\$WHEEL\[([a-z,]+)\]"', check))
    assert readme == ci == {"server,demo", "env"}, (readme, ci)
    assert "pip wheel --no-deps" in check and "pip wheel --no-deps ." in (ROOT / "README.md").read_text()


def test_ci_runs_the_install_check_through_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "```bash\nbash deploy/scripts/run-tests.sh\n```" in readme
    assert "bash deploy/scripts/run-tests.sh" in (ROOT / ".ci" / "run").read_text()
    assert "bash deploy/scripts/check-install.sh" in (SCRIPTS / "run-tests.sh").read_text()


def test_the_install_check_runs_what_the_issue_asks() -> None:
    check = (SCRIPTS / "check-install.sh").read_text()
    assert 'cp "$ROOT/docs/examples/quickstart.py"' in check  # the README's quick start
    assert "demo --duration 20" in check and '"accepted"' in check
    assert '"--model", "pendulum-nominal"' in check and "plasma.server" in check
    assert "unset PYTHONPATH" in check and 'cd "$WORK/run"' in check
