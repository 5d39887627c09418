#!/usr/bin/env bash
# Builds the allocator (allocator/{backend,core,abi}/*.cpp but the pybind11 module) with
# AddressSanitizer + UndefinedBehaviorSanitizer, runs the randomized multi-threaded stress
# test (tests/native/stress.cpp) under them, and compile-checks our CUDA driver
# declarations against cuda.h when a toolkit is installed.
#
#   .ci/sanitize.sh [stress arguments]      e.g. .ci/sanitize.sh --seed=7 --ops=20000
#
# Environment: CXX (g++), BUILD_DIR (.build-san), JOBS (nproc), CUDA_INCLUDE (a directory
# holding cuda.h; default /usr/local/cuda/include, else the newest /usr/local/cuda*/include),
# REQUIRE_LSAN (1: fail when LeakSanitizer cannot run here; default 1 when CI is set, else
# 0, which runs without leak checking and says so loudly).
# Fails on a compiler error, a sanitizer report, or a non-zero exit of the stress test.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
CXX=${CXX:-g++}
BUILD=${BUILD_DIR:-.build-san}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
if [[ -n "${CI:-}" && "${CI}" != "false" && "${CI}" != "0" ]]; then
  REQUIRE_LSAN=${REQUIRE_LSAN:-1}
else
  REQUIRE_LSAN=${REQUIRE_LSAN:-0}
fi

SAN_FLAGS=(-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all)
CXXFLAGS=(-std=c++17 -O1 -g "${SAN_FLAGS[@]}" -Wall -Wextra -Iallocator)
LIBS=(-ldl -lpthread)

say() { printf 'sanitize: %s\n' "$*"; }
die() { printf 'sanitize: FAILED: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

mkdir -p "$BUILD/obj"
t0=$(now)

# --- Build: every source compiled in parallel, then one link. ---------------------------
sources=()
for f in allocator/backend/*.cpp allocator/core/*.cpp allocator/abi/*.cpp; do
  [[ "$(basename "$f")" == python_module.cpp ]] && continue
  sources+=("$f")
done
sources+=(tests/native/stress.cpp)

say "compiling ${#sources[@]} sources with ${CXX} ${CXXFLAGS[*]}"
objs=()
for src in "${sources[@]}"; do
  obj="$BUILD/obj/$(echo "${src%.cpp}" | tr '/' '_').o"
  objs+=("$obj")
  rm -f "$obj" "$obj.rc"
  while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || true; done
  ( rc=0; "$CXX" "${CXXFLAGS[@]}" -c "$src" -o "$obj" >"$obj.log" 2>&1 || rc=$?; echo "$rc" >"$obj.rc" ) &
done
wait
build_failed=0
for i in "${!objs[@]}"; do
  if [[ "$(cat "${objs[$i]}.rc" 2>/dev/null)" != 0 ]]; then
    build_failed=1
    echo "--- ${sources[$i]} ---" >&2
    cat "${objs[$i]}.log" >&2
  elif [[ -s "${objs[$i]}.log" ]]; then
    cat "${objs[$i]}.log" >&2  # warnings
  fi
done
(( build_failed == 0 )) || die "compilation failed"
"$CXX" "${CXXFLAGS[@]}" "${objs[@]}" -o "$BUILD/stress" "${LIBS[@]}" || die "link failed"
say "built $BUILD/stress in $(since "$t0") s"

# --- CUDA declarations against cuda.h (compile-time only). ------------------------------
cuda_include=${CUDA_INCLUDE:-}
if [[ -z "$cuda_include" ]]; then
  if [[ -f /usr/local/cuda/include/cuda.h ]]; then
    cuda_include=/usr/local/cuda/include
  else
    newest=$(ls -d /usr/local/cuda*/include/cuda.h 2>/dev/null | sort -V | tail -n 1 || true)
    [[ -n "$newest" ]] && cuda_include=$(dirname "$newest")
  fi
fi
if [[ -n "$cuda_include" && -f "$cuda_include/cuda.h" ]]; then
  "$CXX" "${CXXFLAGS[@]}" -I"$cuda_include" tests/native/cuda_layout_check.cpp \
    -o "$BUILD/cuda_layout_check" "${LIBS[@]}" || die "cuda_layout_check.cpp does not compile against $cuda_include/cuda.h"
  "$BUILD/cuda_layout_check" || die "cuda_layout_check failed to run"
  say "cuda_layout_check: our CUDA declarations match $cuda_include/cuda.h"
else
  say "NOTE: no cuda.h under /usr/local/cuda*/include (or CUDA_INCLUDE); skipped cuda_layout_check"
fi

# --- Can LeakSanitizer run here? (it needs ptrace to stop the world) -------------------
leak_check=1
cat >"$BUILD/lsan_probe.cpp" <<'EOF'
#include <cstdio>
#include <cstdlib>
void* volatile sink;
int main() {
  sink = std::malloc(77);
  sink = nullptr;  // lost: LeakSanitizer must report it
  std::puts("lsan probe: leaked 77 bytes");
  return 0;
}
EOF
"$CXX" -O0 -g -fsanitize=address "$BUILD/lsan_probe.cpp" -o "$BUILD/lsan_probe" || die "cannot build the LeakSanitizer probe"
set +e
probe_out=$(ASAN_OPTIONS=detect_leaks=1 "$BUILD/lsan_probe" 2>&1)
probe_rc=$?
set -e
if [[ $probe_rc -ne 0 ]] && grep -q "ERROR: LeakSanitizer: detected memory leaks" <<<"$probe_out"; then
  say "LeakSanitizer works here (the probe's deliberate leak was reported)"
else
  reason=$(grep -m1 -E "LeakSanitizer|ptrace" <<<"$probe_out" || echo "the probe's deliberate leak went unreported (exit $probe_rc)")
  if [[ "$REQUIRE_LSAN" == 1 ]]; then
    die "LeakSanitizer cannot run here: $reason (REQUIRE_LSAN=1)"
  fi
  leak_check=0
  say "WARNING: LeakSanitizer cannot run here: $reason"
  say "WARNING: running WITHOUT leak checking (set REQUIRE_LSAN=1 to make this fatal)"
fi

# --- Run. -------------------------------------------------------------------------------
log="$BUILD/stress.log"
export ASAN_OPTIONS="detect_leaks=${leak_check}:abort_on_error=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
say "running $BUILD/stress $* (ASAN_OPTIONS=$ASAN_OPTIONS UBSAN_OPTIONS=$UBSAN_OPTIONS)"
t1=$(now)
set +e
"$BUILD/stress" "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
elapsed=$(since "$t1")

if grep -qE "ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:|Sanitizer has encountered a fatal error|SUMMARY: (Address|Leak|UndefinedBehavior)Sanitizer" "$log"; then
  die "sanitizer report in the stress run (exit $rc, log: $log)"
fi
(( rc == 0 )) || die "stress exited with status $rc after ${elapsed} s (log: $log)"
grep -qE "^stress: [0-9]+ passed, 0 failed$" "$log" || die "stress did not print its summary (log: $log)"
if (( leak_check )); then
  say "PASSED in ${elapsed} s (ASan + UBSan + LeakSanitizer; total $(since "$t0") s)"
else
  say "PASSED in ${elapsed} s (ASan + UBSan; LEAK CHECKING WAS OFF; total $(since "$t0") s)"
fi
