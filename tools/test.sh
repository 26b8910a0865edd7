#!/usr/bin/env bash
# The whole test suite: notebook tests (nbdev_test) and pytest. KNOWTUNING_SLOW=1 adds the slow tier.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH" TOKENIZERS_PARALLELISM=false
# Two workers (nbdev_test's; two pytest processes), one thread each: two torch processes with a thread per core each
# on the same cores slow each other about 10x.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Two pytest processes of about equal length: the tests that read the shared smoke run (tests/conftest.py, built once
# per pytest process), plus four other files, beside all the others (measured in a clean clone 2026-12-08 00:47:
# 8:32 and 7:56, before test_kc.py, about 25 s, moved over)
SHARED_RUN=(tests/test_pipeline.py tests/test_llm_path.py tests/test_multiprocess.py tests/test_probe.py
            tests/test_user_data.py tests/test_browser.py tests/test_kc.py)
flags=""; marks=(-m "not slow")
if [ "${KNOWTUNING_SLOW:-0}" = 1 ]; then flags="--flags slow"; marks=(); fi
status=0
echo "== nbdev_test (notebook test cells) =="
nbdev_test --n_workers 2 --timing $flags || status=1
echo "== pytest =="
log=$(mktemp)
pytest "${SHARED_RUN[@]}" "${marks[@]}" -p no:cacheprovider -q -ra --timeout 1800 --durations=${DURATIONS:-12} >"$log" 2>&1 &
shared=$!
pytest tests "${SHARED_RUN[@]/#/--ignore=}" "${marks[@]}" -q -ra --timeout 1800 --durations=${DURATIONS:-15}
rc=$?
wait $shared
rc_shared=$?
echo "== pytest (tests on the shared smoke run) =="
cat "$log"
rm -f "$log"
for r in $rc $rc_shared; do
  [ "$r" = 5 ] && echo "pytest: no tests collected (a failure: a suite that runs nothing tests nothing)"
  [ "$r" = 0 ] || status=1
done
exit $status
