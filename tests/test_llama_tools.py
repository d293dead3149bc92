"""benchmarks/llama_tools.py unpacks llama-cpp-python's sdist safely on every Python
pyproject allows, with or without tarfile's extraction filters (3.11.4 / 3.12 on)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import llama_tools
import pytest


def _tar(path: Path, members: list[tuple[str, bytes | None, str | None]]) -> Path:
    """A .tar.gz of (name, file bytes | None for a folder, symlink target | None)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            elif data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o6777  # setuid, world-writable: both dropped
                tar.addfile(info, io.BytesIO(data))
    return path


SDIST = [
    ("llama_cpp_python-0.3/vendor/llama.cpp", None, None),
    ("llama_cpp_python-0.3/vendor/llama.cpp/CMakeLists.txt", b"project(llama)\n", None),
    ("llama_cpp_python-0.3/vendor/llama.cpp/models/big.gguf", b"GGUF", None),
    ("llama_cpp_python-0.3/README.md", b"readme", None),
]


@pytest.fixture(params=["filter", "no filter"])
def python_tarfile(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both kinds of Python: with tarfile.data_filter, and without it (3.11.2)."""
    if request.param == "no filter":
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
        plain = tarfile.TarFile.extractall

        def extractall(self: tarfile.TarFile, path: str | Path = ".", members: Any = None, *,
                       numeric_owner: bool = False, **filter_arg: Any) -> None:
            if filter_arg:  # as on 3.11.2: extractall() got an unexpected keyword argument 'filter'
                raise TypeError(f"extractall() got an unexpected keyword argument {next(iter(filter_arg))!r}")
            plain(self, path, members, numeric_owner=numeric_owner, filter="fully_trusted")

        monkeypatch.setattr(tarfile.TarFile, "extractall", extractall)
    elif not hasattr(tarfile, "data_filter"):
        pytest.skip("this Python has no tarfile filters")
    return str(request.param)


def test_the_sdist_unpacks_vendor_llama_cpp_only(tmp_path: Path, python_tarfile: str) -> None:
    sdist = _tar(tmp_path / "sdist.tar.gz", SDIST)
    into = tmp_path / "src"
    into.mkdir()
    source = llama_tools._extract_llama_cpp(sdist, into)
    assert (source / "CMakeLists.txt").read_text() == "project(llama)\n"
    assert not (source / "models").exists() and not (into / "llama_cpp_python-0.3" / "README.md").exists()
    mode = (source / "CMakeLists.txt").stat().st_mode
    assert not mode & 0o6022  # no setuid/setgid, no group/other write


@pytest.mark.parametrize("bad", [
    ("../escaped.txt", b"x", None),
    ("/tmp/absolute-kvchat-test.txt", b"x", None),
    ("pkg/../../escaped.txt", b"x", None),
    ("pkg/link", None, "/etc/passwd"),
])
def test_nothing_lands_outside_the_folder(tmp_path: Path, python_tarfile: str,
                                          bad: tuple[str, bytes | None, str | None]) -> None:
    archive = _tar(tmp_path / "bad.tar.gz", [("pkg", None, None), ("pkg/ok.txt", b"ok", None), bad])
    into = tmp_path / "out"
    into.mkdir()
    with tarfile.open(archive) as tar:
        try:
            llama_tools.extract_checked(tar, tar.getmembers(), into)
            refused = False
        except (RuntimeError, tarfile.TarError):
            refused = True
    assert not (tmp_path / "escaped.txt").exists()
    assert not Path("/tmp/absolute-kvchat-test.txt").exists()
    assert not (into / "pkg" / "link").is_symlink()
    if python_tarfile == "no filter":  # refused before anything is written
        assert refused and not (into / "pkg").exists()
    else:  # the data filter strips a leading '/' and extracts inside; it refuses the rest
        assert refused or bad[0].startswith("/")
