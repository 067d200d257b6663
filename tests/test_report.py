"""The frontier check that decides the rd target, and the paired comparison beside it."""

from __future__ import annotations

import math

import pytest

from mixkvq.apps.eval.report import frontier_checks, frontier_sections, paired_nll_difference


def _row(name: str, block_bits: float | None, delta_ppl: float, nll: "list[float] | None" = None,
         kl: float = 0.01) -> dict:
    return {"name": name, "available": True, "block_bits": block_bits, "delta_ppl": delta_ppl, "kl": kl,
            "nll_per_sample": nll or []}


def _results(*rows: dict) -> dict:
    return {"results": [_row("full", None, 0.0), *rows]}


def _met(table: str) -> dict[str, str]:
    return {line.split("|")[1].strip(): line.split("|")[10].strip() for line in table.splitlines()[2:]}


def test_each_competitor_meets_the_allocator_row_at_or_below_its_bytes():
    res = _results(_row("kivi2", 3.03125, 2.3), _row("kivi3", 4.03125, 0.2), _row("kivi_k3v4", 4.53125, 0.09),
                   _row("rd3.03125", 3.03125, 2.3), _row("rd4.03125", 4.03125, 0.21), _row("rd4.5", 4.5, 0.05),
                   _row("rd4.6", 4.6, 0.0))  # above kivi_k3v4's bytes: must not be the one compared
    table, ok = frontier_checks(res, allocator="rd")
    met = _met(table)
    assert met == {"kivi2": "yes", "kivi3": "**no**", "kivi_k3v4": "yes"} and not ok
    assert "| kivi_k3v4 | 4.531 | +0.090 | 0.0100 | rd4.5 |" in table


def test_default_tiers_need_the_margin_and_a_missing_row_fails():
    res = _results(_row("mixkvq", 3.359, 1.0), _row("rd3.25", 3.25, 0.76))
    table, ok = frontier_checks(res, allocator="rd")
    assert _met(table) == {"mixkvq": "**no**"} and "0.75× (+0.750)" in table and not ok
    res = _results(_row("mixkvq", 3.359, 1.0), _row("rd3.25", 3.25, 0.75))
    assert frontier_checks(res, allocator="rd")[1]
    table, ok = frontier_checks(_results(_row("kivi2", 3.03125, 2.3), _row("rd3.5", 3.5, 0.1)), allocator="rd")
    assert "no row" in table and not ok
    assert not frontier_checks(_results(_row("kivi2", 3.03125, 2.3)), allocator="rd")[1]  # nothing to compare


def test_paired_difference_is_the_mean_and_standard_error_over_samples():
    a, b = [2.0, 2.5, 3.0, 2.2], [2.1, 2.4, 3.2, 2.2]
    mean, se = paired_nll_difference({"nll_per_sample": a}, {"nll_per_sample": b})
    d = [x - y for x, y in zip(a, b)]
    m = sum(d) / 4
    assert mean == pytest.approx(m)
    assert se == pytest.approx(math.sqrt(sum((x - m) ** 2 for x in d) / 3 / 4))
    assert paired_nll_difference({"nll_per_sample": a}, {"nll_per_sample": b[:3]}) is None
    assert paired_nll_difference({}, {"nll_per_sample": b}) is None
    res = _results(_row("kivi3", 4.03125, 0.2, b), _row("rdl4.03125", 4.03125, 0.19, a))
    table = frontier_sections(res)
    assert "## Frontier check: rdl<bits>" in table and "rd<bits>" not in table.replace("rdl<bits>", "")
    assert f"| {1000 * mean:+.2f} ± {1000 * se:.2f} |" in table


def test_rotated_baselines_meet_the_best_mixkvq_row_at_or_below_their_bytes():
    from mixkvq.apps.eval.report import rotation_checks

    res = _results(_row("rot_tok2", 3.0, 1.9), _row("rot_tok3", 4.0, 0.30), _row("rot_kivi3", 4.03125, 0.25),
                   _row("rdl3.03125", 3.03125, 2.3, kl=0.005), _row("rdl4.03125", 4.03125, 0.2, kl=0.008),
                   _row("mixkvq_v3_rot", 3.86, 0.28, kl=0.005),
                   _row("kivi3", 4.03125, 0.1))  # a KIVI row is a baseline, not one of MixKVQ's rows
    table, ok = rotation_checks(res)
    lines = {ln.split(" | ")[0].strip("| "): ln for ln in table.splitlines()[2:]}
    assert "mixkvq_v3_rot" in lines["rot_tok3"] and "| 0.50 | yes |" in lines["rot_tok3"]   # best at <= 4.0 bits
    assert "rdl4.03125" in lines["rot_kivi3"] and "| 0.80 | yes |" in lines["rot_kivi3"]
    assert "no row ≤ bytes (+0.031 bits)" in lines["rot_tok2"] and not ok          # nothing at 3.0 bits
    _, ok = rotation_checks(_results(_row("rot_tok3", 4.0, 0.30), _row("rd4", 4.0, 0.31, kl=0.001)))
    assert not ok
    # the perplexity holds but the KL is not lower (the same bytes scored twice): not met
    table, ok = rotation_checks(_results(_row("rot_kivi2", 3.03125, 1.3, kl=0.1), _row("rdl3.03125_rot", 3.03125, 1.3, kl=0.1)))
    assert "| 1.00 | **no** (KL not lower) |" in table and not ok
    assert "rotated baseline" in frontier_sections(res)


def test_a_lower_kl_within_its_sampling_noise_is_not_clearly_lower():
    from mixkvq.apps.eval.report import KL_CLEAR_SE, paired_difference, rotation_checks

    base = _row("rot_kivi2", 3.03125, 1.3, kl=0.100)
    base["kl_per_sample"] = [0.10, 0.12, 0.08, 0.10]
    noisy = _row("rd3.03125_b1_rotv", 3.03125, 1.2, kl=0.098)
    noisy["kl_per_sample"] = [0.11, 0.10, 0.07, 0.112]       # lower on average, not by 2 SE
    mean, se = paired_difference(noisy, base, "kl_per_sample")
    assert mean < 0 and mean + KL_CLEAR_SE * se >= 0
    table, ok = rotation_checks(_results(base, noisy))
    assert "**no** (KL lower by less than 2 SE)" in table and not ok
    assert f"| {1000 * mean:+.2f} ± {1000 * se:.2f} |" in table
    clear = dict(noisy, kl=0.09, kl_per_sample=[0.09, 0.11, 0.07, 0.09])  # 0.01 lower on every sample
    table, ok = rotation_checks(_results(base, clear))
    assert ok and "| yes |" in table
    # rows without per-sample KLs (older result files) are judged on the means alone
    _, ok = rotation_checks(_results(_row("rot_kivi2", 3.03125, 1.3, kl=0.1), _row("rd3_b1", 3.0, 1.2, kl=0.09)))
    assert ok
