#!/usr/bin/env bash
# CI check of the CPU image (called by .ci/run after `make test`): build it on an offline-built Debian base and
# train inside it with torchrun, without network, onto a mounted volume.
#
#   docker/ci.sh                      # from anywhere; needs root when docker/debootstrap must be installed
#   DOCKER_CI_RESUME=0 docker/ci.sh   # skip the resume step (step 7)
#
# Steps: 1 tools (apt-get when missing), 2 dockerd (started here and stopped at exit unless one already runs),
# 3 the base image (debootstrap bookworm minbase + python3, imported once and cached as an image and a tarball),
# 4 the CPU image, 5 `recsys-transfer env` in it, 6 a 2-process torchrun training of the synthetic config with
# --network none onto a mounted volume, 7 a resume from the volume's checkpoint after a worker killed itself.
#
# Environment: DOCKER_CI_RESUME (1), DOCKER_CI_CACHE (base tarball cache, default ~/.cache/recsys-transfer/docker-ci),
# DOCKER_CI_BASE (base image name), DOCKER_CI_IMAGE (image name), DOCKER_CI_FAULT_STEP (5), DOCKER_CI_KEEP=1 (keep
# the volume directory), PIP_FIND_LINKS (a local torch CPU wheel there is put in the build context).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
RESUME="${DOCKER_CI_RESUME:-1}"
CACHE="${DOCKER_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/recsys-transfer/docker-ci}"
BASE="${DOCKER_CI_BASE:-recsys-transfer-base:bookworm-minbase}"
IMAGE="${DOCKER_CI_IMAGE:-recsys-transfer:cpu-ci}"
FAULT_STEP="${DOCKER_CI_FAULT_STEP:-5}"
SUITE=bookworm
MIRROR="${DOCKER_CI_MIRROR:-http://deb.debian.org/debian}"
LABEL="recsys-transfer-docker-ci=$$"

STEP="setup"
T0=$SECONDS
TSTEP=$SECONDS
DOCKERD_PID=""
WORK=""
PLACED=()

step() {
  echo "docker-ci: step $STEP done ($((SECONDS - TSTEP)) s)"
  STEP="$1"
  TSTEP=$SECONDS
  echo "==> docker-ci: step $STEP"
}
fail() { echo "docker-ci: FAILED at step $STEP: $*" >&2; exit 1; }

cleanup() {
  local code=$?
  set +e
  if [ -n "$DOCKERD_PID" ] || docker info >/dev/null 2>&1; then
    ids=$(docker ps -aq --filter "label=$LABEL" 2>/dev/null)
    [ -n "$ids" ] && docker rm -f $ids >/dev/null 2>&1
  fi
  for f in "${PLACED[@]}"; do rm -f "$f"; done
  if [ -n "$WORK" ] && [ "${DOCKER_CI_KEEP:-0}" != 1 ]; then rm -rf "$WORK"; fi
  if [ -n "$DOCKERD_PID" ]; then
    echo "docker-ci: stopping the dockerd started here (pid $DOCKERD_PID)"
    kill "$DOCKERD_PID" 2>/dev/null
    for _ in $(seq 1 30); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
  fi
  if [ "$code" -eq 0 ]; then
    echo "docker-ci: all steps passed in $((SECONDS - T0)) s"
  else
    echo "docker-ci: FAILED at step $STEP (exit status $code) after $((SECONDS - T0)) s" >&2
  fi
  exit "$code"
}
trap cleanup EXIT

