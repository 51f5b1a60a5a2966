# shellcheck shell=bash
# Sourced by every launch/*.sh script (not run on its own): environment checks, the `gc`
# gcloud wrapper that honours DRY_RUN=1, slice topology, and the paths used on the TPU workers.
# Avoids bash-4-only features (macOS ships bash 3.2) but is tested on Linux only; see docs/tpu.md.

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck disable=SC2034  # used by the scripts that source this file
REPO_ROOT=$(cd "$LAUNCH_DIR/.." && pwd)

# On every worker, relative to $HOME there: sources (from `git archive HEAD`), the venv, and one
# directory per RUN holding worker.log and train.pid.
REMOTE_SRC=glide_jax
REMOTE_VENV=glide_jax_venv
REMOTE_RUNS=glide_jax_runs

# DRY_RUN lines go to the caller's stdout even from inside $(...).
exec 3>&1

log() { printf '[%s] %s\n' "$(basename "$0" .sh)" "$*"; }
warn() { printf '[%s] warning: %s\n' "$(basename "$0" .sh)" "$*" >&2; }
die() { printf '[%s] error: %s\n' "$(basename "$0" .sh)" "$*" >&2; exit 1; }
usage_error() { printf '[%s] error: %s\n' "$(basename "$0" .sh)" "$*" >&2; exit 2; }

is_set() { [ "${!1:-0}" = 1 ]; }
dry_run() { is_set DRY_RUN; }

var_example() {
  case "$1" in
    TPU_NAME) echo "glide-v4-8" ;;
    ZONE) echo "us-central2-b" ;;
    ACCELERATOR_TYPE) echo "v4-8" ;;
    RUNTIME_VERSION) echo "tpu-ubuntu2204-base" ;;
    BUCKET) echo "my-bucket            # gs://my-bucket/runs/\$RUN becomes the workdir" ;;
    CONFIG) echo "glide_filtered_base64  # a file configs/\$CONFIG.py" ;;
    RUN) echo "base64-001           # run name: log dir on the workers and gs:// workdir" ;;
    *) echo "..." ;;
  esac
}

# require_vars NAME...: exits 2 naming every unset/empty variable and how to set it.
require_vars() {
  local missing=() v
  for v in "$@"; do
    if [ -z "${!v:-}" ]; then missing+=("$v"); fi
  done
  if [ "${#missing[@]}" -eq 0 ]; then return 0; fi
  {
    printf '[%s] error: missing required environment variable(s): %s\n' "$(basename "$0" .sh)" "${missing[*]}"
    echo "set them first, for example:"
    for v in "${missing[@]}"; do echo "  export $v=$(var_example "$v")"; done
    echo "(all variables: docs/tpu.md)"
  } >&2
  exit 2
}

check_flags() {
  local v
  for v in DRY_RUN SPOT PREEMPTIBLE QUEUED FOLLOW ONCE KILL_AFTER_TIMEOUT; do
    case "${!v:-0}" in 0 | 1) ;; *) usage_error "$v must be 0 or 1 (got '${!v}')" ;; esac
  done
  if is_set SPOT && is_set PREEMPTIBLE; then usage_error "set only one of SPOT=1 and PREEMPTIBLE=1"; fi
}

check_name() {  # check_name VAR: names end up in paths on the workers and in gs:// paths
  if ! [[ "${!1}" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]]; then
    usage_error "$1='${!1}' must match [A-Za-z0-9][A-Za-z0-9._-]*"
  fi
}

# Single-line display of a command, quoting only arguments that need it.
quote_cmd() {
  local out="" a q="'\\''"
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=" $a"; else out+=" '${a//\'/$q}'"; fi
  done
  printf '%s\n' "${out# }"
}

# gc ARGS...: `gcloud ARGS [--project=$PROJECT]`, or with DRY_RUN=1 print "+ gcloud ARGS" instead.
gc() {
  local args=("$@")
  if [ -n "${PROJECT:-}" ]; then args+=("--project=$PROJECT"); fi
  if dry_run; then
    echo "+ $(quote_cmd gcloud "${args[@]}")" >&3
    return 0
  fi
  gcloud "${args[@]}"
}

# run_local CMD...: a local side-effecting command, printed instead of run under DRY_RUN=1.
run_local() {
  if dry_run; then
    echo "+ $(quote_cmd "$@")" >&3
    return 0
  fi
  "$@"
}

# tpu_ssh WORKER COMMAND: WORKER is "all" (every host at once, in parallel) or an index.
tpu_ssh() {
  gc compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker="$1" --quiet --command="$2"
}

queued_id() { echo "${QUEUED_RESOURCE_ID:-$TPU_NAME}"; }

