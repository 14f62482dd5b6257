# Shared by scripts/demo and scripts/test: create .venv and install the package into it.
# Usage: . scripts/_venv.sh EXTRAS   (EXTRAS like "test" or "" for none)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "taskapp_notebook needs Python >= 3.11 (found: $("$PY" --version 2>&1)). Set PYTHON=python3.11." >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi
VENV_PY="$ROOT/.venv/bin/python"
spec="."
[ -n "${1:-}" ] && spec=".[${1}]"
stamp=".venv/.installed-${1:-base}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "==> installing taskapp-notebook${1:+[$1]} into .venv"
  "$VENV_PY" -m pip install --quiet --disable-pip-version-check --upgrade pip 2>&1 | grep -v "is ignored" || true
  "$VENV_PY" -m pip install --quiet --disable-pip-version-check -e "$spec" 2>&1 | grep -v "is ignored" || true
  "$VENV_PY" -c "import taskapp_notebook" && touch "$stamp"
fi
