"""The project's small C kernels: compiled on first use with the machine's C compiler
(-O3 -march=native -fopenmp) into a cache keyed by the source, the flags and the CPU, and
loaded through ctypes. Where no compiler is found or the build fails, `build` returns None and
the caller keeps its aten path."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11")


def cache_dir() -> Path:
    root = os.environ.get("FAPOOL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fapool"
    )
    return Path(root)


def _cpu_key() -> str:
    """-march=native code runs only where it was built: the CPU's model and flags name the build."""
    info = ""
    try:
        info = "".join(
            line for line in Path("/proc/cpuinfo").read_text().splitlines(True) if line.startswith(("flags", "model name"))
        )
    except OSError:
        pass
    return platform.machine() + info


def build(source: Path) -> ctypes.CDLL | None:
    """The shared library of `source`, built once per source, flags and CPU; None without a compiler."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        logger.info("no C compiler found: %s is not used", source.name)
        return None
    # The package's headers (simd.h) are part of every kernel's build.
    headers = b"".join(h.read_bytes() for h in sorted(Path(__file__).parent.rglob("*.h")))
    digest = hashlib.sha256(source.read_bytes() + headers + " ".join(FLAGS).encode() + _cpu_key().encode()).hexdigest()[:16]
    lib_path = cache_dir() / f"{source.stem}-{digest}.so"
    if not lib_path.exists():
        try:
            lib_path.parent.mkdir(parents=True, exist_ok=True)
            # Built under a temporary name and renamed: processes that start together never load half a file.
            with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
                out = Path(tmp) / lib_path.name
                subprocess.run([cc, *FLAGS, str(source), "-o", str(out), "-lm"], check=True, capture_output=True, timeout=120)
                os.replace(out, lib_path)
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", b"") or b""
            logger.warning("building %s failed (%s): it is not used\n%s",
                           source.name, e, detail.decode(errors="replace")[-2000:])
            return None
    return ctypes.CDLL(str(lib_path))


def build_all() -> dict[str, bool]:
    """Build every C kernel of the package (what `make venv` runs, so a first request does not wait for a compiler)."""
    return {source.name: build(source) is not None for source in sorted(Path(__file__).parent.rglob("*.c"))}


if __name__ == "__main__":
    for name, ok in build_all().items():
        print(f"{name}: {'built' if ok else 'not built (no compiler, or it failed: the aten paths are used)'}")
