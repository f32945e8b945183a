"""scripts/ensure-*.sh: `make test` installs a missing broker or promtool as root, unless
NO_INSTALL=1, which makes a missing one an error naming the package."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT


def fake_root(bindir: Path) -> Path:
    """A PATH directory where `id -u` says 0 and `apt-get` only records that it was called."""
    bindir.mkdir()
    calls = bindir / "apt-get.calls"
    (bindir / "id").write_text("#!/bin/sh\necho 0\n")
    (bindir / "apt-get").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    for tool in ("id", "apt-get"):
        (bindir / tool).chmod(0o755)
    return calls


def ensure(script: str, bindir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the script as root would, with neither the binary nor /usr/sbin on its PATH."""
    return subprocess.run(
        ["/bin/bash", str(ROOT / "scripts" / script)],
        env={"PATH": str(bindir), "ENSURE_EXTRA_PATH": "", **env},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("script", "package"),
    [("ensure-mosquitto.sh", "mosquitto"), ("ensure-promtool.sh", "prometheus")],
)
def test_no_install_names_the_missing_package_and_installs_nothing(script, package, tmp_path):
    calls = fake_root(tmp_path / "bin")
    result = ensure(script, tmp_path / "bin", NO_INSTALL="1")
    assert result.returncode == 1
    assert "NO_INSTALL=1 forbids installing" in result.stderr
    assert f"'{package}' package (apt-get install {package}" in result.stderr
    assert not calls.exists(), "apt-get ran despite NO_INSTALL=1"


def test_without_no_install_root_installs_the_missing_broker(tmp_path):
    """The same set-up without the opt-out reaches apt-get: the test above tests something."""
    calls = fake_root(tmp_path / "bin")
    result = ensure("ensure-mosquitto.sh", tmp_path / "bin")
    assert result.returncode == 0, result.stderr
    assert "install -y -qq mosquitto" in calls.read_text()
    assert "NO_INSTALL=1 to refuse" in result.stderr
