"""The kernel table: every CUDA kernel, its module (.cu file) and its argument types.

The table is the single description both launchers use. Type codes (as
``cuda_cpu::signature`` reports them from the C++ declaration): ``p`` pointer (a
contiguous array), ``i`` int32, ``q`` int64, ``f`` float32. The launch code must pass
exactly these NumPy scalar types — CuPy forwards arguments without checking them, so a
Python ``int`` where the kernel takes ``int`` would silently become 8 bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
COMPAT_HEADER = "cuda_cpu_compat.h"
BITS = tuple(range(1, 9))

#: module -> (file, {name expression: argument type codes})
MODULES: dict[str, tuple[str, dict[str, str]]] = {
    "quant": ("quant.cu", {
        "quant_meta": "pqiiifippp",
        **{f"quant_pack<{b}>": "pqiiiiippp" for b in BITS},
        **{f"dequant<{b}>": "pppqiiiiiip" for b in BITS},
        **{f"pack_codes<{b}>": "pqiip" for b in BITS},
        **{f"unpack_codes<{b}>": "pqiip" for b in BITS},
        "encode_half": "pqipp",
        "decode_half": "pqip",
    }),
    "salience": ("salience.cu", {
        "query_token_sums": "piiiiip",
        "relevance": "pqqp",
        "difficulty": "pqiifp",
        "assign_budget": "pqiiiiiip",
        "assign_threshold": "pqffiiip",
    }),
    "attention": ("attention.cu", {
        "attn_split": "piiiiiqfipiqfiiiiippppqppppqpp",
        "attn_combine": "ppiqip",
    }),
}

#: Options of every CUDA compile (NVRTC at run time, nvcc in the build test): IEEE rounding
#: everywhere — no FMA contraction, no flush to zero, exact division and square root.
CUDA_OPTIONS = ("--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true", "-std=c++17")

#: Kernel geometry constants that attention.cu also defines (TILE, QROWS, MAXD).
ATTN_TILE = 32
ATTN_QROWS = 4
ATTN_MAXD = 256
ATTN_THREADS = 32 * ATTN_QROWS

#: Threads per block of the element-wise kernels.
THREADS = 128


def module_of(name_expr: str) -> str:
    for module, (_, kernels) in MODULES.items():
        if name_expr in kernels:
            return module
    raise KeyError(f"no kernel named {name_expr!r}")


def signature_of(name_expr: str) -> str:
    return MODULES[module_of(name_expr)][1][name_expr]


def read_source(module: str, *, inline_includes: bool = True) -> str:
    """The module's CUDA source; local ``#include "x.cuh"`` lines are inlined so NVRTC needs
    no include path and the source hash covers the headers."""
    text = (KERNEL_DIR / MODULES[module][0]).read_text()
    return _inline(text, set()) if inline_includes else text


def _inline(text: str, seen: set[str]) -> str:
    out = []
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith('#include "'):
            header = stripped.split('"')[1]
            if header not in seen:
                seen.add(header)
                body = (KERNEL_DIR / header).read_text().replace("#pragma once\n", "")
                out.append(f"// ---- {header} (inlined) ----\n{_inline(body, seen)}\n")
        else:
            out.append(line)
    return "".join(out)


def cache_root() -> Path:
    """User cache folder for compiled kernels (never inside the package):
    ``$MIXKVQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/mixkvq``, else ``~/.cache/mixkvq``."""
    root = os.environ.get("MIXKVQ_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "mixkvq"


def instantiation_source(module: str) -> str:
    """Host code that takes the address of every templated kernel, so an offline nvcc
    compile instantiates (and therefore checks) each one, as NVRTC does from name_expressions."""
    names = [n for n in MODULES[module][1] if "<" in n]
    if not names:
        return ""
    body = "".join(f"    (void)&{n};\n" for n in names)
    return f"\nvoid mixkvq_instantiate_all() {{\n{body}}}\n"
