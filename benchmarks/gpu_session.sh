#!/usr/bin/env bash
# The device check for a session that is lent a GPU machine: one call of the device tool's `run` executes the
# CUDA backend's tests, every benchmark with --device cuda against torch / torchvision, then the rest of the
# suite, each under a time budget, and leaves one archive of logs and results, gpu-session.tar.gz, in $OUT
# (./gpu-results elsewhere); the end of its output is a summary.
#
# Prepare on the development machine (the GPU image has CuPy, torch, torchvision, JAX, hypothesis, ml_dtypes
# and pytest-xdist, but not array-api-compat):
#   echo /.whl/ >> .git/info/exclude && python -m pip download --no-deps -d .whl array-api-compat
# then: run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
# Budgets in seconds (environment), 540 in all for one 600-second call: CUDA_TEST_SECONDS (150), BENCH_SECONDS
# (35 a benchmark; BENCH_MSDA_SECONDS, 60, for ms_deform_attn's 12 cases; BENCH_DCN_SECONDS, 60, for dcn's 24;
# BENCH_JAX_SECONDS, 30, for jax_vmap.py), BENCH_QUICK_SECONDS (60, the smoke run), REST_SECONDS (60): more than
# 540 with every benchmark, so a session with less time lowers them. To fit, each benchmark times BENCH_REPEAT (10)
# calls a row instead of its 30.
# bench_ms_deform_attn also times Deformable DETR's CUDA extension where MultiScaleDeformableAttention imports (a
# wheel of it built for the image's torch and CUDA can travel in .whl); otherwise its log says why it was skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
archive=${OUT:-$PWD/gpu-results}
results=$(mktemp -d)/gpu-session
mkdir -p "$results" "$archive"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

# The benchmarks, as the harness lists them (harness.BENCHMARKS: every op of deformcp.ops.SPECS is timed by one).
benches=$(python3 -c "from deformcp.__main__ import benchmarks_harness; print(*benchmarks_harness().BENCHMARKS)") \
  || benches="spatial_transformer roi_align deform_conv deform_roi_pool deform_ps_roi_pool mimic_loss ms_deform_attn"

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv || true; python3 -m deformcp info; } \
  2>&1 | tee "$results/machine.txt"

# The CUDA backend against the NumPy reference: every test that runs a kernel on the device (cuda in its id).
timeout "${CUDA_TEST_SECONDS:-150}" python3 -m pytest -q -p no:cacheprovider -k cuda -m "not sanitizer" tests \
  >"$results/tests-cuda.log" 2>&1
echo "tests -k cuda: exit $?; $(tail -n 1 "$results/tests-cuda.log")"

# The benchmarks' smoke run on the device (tiny shapes, every implementation verified), then each benchmark:
# it checks its outputs against its reference, then times the CUDA shapes (synchronised wall clock).
timeout "${BENCH_QUICK_SECONDS:-60}" python3 -m deformcp bench --device cuda --quick --output "$results/quick" \
  >"$results/bench-quick.log" 2>&1
echo "bench --quick: exit $?; $(tail -n 4 "$results/bench-quick.log" | tr '\n' ' ')"
for bench in $benches; do
  seconds=${BENCH_SECONDS:-35}
  [ "$bench" = ms_deform_attn ] && seconds=${BENCH_MSDA_SECONDS:-60}
  [ "$bench" = dcn ] && seconds=${BENCH_DCN_SECONDS:-60}
  timeout "$seconds" python3 "benchmarks/bench_$bench.py" --device cuda --repeat "${BENCH_REPEAT:-10}" \
    --output "$results/$bench" >"$results/bench-$bench.log" 2>&1
  echo "bench $bench: exit $?"
done

# deformcp.jax on JAX's GPU buffers: jax.vmap against the batched call, a loop and the host copies.
timeout "${BENCH_JAX_SECONDS:-30}" python3 benchmarks/jax_vmap.py --repeat "${BENCH_REPEAT:-10}" \
  --output "$results/jax_vmap" >"$results/bench-jax_vmap.log" 2>&1
echo "bench jax_vmap: exit $?"

# The rest of the suite (host backend, NumPy path, interop), spread over the machine's cores.
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
timeout "${REST_SECONDS:-60}" python3 -m pytest -q -p no:cacheprovider $workers -k "not cuda" -m "not sanitizer" tests \
  >"$results/tests-rest.log" 2>&1
echo "tests -k 'not cuda': exit $?; $(tail -n 1 "$results/tests-rest.log")"

tar -czf "$archive/gpu-session.tar.gz" -C "$(dirname "$results")" gpu-session
for bench in $benches jax_vmap; do
  [ -f "$results/$bench.md" ] && grep -E '^\| |MISSED|met' "$results/$bench.md"
done
grep -E '^(FAILED|ERROR)' "$results"/tests-*.log | head -n 40
exit 0