# The training steps 6 and 7 run: 16,000 training rows, 2 ranks, batches of 2048 -> 3 steps per epoch and rank, so
# global step $FAULT_STEP falls in the second epoch (a run that checkpoints at least once per epoch has one by then).
train_args() {  # TRAIN=(the command's words); $1: the run directory on the volume
  TRAIN=(launch --standalone --nproc-per-node 2 -- train --config pipelines/synthetic.yaml
         --set data.path=/vol/data --set data.prepare.rows=20000 --set train.epochs=2 --set train.batch_size=2048
         --set train.progress=false --output "$1")
}
run_in_image() {  # docker run of the image, no network, the volume at /vol; extra docker options first, then --
  local opts=()
  while [ "$1" != "--" ]; do opts+=("$1"); shift; done
  shift
  # --hostname localhost: torchrun's workers look up the container's hostname, which has no address without a network
  docker run --rm --label "$LABEL" --network none --hostname localhost -v "$WORK/vol:/vol" -e OMP_NUM_THREADS=1 \
    "${opts[@]}" "$IMAGE" "$@"
}
json_field() {  # json_field FILE KEY: the top-level KEY of a JSON file, as text or JSON ("" when absent or empty)
  python3 -c 'import json, sys; v = json.load(open(sys.argv[1])).get(sys.argv[2])
print("" if v in (None, "", [], {}) else v if isinstance(v, str) else json.dumps(v))' "$1" "$2"
}

STEP="1-tools"
echo "==> docker-ci: step $STEP"
missing=()
for cmd in docker dockerd containerd runc iptables debootstrap; do
  command -v "$cmd" >/dev/null || missing+=("$cmd")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] \
    || fail "missing ${missing[*]} and not root: install docker.io containerd runc iptables debootstrap"
  echo "docker-ci: installing (missing: ${missing[*]})"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io containerd runc iptables debootstrap
fi
command -v python3 >/dev/null || fail "python3 is needed to read the run's JSON files"

step "2-dockerd"
if docker info >/dev/null 2>&1; then
  echo "docker-ci: using the running docker daemon (left running)"
else
  [ "$(id -u)" -eq 0 ] || fail "no docker daemon reachable and not root (cannot start dockerd)"
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/recsys-docker-ci.XXXXXX")"
  # a dockerd killed without its shutdown leaves its pid file, and the next one refuses to start
  if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then rm -f /var/run/docker.pid; fi
  dockerd >"$WORK/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -20 "$WORK/dockerd.log" >&2; fail "dockerd exited"; }
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log" >&2; fail "dockerd not ready after 30 s"; }
  echo "docker-ci: started dockerd (pid $DOCKERD_PID, log $WORK/dockerd.log)"
fi
[ -n "$WORK" ] || WORK="$(mktemp -d "${TMPDIR:-/tmp}/recsys-docker-ci.XXXXXX")"
# the client on PATH may lack buildx: then the classic builder (the Dockerfile needs nothing else)
if ! docker buildx version >/dev/null 2>&1; then export DOCKER_BUILDKIT=0; fi

step "3-base-image"
TARBALL="$CACHE/$SUITE-minbase-python3.tar"
if docker image inspect "$BASE" >/dev/null 2>&1; then
  echo "docker-ci: base image $BASE exists (cached)"
else
  if [ ! -s "$TARBALL" ]; then
    [ "$(id -u)" -eq 0 ] || fail "debootstrap needs root"
    echo "docker-ci: debootstrap $SUITE (minbase + python3) from $MIRROR"
    mkdir -p "$CACHE"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$WORK/rootfs" "$MIRROR" \
      >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log" >&2; fail "debootstrap failed"; }
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
    tar -C "$WORK/rootfs" -cf "$TARBALL.tmp" . && mv "$TARBALL.tmp" "$TARBALL"
    rm -rf "$WORK/rootfs"
  else
    echo "docker-ci: base tarball $TARBALL (cached)"
  fi
  docker import "$TARBALL" "$BASE" >/dev/null
  echo "docker-ci: imported $BASE"
fi

