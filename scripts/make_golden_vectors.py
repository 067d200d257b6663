"""Regenerate tests/vectors/v1 from the simulator (fixed seeds). Run from the repo root:

    python scripts/make_golden_vectors.py

The vectors are part of the format: regenerate only when the format version changes.
"""

from pathlib import Path

from mixkvq.testing.golden import write_vectors

if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "tests" / "vectors" / "v1"
    cases = write_vectors(out)
    print(f"wrote {len(cases)} golden cases to {out}")
