#!/usr/bin/env bash
# Two commits of the gateway, interleaved, same arguments, several rounds: one run, side by side.
#   bench/before_after.sh BEFORE AFTER ROUNDS -- heartbeat_bench.py arguments...
# Each commit is checked out into its own worktree under $TMPDIR and run from there with this
# repository's .venv (PYTHONPATH makes that tree's `gateway` the one imported). Prints one JSON
# line per run: {"round", "commit", "args", "result"}.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
before="$1" after="$2" rounds="$3"
shift 3
[ "${1:-}" = "--" ] && shift
tmp="$(mktemp -d)"
trap 'git -C "$repo" worktree remove --force "$tmp/before" 2>/dev/null || true;
      git -C "$repo" worktree remove --force "$tmp/after" 2>/dev/null || true; rm -rf "$tmp"' EXIT
git -C "$repo" worktree add -q --detach "$tmp/before" "$before"
git -C "$repo" worktree add -q --detach "$tmp/after" "$after"
for round in $(seq 1 "$rounds"); do
  for side in before after; do
    commit="$(git -C "$tmp/$side" rev-parse --short HEAD)"
    line="$(cd "$tmp/$side" && PYTHONPATH="$tmp/$side" "$repo/.venv/bin/python" bench/heartbeat_bench.py "$@" --json | tail -1)"
    printf '{"round": %s, "commit": "%s", "args": "%s", "result": %s}\n' "$round" "$commit" "$*" "$line"
  done
done
