#!/usr/bin/env bash
# Starts training on every worker at once (nohup, one log per worker), detached from ssh:
#   python -m glide_jax.train --config configs/$CONFIG.py --workdir gs://$BUCKET/runs/$RUN $EXTRA_FLAGS
# First frees the TPU: SIGTERM to any run we started earlier on this TPU (by its pid file only,
# waiting for its final checkpoint) and removes the stale /tmp/libtpu_lockfile.
# The workdir is never wiped: re-running this script (also after a spot preemption and
# create + setup) resumes from the last checkpoint in gs://$BUCKET/runs/$RUN.
# On each worker: ~/glide_jax_runs/$RUN/worker.log and ~/glide_jax_runs/$RUN/train.pid.
#   env: TPU_NAME ZONE ACCELERATOR_TYPE BUCKET CONFIG RUN [PROJECT EXTRA_FLAGS STOP_TIMEOUT DRY_RUN]
#   EXTRA_FLAGS: space-separated config overrides, e.g. "--config.data.batch_size=512"
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_vars TPU_NAME ZONE ACCELERATOR_TYPE BUCKET CONFIG RUN
check_name RUN
check_name CONFIG
if [ ! -f "$REPO_ROOT/configs/$CONFIG.py" ]; then
  known=""
  for c in "$REPO_ROOT"/configs/*.py; do known+=" $(basename "$c" .py)"; done
  usage_error "no configs/$CONFIG.py; CONFIG is a file name in configs/ without .py:$known"
fi
gcs_bucket=${BUCKET#gs://}
gcs_bucket=${gcs_bucket%/}
workdir="gs://$gcs_bucket/runs/$RUN"
stop_timeout=${STOP_TIMEOUT:-600}
if ! [[ "$stop_timeout" =~ ^[0-9]+$ ]]; then usage_error "STOP_TIMEOUT must be a number of seconds"; fi

# Quote each override for the remote shell (values may not contain spaces of their own).
read -r -a extra <<<"${EXTRA_FLAGS:-}"
flags=""
for f in ${extra[@]+"${extra[@]}"}; do
  case "$f" in --*) ;; *) usage_error "EXTRA_FLAGS must be --flag=value items (got '$f')" ;; esac
  flags+=" $(printf '%q' "$f")"
done

report_topology
log "config configs/$CONFIG.py, workdir $workdir (kept: a re-run resumes from its last checkpoint)"

remote="$(remote_stop_fn) $(render RUN="$RUN" CONFIG="$CONFIG" WORKDIR="$workdir" FLAGS="$flags" \
  TIMEOUT="$stop_timeout" <<'SH'
set -uo pipefail;
d="$HOME/@RUNS@/@RUN@";
mkdir -p "$d" || exit 1;
for pf in "$HOME"/@RUNS@/*/train.pid; do
  if [ -f "$pf" ]; then stop_pid "$pf" @TIMEOUT@ 1; fi;
done;
sudo rm -f /tmp/libtpu_lockfile;
cd "$HOME/@SRC@" || exit 1;
echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname) start @RUN@ (configs/@CONFIG@.py -> @WORKDIR@)" >>"$d/worker.log";
setsid nohup "$HOME/@VENV@/bin/python" -m glide_jax.train --config "configs/@CONFIG@.py" --workdir "@WORKDIR@"@FLAGS@ >>"$d/worker.log" 2>&1 </dev/null &
echo "$!" >"$d/train.pid";
sleep 2;
if kill -0 "$(cat "$d/train.pid")" 2>/dev/null; then echo "$(hostname): started pid $(cat "$d/train.pid"); log $d/worker.log";
else echo "$(hostname): training exited at once; last lines of $d/worker.log:"; tail -n 20 "$d/worker.log"; exit 1; fi;
SH
)"
tpu_ssh all "$remote"
log "started $RUN on $TPU_NAME; follow with: bash launch/logs.sh (FOLLOW=1 to stream)"
