"""Merge `mixkvq eval` results of runs on the same samples into one results file.

    python scripts/merge_results.py docs/results_frontier.json run1/results.json run2/results.json \
        -o docs/results_rotation.json --plot docs/results_rotation.png --md rotation_tables.md

Runs must share their settings (samples, lengths, seed); quality columns are deterministic,
so a row present in several runs must agree (perplexity to 1e-4 relative, KL — a mean of
small differences of log-probabilities, so its relative noise is larger — to 1e-3: torch's
thread scheduling and the host's kernels move the last float digits of a forward) — the check that the
runs scored the same tokens. A later run's copy of a row replaces an earlier one (it may add
per-sample NLLs and KLs). ``--replaced NAMES`` names rows whose method changed between the runs
(a spec revision): a later copy replaces the earlier one without the agreement check, and
``--drop NAMES`` removes rows that no longer describe the method (measured before a revision
and not measured again). Writes the merged JSON, optionally the plot and the markdown of the
frontier checks (eval's own tables: rd/rdl against KIVI and the tiers, MixKVQ against the
rotated baselines).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from mixkvq.apps.eval.report import frontier_sections, markdown_table, plot, save_json


#: settings that change how a run is shown, not what it scores
DISPLAY_SETTINGS = ("progress",)


def _scored(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in DISPLAY_SETTINGS}


def _commands(res: dict) -> list:
    """A run's command, or a merged file's list of them (merging a merged file stays flat)."""
    c = res.get("command")
    return list(c) if isinstance(c, list) else [c]


def merge(paths: "list[Path]", replaced: "set[str] | None" = None, drop: "set[str] | None" = None) -> dict:
    replaced, drop = replaced or set(), drop or set()
    merged: dict | None = None
    rows: dict[str, dict] = {}
    seen: set[str] = set()
    per_sample = lambda x: bool(x.get("nll_per_sample")) + bool(x.get("kl_per_sample"))  # noqa: E731
    for p in paths:
        res = json.loads(p.read_text())
        seen.update(r["name"] for r in res["results"])
        if merged is None:
            merged = {k: v for k, v in res.items() if k != "results"}
            merged["command"] = _commands(res)
        else:
            if _scored(res["settings"]) != _scored(merged["settings"]):
                raise SystemExit(f"{p}: settings {res['settings']} differ from {merged['settings']}")
            merged["command"] += _commands(res)
            merged["seconds"] = (merged.get("seconds") or 0) + (res.get("seconds") or 0)
        for r in res["results"]:
            if r["name"] in drop:
                continue
            old = rows.get(r["name"])
            if old is not None and r["name"] in replaced:
                rows[r["name"]] = r
                continue
            if old is not None and r.get("available") and old.get("available"):
                for key, rel in (("ppl", 1e-4), ("kl", 1e-3)):
                    a, b = old.get(key), r.get(key)
                    if a is not None and b is not None and not math.isclose(a, b, rel_tol=rel, abs_tol=1e-7):
                        raise SystemExit(f"{p}: row {r['name']} has {key} {b} where an earlier run has {a}: "
                                         "the runs did not score the same tokens")
            rows[r["name"]] = r if old is None or per_sample(r) >= per_sample(old) else old
    assert merged is not None
    unknown = sorted((replaced | drop) - seen)
    if unknown:
        raise SystemExit(f"--replaced/--drop name rows no input holds: {', '.join(unknown)}")
    merged["results"] = list(rows.values())
    return merged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--md", type=Path)
    ap.add_argument("--title", default="")
    ap.add_argument("--replaced", default="", help="comma-separated rows whose method changed between the runs")
    ap.add_argument("--drop", default="", help="comma-separated rows to leave out")
    a = ap.parse_args()
    names = lambda s: {n for n in s.split(",") if n}  # noqa: E731
    merged = merge(a.results, names(a.replaced), names(a.drop))
    save_json(merged, a.output)
    if a.plot:
        plot(merged, a.plot, title=a.title)
    text = markdown_table(merged) + "\n" + frontier_sections(merged)
    if a.md:
        a.md.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
