"""Every CUDA source compiles for sm_80 and sm_90 with nvcc, and for the CPU with g++.

No GPU is needed. The nvcc tests skip (with the reason shown) only where nvcc is absent.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from mixkvq.backends.cupy import cpu
from mixkvq.backends.cupy import kernels as K

NVCC = shutil.which("nvcc") or (("/usr/local/cuda/bin/nvcc") if Path("/usr/local/cuda/bin/nvcc").exists() else None)
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found: CUDA sources not compiled (install the CUDA toolkit)")


@needs_nvcc
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("module", sorted(K.MODULES))
def test_nvcc_compiles(module: str, arch: str, tmp_path: Path) -> None:
    # The same text NVRTC gets at run time (headers inlined), plus host code that takes the
    # address of every templated kernel so each instantiation is compiled and checked.
    src = tmp_path / K.MODULES[module][0]
    src.write_text(K.read_source(module) + K.instantiation_source(module))
    out = tmp_path / f"{module}.cubin"
    cmd = [NVCC, "-cubin", f"-arch=sm_{arch}", *K.CUDA_OPTIONS, "--Werror", "all-warnings", "-o", str(out), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert out.stat().st_size > 0


@pytest.mark.parametrize("module", sorted(K.MODULES))
def test_cpu_build_matches_kernel_table(module: str) -> None:
    """g++ builds the same source; every kernel's C++ signature equals the Python table."""
    launcher = cpu.CpuLauncher()
    for name in K.MODULES[module][1]:
        launcher.function(name)  # raises if a signature differs


def test_cache_dirs_are_outside_the_package() -> None:
    root = K.cache_root().resolve()
    pkg = K.KERNEL_DIR.parent.resolve()
    assert pkg not in root.parents and root != pkg
    assert pkg not in cpu.build("quant").resolve().parents
