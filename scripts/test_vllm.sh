#!/usr/bin/env bash
# The vLLM engine tests (tests/test_vllm.py) in their own environment, as CI runs them:
# builds (or reuses) the vLLM venv and the exported model folder (scripts/vllm_env.sh), then
# runs the file there with MIXKVQ_REQUIRE_VLLM=1, so a missing engine or model folder fails
# instead of skipping. ~3.5 min to build the venv from scratch, ~5 min of tests on 2 cores.
#
# Env: MIXKVQ_VLLM_VENV, MIXKVQ_VLLM_MODEL (as scripts/vllm_env.sh), PYTEST_ARGS (extra args).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/mixkvq"
export MIXKVQ_VLLM_VENV="${MIXKVQ_VLLM_VENV:-$CACHE/vllm-venv}"
export MIXKVQ_VLLM_MODEL="${MIXKVQ_VLLM_MODEL:-$CACHE/smollm2-hf}"
bash "$REPO/scripts/vllm_env.sh"
cd "$REPO"
# vLLM's CPU engine binds its OpenMP threads to cores; on a small machine give it all of them
NCPU="$(nproc)"
export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-0-$((NCPU - 1))}"
export VLLM_CPU_NUM_OF_RESERVED_CPU="${VLLM_CPU_NUM_OF_RESERVED_CPU:-0}"
MIXKVQ_REQUIRE_VLLM=1 "$MIXKVQ_VLLM_VENV/bin/python" -m pytest -q tests/test_vllm.py ${PYTEST_ARGS:-}
