# Sourced by the scripts that start processes (benches/instructions.sh, deploy/pgo.sh): a
# work directory, and the processes started (append their pids to PIDS), all stopped and
# removed on exit however the script ends.
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
