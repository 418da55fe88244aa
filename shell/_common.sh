# Shared by the run-*.sh scripts: run from the repository root with the project's Python.
# Each script sets DATAPATH/AUGPATH defaults that environment variables override.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
class_flags() { for c in "$@"; do printf -- '-d %s ' "$c"; done; }
