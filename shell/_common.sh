# Shared by the run-*.sh scripts: run from the repository root with the project's Python.
# Each script sets DATAPATH/AUGPATH defaults that environment variables override.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
class_flags() { for c in "$@"; do printf -- '-d %s ' "$c"; done; }

# Stop with one line when DATAPATH or AUGPATH names no folder (instead of Click's error about a default path).
require_data_folders() {
  local var
  for var in DATAPATH AUGPATH; do
    if [ ! -d "${!var}" ]; then
      echo "Error: $var=${!var} is not a folder: set DATAPATH to the dataset's root and AUGPATH to DTD's images" \
           "folder, e.g. DATAPATH=/data/<dataset> AUGPATH=/data/dtd/images bash $0" >&2
      exit 2
    fi
  done
}
