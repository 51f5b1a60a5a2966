#!/usr/bin/env bash
# Installs glide_jax on every worker; non-interactive and idempotent (safe to re-run, e.g. after
# a new commit): a Python $PYTHON_VERSION venv, jax[tpu] at the version pinned in setup.py (with
# its libtpu), and the COMMITTED tree (`git archive HEAD`, copied with scp --worker=all) as
# `pip install -e`. Uncommitted changes are not shipped. Next: launch/run.sh.
#   env: TPU_NAME ZONE ACCELERATOR_TYPE [PROJECT PYTHON_VERSION DRY_RUN]
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_vars TPU_NAME ZONE ACCELERATOR_TYPE
report_topology

python_version=${PYTHON_VERSION:-3.11}
if ! [[ "$python_version" =~ ^3\.[0-9]+$ ]]; then usage_error "PYTHON_VERSION must look like 3.11"; fi
jax_version=$(sed -n 's/^ *"jax==\([0-9.]*\)",*$/\1/p' "$REPO_ROOT/setup.py")
if [ -z "$jax_version" ]; then die "no \"jax==X.Y.Z\" pin found in $REPO_ROOT/setup.py"; fi

if [ -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  warn "uncommitted changes are NOT uploaded: setup ships git HEAD"
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
run_local git -C "$REPO_ROOT" archive --format=tar.gz -o "$tmp/glide_jax.tar.gz" HEAD
gc compute tpus tpu-vm scp "$tmp/glide_jax.tar.gz" "$TPU_NAME:glide_jax_src.tar.gz" \
  --zone="$ZONE" --worker=all --quiet

# Python: the image's python@PY@ if it can make a venv, else a uv-managed one (Ubuntu 22.04 TPU
# images ship 3.10 and jax needs >= 3.11). libtpu comes from PyPI; the find-links page also
# serves older/nightly libtpu wheels.
remote=$(render PY="$python_version" JAX="$jax_version" <<'SH'
set -euo pipefail;
cd "$HOME";
if [ ! -x @VENV@/bin/python@PY@ ]; then
  rm -rf @VENV@;
  if ! python@PY@ -m venv @VENV@ 2>/dev/null; then
    rm -rf @VENV@;
    python3 -m pip install --user --quiet --upgrade uv || python3 -m pip install --user --quiet --upgrade --break-system-packages uv;
    "$HOME/.local/bin/uv" venv --seed --python @PY@ @VENV@;
  fi;
fi;
@VENV@/bin/python -m pip install --quiet --upgrade pip;
@VENV@/bin/python -m pip install --quiet "jax[tpu]==@JAX@" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html;
rm -rf @SRC@ && mkdir -p @SRC@ && tar -xzf glide_jax_src.tar.gz -C @SRC@;
@VENV@/bin/python -m pip install --quiet -e "./@SRC@";
echo "$(hostname): ready: $(@VENV@/bin/python -c 'import jax, glide_jax; print("jax", jax.__version__)')";
SH
)
tpu_ssh all "$remote"
log "set up $TPU_NAME (jax[tpu]==$jax_version, Python $python_version); next: bash launch/run.sh"
