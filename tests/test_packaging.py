"""What users install: the wheel carries the mirror, not the launchers the tests and bench use."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT

# Words only a launcher of test services contains (Mosquitto, initdb, openssl, TCP relays).
LAUNCHER_MARKERS = (b"find_mosquitto", b"initdb", b"openssl", b"TcpProxy", b"fresh_database")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("flespi_mirror-*.whl")
    return built


def test_the_wheel_ships_no_test_service_launchers(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        modules = [n for n in archive.namelist() if n.startswith("mirror/") and n.endswith(".py")]
        assert "mirror/cli.py" in modules and "mirror/_migrations/env.py" in modules
        carrying = [
            name
            for name in modules
            if any(marker in archive.read(name) for marker in LAUNCHER_MARKERS)
        ]
    assert carrying == [], f"test support shipped to users in {carrying}"
