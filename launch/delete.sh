#!/usr/bin/env bash
# Deletes the TPU VM (QUEUED=1: the queued resource, with --force so its node goes too).
# The gs:// workdir is untouched: a later create/setup/run resumes from its last checkpoint.
#   env: TPU_NAME ZONE [PROJECT QUEUED QUEUED_RESOURCE_ID DRY_RUN]
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_vars TPU_NAME ZONE

if is_set QUEUED; then
  gc compute tpus queued-resources delete "$(queued_id)" --zone="$ZONE" --force --quiet
else
  gc compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet
fi
log "TPU $TPU_NAME deleted"
