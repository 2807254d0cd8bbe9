#!/usr/bin/env bash
# Fuzz smoke: builds every cargo-fuzz target (address sanitizer, debug assertions) and runs each
# for a few seconds from its committed seeds (fuzz/seeds/<target>). Any crash, panic, leak of the
# time budget or out-of-memory fails the run. The long campaigns are in docs/assurance.md; this
# only proves the targets still build and still hold on their seeds plus a few seconds of mutation.
#
#   bash .ci/fuzz-smoke.sh [seconds per target, default 10]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

secs="${1:-10}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --version 0.13.2 >/dev/null

# cargo-fuzz needs nightly flags (-Zsanitizer); the stable toolchain accepts them this way.
export RUSTC_BOOTSTRAP=1
cargo fuzz build >/dev/null 2>&1 || cargo fuzz build
# cargo fuzz has no --locked: check that the build left the committed lock file as it was.
git diff --exit-code --quiet -- Cargo.lock \
  || { echo "FAIL: fuzz/Cargo.lock changed during the build (run cargo fuzz build and commit it)"; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=0
for target in $(cargo fuzz list); do
  corpus="$work/$target"
  mkdir -p "$corpus"
  [ -d "seeds/$target" ] && cp "seeds/$target"/* "$corpus/"
  if out=$(cargo fuzz run "$target" "$corpus" -- -max_total_time="$secs" -rss_limit_mb=2048 \
             -timeout=10 -print_final_stats=1 2>&1); then
    runs=$(printf '%s\n' "$out" | sed -n 's/^stat::number_of_executed_units: *//p' | tail -1)
    echo "ok: $target — ${runs:-?} executions in ${secs} s, no finding"
  else
    echo "FAIL: $target"
    printf '%s\n' "$out" | tail -40
    failed=1
  fi
done
exit "$failed"
