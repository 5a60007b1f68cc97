# Sourced by the before/after benchmarks: bench_worktrees REF... checks each commit out into
# /tmp/raylm-bench-REF (once) with the package links an installed raylm has (raylm.kernels,
# raylm.deployments), so `PYTHONPATH=<worktree> .venv/bin/python -m raylm.cli` runs that commit.
bench_worktrees() {
  local REF WT
  for REF in "$@"; do
    WT=/tmp/raylm-bench-$REF
    [ -d "$WT" ] || git worktree add -q --detach "$WT" "$REF"
    ln -sfn ../kernels "$WT/raylm/kernels"; ln -sfn ../deployments "$WT/raylm/deployments"
  done
}
