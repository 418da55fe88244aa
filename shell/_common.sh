# Shared by the run-*.sh scripts, sourced before their defaults: paths the caller gives (DATAPATH, AUGPATH,
# RESULTS, DEMO_DIR, PYTHON) are made absolute against the caller's folder, then the script runs from the
# repository root with the project's Python, so its defaults (results, demo_data) are the repository's.
# Each script then sets DATAPATH/AUGPATH defaults that environment variables override. The data scripts also
# take EPOCHS (--meta_epochs) and NET_EXTRA / DATASET_EXTRA: more `net` / `dataset` options, given after the
# script's own, so that a single-valued option there wins (e.g. NET_EXTRA="--limit 16").

# An absolute form of a path relative to the current folder (the path need not exist yet).
absolute_path() {
  case "$1" in
    /*) printf '%s' "$1" ;;
    *) local path=$1; while [ "${path#./}" != "$path" ]; do path=${path#./}; done; printf '%s/%s' "$PWD" "${path:-.}" ;;
  esac
}
for _var in DATAPATH AUGPATH RESULTS DEMO_DIR; do
  if [ -n "${!_var:-}" ]; then printf -v "$_var" '%s' "$(absolute_path "${!_var}")"; fi
done
case "${PYTHON:-}" in */*) PYTHON=$(absolute_path "$PYTHON") ;; esac  # a path, not a command name such as python3
unset _var

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
