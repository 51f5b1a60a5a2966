#!/usr/bin/env bash
# Creates the TPU VM: `tpu-vm create`, or with QUEUED=1 a queued resource (then waits until the
# node is READY). SPOT=1 / PREEMPTIBLE=1 pick the capacity type. Next: launch/setup.sh.
#   env: TPU_NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION [PROJECT SPOT PREEMPTIBLE QUEUED
#        QUEUED_RESOURCE_ID READY_TIMEOUT POLL_SECONDS DRY_RUN]
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_vars TPU_NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION
report_topology

capacity=()
if is_set SPOT; then capacity=(--spot); fi
if is_set QUEUED; then
  if is_set PREEMPTIBLE; then usage_error "queued resources have no PREEMPTIBLE; use SPOT=1"; fi
  gc compute tpus queued-resources create "$(queued_id)" --node-id="$TPU_NAME" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" \
    ${capacity[@]+"${capacity[@]}"}
  log "queued resource $(queued_id) requested; waiting for node $TPU_NAME to be READY"
  wait_ready
else
  if is_set PREEMPTIBLE; then capacity=(--preemptible); fi
  gc compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
    ${capacity[@]+"${capacity[@]}"}
fi
log "TPU $TPU_NAME created; next: bash launch/setup.sh"
