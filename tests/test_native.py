"""fapool.native: each C kernel is compiled once per source, flags and CPU into the cache
directory, reused after, and skipped (None, the aten paths) where no compiler works."""

import shutil
from pathlib import Path

import pytest

from fapool import native

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")


def test_build_all_compiles_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FAPOOL_CACHE_DIR", str(tmp_path))
    assert native.build_all() == {"cpu_decode.c": True, "cpu_fused.c": True, "cpu_int4.c": True, "cpu_stack.c": True}
    libs = sorted(tmp_path.glob("*.so"))
    assert [p.name.split("-")[0] for p in libs] == ["cpu_decode", "cpu_fused", "cpu_int4", "cpu_stack"]
    stamps = [p.stat().st_mtime_ns for p in libs]
    native.build_all()
    assert [p.stat().st_mtime_ns for p in sorted(tmp_path.glob("*.so"))] == stamps  # reused, not rebuilt


def test_a_failing_compiler_means_no_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("FAPOOL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    assert native.build(Path(native.__file__).parent / "layers" / "cpu_int4.c") is None
    assert not list(tmp_path.glob("*.so"))
