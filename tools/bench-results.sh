#!/usr/bin/env bash
# Issue 14's result-storage benchmark in one sitting: the current raftgen
# against the design that kept result images in the Raft log.
#
# "Before" is the commit that added the benchmark's instruments (the noise
# mode of the test-pattern TEST DOUBLE, raftgen_peer_sent_bytes_total,
# raftgen_snapshot_bytes, POST /raft/snapshot-now) to that design and changed
# nothing else. It is built once, in release, into target/bench-before/
# (a git worktree; set RAFTGEN_BENCH_BEFORE_REV to compare with another
# commit), then benches/results.rs runs both binaries configuration by
# configuration. Figures go to stdout; see the README ("Result storage").
set -euo pipefail
cd "$(dirname "$0")/.."

rev=${RAFTGEN_BENCH_BEFORE_REV:-0b0095282cb74ac57392c86bff69da2ff927d13f}
target=$(realpath -m "${CARGO_TARGET_DIR:-target}")
out=target/bench-before
bin="$out/raftgen-$rev"
if [ ! -x "$bin" ]; then
    mkdir -p "$out"
    src="$out/src-$rev"
    if [ ! -d "$src" ]; then
        git worktree add --detach "$src" "$rev" >/dev/null
    fi
    echo "building the 'before' raftgen ($rev) in release" >&2
    (cd "$src" && CARGO_TARGET_DIR="$target" cargo build --release --bin raftgen)
    cp "$target/release/raftgen" "$bin"
fi
RAFTGEN_BENCH_BEFORE_BIN="$PWD/$bin" cargo bench --bench results
