#!/usr/bin/env bash
# Watchdog for spot/preemptible TPUs. Every POLL_SECONDS (default 300) it reads the TPU state:
#   READY and the run alive on worker 0  -> keep watching;
#   READY and the run not alive          -> exit 0 (finished, crashed or stopped: see logs.sh);
#   READY but worker 0 unreachable       -> keep watching;
#   CREATING/STARTING/... (transient)     -> keep watching;
#   PREEMPTED, TERMINATED, MISSING, ...  -> recover: delete.sh, create.sh, setup.sh, run.sh.
# run.sh resumes from the last checkpoint in gs://$BUCKET/runs/$RUN, so nothing is lost but
# the steps since that checkpoint. At most MAX_RETRIES (default 5) recoveries, then exit 1.
# ONCE=1 checks (and recovers) once and exits; DRY_RUN=1 prints one recovery's commands.
#   env: TPU_NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION BUCKET CONFIG RUN
#        [PROJECT SPOT PREEMPTIBLE QUEUED EXTRA_FLAGS MAX_RETRIES POLL_SECONDS ONCE DRY_RUN]
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_vars TPU_NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION BUCKET CONFIG RUN
check_name RUN
max_retries=${MAX_RETRIES:-5}
poll=${POLL_SECONDS:-300}
if ! [[ "$max_retries" =~ ^[0-9]+$ ]]; then usage_error "MAX_RETRIES must be a number"; fi
if ! [[ "$poll" =~ ^[0-9]+$ ]]; then usage_error "POLL_SECONDS must be a number"; fi

run_status() {  # on worker 0: ALIVE or DEAD from our pid file; UNKNOWN if ssh fails
  local out
  out=$(tpu_ssh 0 "$(render RUN="$RUN" <<'SH'
pf="$HOME/@RUNS@/@RUN@/train.pid";
if [ -f "$pf" ] && kill -0 "$(cat "$pf")" 2>/dev/null; then echo ALIVE; else echo DEAD; fi;
SH
)") || out=""
  case "$out" in *ALIVE*) echo ALIVE ;; *DEAD*) echo DEAD ;; *) echo UNKNOWN ;; esac
}

recover() {
  log "recovering $TPU_NAME: delete, create, setup, run"
  # A node that is already gone cannot be deleted; that is fine.
  bash "$LAUNCH_DIR/delete.sh" || warn "delete failed (already gone?); continuing"
  bash "$LAUNCH_DIR/create.sh" && bash "$LAUNCH_DIR/setup.sh" && bash "$LAUNCH_DIR/run.sh"
}

retries=0
while :; do
  state=$(tpu_state)
  log "TPU $TPU_NAME state: $state"
  case "$state" in
    READY)
      case "$(run_status)" in
        ALIVE) log "run $RUN alive on worker 0" ;;
        DEAD)
          log "TPU READY but run $RUN is not alive on worker 0 (finished, crashed or stopped); see: bash launch/logs.sh"
          exit 0
          ;;
        *) warn "could not reach worker 0; checking again later" ;;
      esac
      ;;
    CREATING | STARTING | RESTARTING | REPAIRING | REIMAGING | PROVISIONING | UPDATING)
      log "transient state; watching"
      ;;
    *)
      if [ "$retries" -ge "$max_retries" ]; then
        die "TPU $TPU_NAME is $state and MAX_RETRIES=$max_retries recoveries are used up"
      fi
      retries=$((retries + 1))
      log "recovery $retries/$max_retries"
      if recover; then
        log "recovered: $RUN resumes from its last checkpoint"
      else
        warn "recovery $retries failed"
      fi
      if dry_run; then exit 0; fi
      ;;
  esac
  if is_set ONCE; then exit 0; fi
  sleep "$poll"
done
