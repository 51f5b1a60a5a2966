#!/usr/bin/env bash
# Status and logs: the TPU state (`tpu-vm describe`), then on each worker whether the pid in
# ~/glide_jax_runs/$RUN/train.pid is alive and the tail of ~/glide_jax_runs/$RUN/worker.log.
#   env: TPU_NAME ZONE RUN [PROJECT WORKER=all|0|1.. LINES=50 FOLLOW=1 DRY_RUN]
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_vars TPU_NAME ZONE RUN
check_name RUN
worker=${WORKER:-all}
lines=${LINES:-50}
if ! [[ "$worker" =~ ^(all|[0-9]+)$ ]]; then usage_error "WORKER must be 'all' or a worker index (got '$worker')"; fi
if ! [[ "$lines" =~ ^[0-9]+$ ]]; then usage_error "LINES must be a number (got '$lines')"; fi
follow=""
if is_set FOLLOW; then follow="-F"; fi

state=$(tpu_state)
log "TPU $TPU_NAME state: $state"
if [ "$state" = MISSING ]; then exit 1; fi

remote=$(render RUN="$RUN" LINES="$lines" FOLLOW="$follow" <<'SH'
d="$HOME/@RUNS@/@RUN@";
if [ -f "$d/train.pid" ] && kill -0 "$(cat "$d/train.pid")" 2>/dev/null; then echo "== $(hostname): RUNNING (pid $(cat "$d/train.pid"))";
elif [ -f "$d/train.pid" ]; then echo "== $(hostname): NOT RUNNING (pid $(cat "$d/train.pid") from $d/train.pid has exited)";
else echo "== $(hostname): NOT RUNNING (no $d/train.pid)"; fi;
if [ -f "$d/worker.log" ]; then tail -n @LINES@ @FOLLOW@ "$d/worker.log"; else echo "(no $d/worker.log yet)"; fi;
SH
)
tpu_ssh "$worker" "$remote"
