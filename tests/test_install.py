"""The lock file and pyproject.toml agree, the environment runs the locked versions, and a broken install says so."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def locked() -> dict[str, str]:
    """{canonical name: version} of the lock entries whose marker holds in this interpreter."""
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        spec, _, marker = line.partition(";")
        name, _, version = spec.strip().partition("==")
        assert version, f"requirements.lock: {line!r} is not an exact pin; refresh it with `make lock`"
        if not marker.strip() or Marker(marker.strip()).evaluate():
            pins[canonicalize_name(name)] = version.strip()
    return pins


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"] + project["optional-dependencies"]["dev"]]


def test_every_declared_dependency_is_locked_within_its_range():
    pins = locked()
    stale = []
    for requirement in declared():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        version = pins.get(canonicalize_name(requirement.name))
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            stale.append(f"{requirement} (locked: {version})")
    assert not stale, f"pyproject.toml and requirements.lock disagree on {stale}; run `make lock`"


def test_the_environment_runs_the_locked_versions():
    wrong = []
    for name, version in locked().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong.append(f"{name} missing (locked {version})")
            continue
        if installed.split("+")[0] != version.split("+")[0]:
            wrong.append(f"{name} {installed} (locked {version})")
    assert not wrong, f"installed packages differ from requirements.lock: {wrong}; run `make install`"


def test_a_torchaudio_that_does_not_load_is_one_line_naming_the_fix(tmp_path):
    # A torchaudio whose compiled library fails to load, as torchaudio 2.11.1 does on torch 2.11.0.
    fake = tmp_path / "torchaudio"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "raise OSError('libtorchaudio.so: undefined symbol: torch_exception_get_what_without_backtrace')\n")
    for command in (["-m", "shards", "verify", str(tmp_path)], ["-m", "pretrain", "embed", "x", "y", "--out", "z"],
                    ["-m", "pytest", "-q", str(ROOT / "tests" / "shards" / "test_split.py")]):
        result = subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=ROOT,
                                env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"})
        output = (result.stderr + result.stdout).strip()
        assert result.returncode == 2, (command, output)
        assert "Traceback" not in output, output
        line = next(text for text in output.splitlines() if "undefined symbol" in text)
        assert "make install" in line and "torchaudio" in line, line
