#!/usr/bin/env bash
# The whole test suite: notebook tests (nbdev_test) and pytest. KNOWTUNING_SLOW=1 adds the slow tier.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH" TOKENIZERS_PARALLELISM=false
flags=""; marks=(-m "not slow")
if [ "${KNOWTUNING_SLOW:-0}" = 1 ]; then flags="--flags slow"; marks=(); fi
status=0
echo "== nbdev_test (notebook test cells) =="
nbdev_test --n_workers 2 --timing $flags || status=1
echo "== pytest =="
pytest tests "${marks[@]}" -q -ra --timeout 1800 --durations=25
rc=$?
if [ $rc = 5 ]; then echo "pytest: no tests collected"; rc=0; fi
[ $rc = 0 ] || status=1
exit $status
