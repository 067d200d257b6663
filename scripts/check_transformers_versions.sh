#!/usr/bin/env bash
# Check the transformers integration against a list of transformers versions.
#
# For every version a venv is created under $VENV_ROOT (default ~/.cache/mixkvq/venvs) with the
# current environment's packages visible (--system-site-packages: torch, gguf, accelerate,
# and mixkvq installed editable from this checkout), transformers==VERSION is installed
# into it, and the integration tests run from the repository root.
#
# Usage: scripts/check_transformers_versions.sh [-q|--quick] VERSION...
#   -q/--quick   only tests/test_model_matrix.py (tiny random models, ~1 min a version);
#                without it tests/test_transformers_cache.py (embedded model) runs too.
#   e.g.  scripts/check_transformers_versions.sh 5.0.0 5.5.0 5.24.0
# Env: PYTHON (the base interpreter, default python3), VENV_ROOT, PYTEST_ARGS (extra args).
# Exit status: the number of versions that failed (0 = all passed).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
VENV_ROOT=${VENV_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/mixkvq/venvs}
QUICK=0
VERSIONS=()
for a in "$@"; do
  case "$a" in
    -q|--quick) QUICK=1 ;;
    *) VERSIONS+=("$a") ;;
  esac
done
[ ${#VERSIONS[@]} -gt 0 ] || { echo "usage: $0 [-q] VERSION..." >&2; exit 2; }
TESTS=(tests/test_model_matrix.py)
[ "$QUICK" = 1 ] || TESTS+=(tests/test_transformers_cache.py)

failed=0
summary=()
for v in "${VERSIONS[@]}"; do
  venv="$VENV_ROOT/tf$(echo "$v" | tr . _)"
  echo "=== transformers $v ($venv) ==="
  if [ ! -x "$venv/bin/python" ]; then
    "$PYTHON" -m venv --system-site-packages "$venv" || { summary+=("$v: venv failed"); failed=$((failed+1)); continue; }
  fi
  have=$("$venv/bin/python" -c 'import transformers; print(transformers.__version__)' 2>/dev/null)
  if [ "$have" != "$v" ]; then
    "$venv/bin/pip" install -q "transformers==$v" || { summary+=("$v: install failed"); failed=$((failed+1)); continue; }
    have=$("$venv/bin/python" -c 'import transformers; print(transformers.__version__)')
  fi
  where=$("$venv/bin/python" -c 'import mixkvq, os; print(os.path.dirname(os.path.dirname(os.path.abspath(mixkvq.__file__))))')
  echo "transformers $have; mixkvq from $where"
  if [ "$have" != "$v" ] || [ "$where" != "$ROOT" ]; then
    summary+=("$v: wrong environment (transformers $have, mixkvq from $where)"); failed=$((failed+1)); continue
  fi
  # shellcheck disable=SC2086
  if "$venv/bin/python" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} "${TESTS[@]}"; then
    summary+=("$v: PASS")
  else
    summary+=("$v: FAIL"); failed=$((failed+1))
  fi
done
echo "=== summary ==="
printf '%s\n' "${summary[@]}"
exit "$failed"