step "4-build-cpu-image"
# the build stage's pip needs the CA certificates added on this host, and finds a local torch wheel first
for crt in /usr/local/share/ca-certificates/*.crt; do
  [ -f "$crt" ] || continue
  dst="$ROOT/docker/certs/ci-$(basename "$crt")"
  cp "$crt" "$dst" && PLACED+=("$dst")
done
for dir in ${PIP_FIND_LINKS:-}; do
  for whl in "$dir"/torch-2.13.0*-cp311-*.whl; do
    [ -f "$whl" ] || continue
    dst="$ROOT/docker/wheels/$(basename "$whl")"
    if [ ! -e "$dst" ]; then ln "$whl" "$dst" 2>/dev/null || cp "$whl" "$dst"; PLACED+=("$dst"); fi
  done
done
docker build -f "$ROOT/docker/Dockerfile" --build-arg BASE_IMAGE="$BASE" --build-arg VARIANT=cpu \
  --label recsys-transfer-docker-ci=image -t "$IMAGE" "$ROOT" >"$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log" >&2; fail "docker build failed (log above)"; }
grep -E "^(torch|torchrec|fbgemm_build|fbgemm_import|Successfully tagged) " "$WORK/build.log" || true
# the images this script built before, untagged by this build (the build stages' cache is kept)
docker image prune -f --filter label=recsys-transfer-docker-ci=image >/dev/null

step "5-env-in-image"
run_in_image -- env | tee "$WORK/env.txt"
grep -q '^fbgemm_import *ok$' "$WORK/env.txt" || fail "fbgemm does not import in the image"
grep -q '^fbgemm_build *cpu$' "$WORK/env.txt" || fail "the image's fbgemm build is not the CPU one"
[ "$(docker image inspect -f '{{.Config.User}}' "$IMAGE")" = recsys ] || fail "the image does not run as user recsys"
docker image inspect -f '{{json .Config.Healthcheck.Test}}' "$IMAGE" | grep -q 'recsys-transfer env' \
  || fail "the image has no HEALTHCHECK running recsys-transfer env"

step "6-train-2-processes"
mkdir -p "$WORK/vol"
chown 10001:10001 "$WORK/vol" 2>/dev/null || chmod 0777 "$WORK/vol"
train_args /vol/run
run_in_image -- "${TRAIN[@]}" || fail "training in the container failed"
[ "$(json_field "$WORK/vol/run/metrics.json" status)" = completed ] || fail "metrics.json does not say completed"
[ "$(json_field "$WORK/vol/run/metrics.json" world_size)" = 2 ] || fail "metrics.json: world_size is not 2"
echo "docker-ci: $WORK/vol/run/metrics.json says completed (world_size 2)"

if [ "$RESUME" = 1 ]; then
  step "7-resume-from-volume-checkpoint"
  # A worker kills itself (SIGKILL) before global step $FAULT_STEP: the job must fail. The same command again, in a
  # new container, must resume from the checkpoint the first one left on the volume and complete.
  set +e
  train_args /vol/resume
  run_in_image -e "RECSYS_TRANSFER_FAULT_STEP=$FAULT_STEP" -- "${TRAIN[@]}"
  code=$?
  set -e
  [ "$code" -ne 0 ] \
    || fail "the run with RECSYS_TRANSFER_FAULT_STEP=$FAULT_STEP completed (exit 0): this build injects no fault"
  echo "docker-ci: the faulted run ended with exit status $code, as expected"
  run_in_image -- "${TRAIN[@]}" || fail "the resumed run failed"
  [ "$(json_field "$WORK/vol/resume/metrics.json" status)" = completed ] || fail "resumed metrics.json not completed"
  from="$(json_field "$WORK/vol/resume/run.json" resumed_from)"
  [ -n "$from" ] || fail "run.json has no resumed_from: the second run started over instead of resuming"
  echo "docker-ci: resumed ($from) and completed"
  if [ "$(json_field "$WORK/vol/resume/metrics.json" test)" = "$(json_field "$WORK/vol/run/metrics.json" test)" ]; then
    echo "docker-ci: its test metrics equal the uninterrupted run's (step 6)"
  else
    echo "docker-ci: note: its test metrics differ from the uninterrupted run's (step 6)"
  fi
else
  step "7-resume-skipped"
  echo "docker-ci: DOCKER_CI_RESUME=$RESUME: the resume step is not run"
fi
echo "docker-ci: step $STEP done ($((SECONDS - TSTEP)) s)"
STEP="finished"
