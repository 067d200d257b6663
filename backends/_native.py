"""Build-once shared libraries from C++ source: the one compile cache of the native code.

Both the native CPU backend (``backends/cpu``) and the CPU emulation of the CUDA kernels
(``backends/cupy/cpu.py``) compile C++ with the system compiler the first time they are
needed. A library is cached under ``kernels.cache_root()`` keyed by a hash of its source
(with every header of its include folders), the compiler's identity, the flags and — for
``-march=native`` builds — the CPU's model and feature flags, so a stale or foreign build
is never loaded. A missing compiler or a failed compile raises one RuntimeError that says
what to install or shows the compiler's message.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from .cupy.kernels import cache_root


def compiler() -> str:
    """The C++ compiler: ``$CXX``, else ``g++``, else ``c++``."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError(
            "mixkvq's native CPU code needs a C++17 compiler and none was found: install g++ "
            "(Debian/Ubuntu: apt install g++; conda: conda install gxx_linux-64) or set $CXX, "
            "or choose the 'torch' backend (MIXKVQ_BACKEND=torch)")
    return cxx


def _cpu_identity() -> str:
    """Model name and feature flags of this CPU (what -march=native compiles for)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags"))][:2]
    return "\n".join(keep) or platform.machine()


def _folder_hash(folders: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for folder in folders:
        for p in sorted(Path(folder).iterdir()):
            if p.is_file() and p.suffix in (".h", ".cuh", ".cpp", ".cu"):
                h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def build_library(name: str, source: str, *, include_dirs: Sequence[Path], flags: Sequence[str],
                  subfolder: str) -> Path:
    """Compile ``source`` (a translation unit's text) into ``<cache>/<subfolder>/<name>-<hash>.so``
    unless that file exists; return its path. Concurrent builders of one hash are harmless
    (the finished file is renamed into place atomically)."""
    cxx = compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    h = hashlib.sha256()
    parts = [source, _folder_hash(include_dirs), cxx, version, " ".join(flags)]
    if "-march=native" in flags:
        parts.append(_cpu_identity())
    for part in parts:
        h.update(part.encode() + b"\0")
    folder = cache_root() / subfolder
    lib = folder / f"{name}-{h.hexdigest()[:24]}.so"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cpp = Path(tmp) / f"{name}_unit.cpp"  # not the included file's own name
        cpp.write_text(source)
        out = Path(tmp) / lib.name
        cmd = [cxx, *flags]
        for d in include_dirs:
            cmd += ["-I", str(d)]
        cmd += ["-o", str(out), str(cpp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"the C++ compiler failed to build {name}:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}")
        out.replace(lib)
    return lib
