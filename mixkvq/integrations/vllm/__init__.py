"""MixKVQ as an attention backend of vLLM's CPU engine (docs/vllm.md).

vLLM loads :func:`register` through the ``vllm.general_plugins`` entry point in its main,
engine-core and worker processes. On the CPU platform vLLM always resolves the attention
backend ``AttentionBackendEnum.CPU_ATTN``; :func:`register` overrides that entry with
:class:`~mixkvq.integrations.vllm.backend.MixKVQAttentionBackend`, whose pages hold packed
MixKVQ blocks of R tokens.

Environment:
    ``MIXKVQ_VLLM``: ``0`` leaves vLLM's own CPU backend in place (the plugin does nothing).
    ``MIXKVQ_VLLM_CONFIG``: a MixKVQConfig JSON file (``mixkvq calibrate`` writes one);
    default: the paper's config (budget mode, 1/32 bf16 + 1/8 4-bit keys, 2-bit values).
    ``MIXKVQ_VLLM_TIME_STOCK``: ``1`` with the plugin off times vLLM's own CPU attention
    (forward and cache update) into the same counters, so a benchmark can set the two
    backends' attention time side by side (``worker_report``).
"""

from __future__ import annotations

import os

ENV_ENABLE = "MIXKVQ_VLLM"
ENV_CONFIG = "MIXKVQ_VLLM_CONFIG"
ENV_TIME_STOCK = "MIXKVQ_VLLM_TIME_STOCK"
BACKEND_PATH = "mixkvq.integrations.vllm.backend.MixKVQAttentionBackend"


def enabled() -> bool:
    return os.environ.get(ENV_ENABLE, "1").strip().lower() not in ("0", "false", "no", "off", "")


def register() -> None:
    """The vllm.general_plugins hook: route CPU_ATTN to the MixKVQ backend (unless disabled)."""
    if not enabled():
        if os.environ.get(ENV_TIME_STOCK, "0") == "1":
            from .backend import time_stock_backend

            time_stock_backend()
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)


__all__ = ["register", "enabled", "ENV_ENABLE", "ENV_CONFIG", "ENV_TIME_STOCK", "BACKEND_PATH"]
