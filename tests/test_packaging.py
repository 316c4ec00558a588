"""The Makefile's setup: `make serve` installs what serving needs, everything else the dev
extras too, and neither reinstalls what the other already did (make -n: what it would run)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.helpers import REPO_ROOT

SERVING_INSTALL = "pip install --quiet -e .\n"
DEV_INSTALL = "pip install --quiet -e '.[dev]'"


def would_run(target: str, venv: Path) -> str:
    result = subprocess.run(
        ["make", "-n", target, f"VENV={venv}"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_make_serve_installs_the_package_without_the_dev_extras(tmp_path: Path) -> None:
    commands = would_run("serve", tmp_path / "venv")
    assert "-m venv" in commands
    assert SERVING_INSTALL in commands
    assert DEV_INSTALL not in commands


def test_make_test_installs_the_dev_extras(tmp_path: Path) -> None:
    assert DEV_INSTALL in would_run("test", tmp_path / "venv")
    assert DEV_INSTALL in would_run("lint", tmp_path / "venv")


def test_each_setup_is_done_once(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    (venv / ".installed-serving").touch()  # as after `make serve`
    assert "pip install" not in would_run("serve", venv)
    assert DEV_INSTALL in would_run("test", venv)  # the dev extras are still missing
    (venv / ".installed-dev").touch()  # as after `make test`
    assert "pip install" not in would_run("test", venv)
    assert "pip install" not in would_run("serve", venv)