# Prints the node state (READY, CREATING, PREEMPTED, ...), MISSING if it does not exist, or
# DRY_RUN under DRY_RUN=1.
tpu_state() {
  local s
  if dry_run; then
    gc compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" --format='value(state)'
    echo DRY_RUN
  elif s=$(gc compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" --format='value(state)' 2>/dev/null); then
    echo "${s:-UNKNOWN}"
  else
    echo MISSING
  fi
}

# Waits until the node is READY (queued resources provision asynchronously).
wait_ready() {
  local timeout=${READY_TIMEOUT:-3600} poll=${POLL_SECONDS:-30} start=$SECONDS state
  while :; do
    state=$(tpu_state)
    case "$state" in READY | DRY_RUN) return 0 ;; esac
    if [ $((SECONDS - start)) -ge "$timeout" ]; then
      die "TPU $TPU_NAME not READY after ${timeout}s (state $state)"
    fi
    log "TPU $TPU_NAME is $state; waiting for READY"
    sleep "$poll"
  done
}

# Hosts in the slice from ACCELERATOR_TYPE; fails for an unknown family.
#   v2/v3/v4/v5p-N: N TensorCores, 8 per host (v4-8 = 1 host, v4-32 = 4, v5p-64 = 8).
#   v5litepod/v6e-N: N chips; up to 8 on one host, multi-host slices have 4 chips per host
#   (v5litepod-16 = 4 hosts).
num_workers() {
  local family=${ACCELERATOR_TYPE%-*} n=${ACCELERATOR_TYPE##*-}
  if ! [[ "$n" =~ ^[0-9]+$ ]]; then return 1; fi
  case "$family" in
    v2 | v3 | v4 | v5p) echo $((n <= 8 ? 1 : n / 8)) ;;
    v5litepod | v5e | v6e) echo $((n <= 8 ? 1 : n / 4)) ;;
    *) return 1 ;;
  esac
}

# Multi-host needs nothing extra from us: every ssh command already goes to --worker=all, and
# jax.distributed.initialize() finds its peers from the TPU VM metadata.
report_topology() {
  local n
  if n=$(num_workers); then
    if [ "$n" -gt 1 ]; then
      log "multi-host slice: $n workers ($ACCELERATOR_TYPE); commands run on --worker=all"
    else
      log "single-host slice: 1 worker ($ACCELERATOR_TYPE)"
    fi
  else
    warn "cannot derive the worker count from ACCELERATOR_TYPE=$ACCELERATOR_TYPE; using --worker=all"
  fi
}

# Remote shell function (one line): stop_pid PIDFILE TIMEOUT KILL. SIGTERM to the pid recorded in
# PIDFILE only (never by process name), wait up to TIMEOUT s for the final checkpoint, then
# SIGKILL if KILL=1 or fail. A pid that is no longer glide_jax.train (reused) is left alone.
remote_stop_fn() {
  # shellcheck disable=SC2119  # no KEY=VALUE needed: the function takes its own arguments
  render <<'SH'
stop_pid() {
  local pf=$1 timeout=$2 kill_after=$3 pid i=0;
  if [ ! -f "$pf" ]; then echo "$(hostname): no pid file $pf"; return 0; fi;
  pid=$(cat "$pf");
  if ! kill -0 "$pid" 2>/dev/null; then echo "$(hostname): pid $pid from $pf is not running"; rm -f "$pf"; return 0; fi;
  if ! grep -qa glide_jax.train "/proc/$pid/cmdline"; then echo "$(hostname): pid $pid from $pf is not glide_jax.train (stale pid file); left alone"; rm -f "$pf"; return 0; fi;
  echo "$(hostname): SIGTERM to pid $pid from $pf; waiting up to ${timeout}s for the final checkpoint";
  kill -TERM "$pid";
  while kill -0 "$pid" 2>/dev/null && [ "$i" -lt "$timeout" ]; do sleep 1; i=$((i + 1)); done;
  if kill -0 "$pid" 2>/dev/null; then
    if [ "$kill_after" = 1 ]; then echo "$(hostname): pid $pid still alive after ${timeout}s; SIGKILL"; kill -KILL "$pid";
    else echo "$(hostname): pid $pid still alive after ${timeout}s (set KILL_AFTER_TIMEOUT=1 to SIGKILL)"; return 1; fi;
  fi;
  rm -f "$pf"; echo "$(hostname): pid $pid stopped";
};
SH
}

# render [KEY=VALUE...] < SCRIPT: a remote script as one line (so DRY_RUN prints one command per
# line), with @KEY@ replaced by VALUE, and @SRC@, @VENV@, @RUNS@ by the remote paths above (the
# script keeps its own $HOME, expanded on the worker). Every script line must therefore end in
# ';', '&', 'then', 'do', 'else', '{' or '&&'.
# shellcheck disable=SC2120  # KEY=VALUE arguments come from the scripts sourcing this file
render() {
  local s kv val
  s=$(cat)
  s=${s//$'\n'/ }
  while [[ "$s" == *"  "* ]]; do s=${s//  / }; done
  for kv in "SRC=$REMOTE_SRC" "VENV=$REMOTE_VENV" "RUNS=$REMOTE_RUNS" "$@"; do
    val=${kv#*=}
    s=${s//@${kv%%=*}@/"$val"}  # quoted: bash 5.2 would expand '&' in the replacement
  done
  printf '%s' "$s"
}

check_flags
