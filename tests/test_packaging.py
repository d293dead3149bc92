"""The built wheel carries what a non-editable install needs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_wheel_ships_models_toml_and_bench_text(tmp_path: Path) -> None:
    pytest.importorskip("hatchling", reason="the test extra installs hatchling to build the wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("kvchat-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert zf.read("kvchat/models.toml") == (REPO / "models.toml").read_bytes()
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "kvchat/data/bench_text.txt" in names
    assert "kvchat = kvchat.__main__:main" in entry_points
    assert not any(n.endswith((".gguf", ".pyc")) for n in names)
