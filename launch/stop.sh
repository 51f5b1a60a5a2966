#!/usr/bin/env bash
# Stops the run on every worker through its pid file ~/glide_jax_runs/$RUN/train.pid (never by
# process name): SIGTERM, on which the trainer writes a final checkpoint and exits 0, then waits
# up to STOP_TIMEOUT seconds (default 600). Still alive after that: exit 1, or SIGKILL with
# KILL_AFTER_TIMEOUT=1. `bash launch/run.sh` later resumes from that checkpoint.
#   env: TPU_NAME ZONE RUN [PROJECT STOP_TIMEOUT KILL_AFTER_TIMEOUT DRY_RUN]
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_vars TPU_NAME ZONE RUN
check_name RUN
stop_timeout=${STOP_TIMEOUT:-600}
if ! [[ "$stop_timeout" =~ ^[0-9]+$ ]]; then usage_error "STOP_TIMEOUT must be a number of seconds"; fi
kill_after=0
if is_set KILL_AFTER_TIMEOUT; then kill_after=1; fi

remote="$(remote_stop_fn) $(render RUN="$RUN" TIMEOUT="$stop_timeout" KILL="$kill_after" <<'SH'
stop_pid "$HOME/@RUNS@/@RUN@/train.pid" @TIMEOUT@ @KILL@;
SH
)"
tpu_ssh all "$remote"
log "stopped $RUN on $TPU_NAME (checkpoint in its gs:// workdir); resume with: bash launch/run.sh"
