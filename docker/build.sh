#!/usr/bin/env bash
# Build the ExpertFlow images without a container registry:
#   1. a wheelhouse on the host: `pip download` of the dependencies (Linux x86_64, CPython 3.11) and
#      expertflow's own wheel; pip never runs against an index inside a container (no CA, no proxy there);
#   2. the base: the standard python:3.11-slim-bookworm where Docker has it or can pull it, else
#      expertflow-base:bookworm made here with debootstrap (no registry needed), unless --base names one;
#   3. the images: expertflow:latest (every service) and expertflow-redis:latest (and expertflow:latest-deps,
#      the dependencies' stage, kept as the build cache).
# Each step is cached (the wheelhouse and the base's root file system under EXPERTFLOW_DOCKER_CACHE, the layers
# in Docker), so a re-run after a code change rebuilds only expertflow's own layer.
#
# Usage: bash docker/build.sh [--base IMAGE]
#   --base IMAGE   build FROM this image (Debian bookworm-like, with Python 3.11 or none); `local`: the
#                  debootstrap base even where a registry is reachable
# Environment (all optional):
#   EXPERTFLOW_BASE          the same as --base
#   EXPERTFLOW_TORCH         the torch requirement (default torch==2.13.0: here the CPU build from the local
#                            wheels; from PyPI, the CUDA build, which also runs on CPU; see README)
#   EXPERTFLOW_IMAGE         the services image's tag (default expertflow:latest; compose.yaml reads the same)
#   EXPERTFLOW_REDIS_IMAGE   the Redis image's tag (default expertflow-redis:latest)
#   EXPERTFLOW_DOCKER_CACHE  where the wheelhouse and base live (default ~/.cache/expertflow/docker)
#   EXPERTFLOW_DEBIAN_MIRROR the mirror debootstrap uses (default http://deb.debian.org/debian)
#   PYTHON                   a Python with pip for the host-side steps (default .venv/bin/python, else python3)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
base=${EXPERTFLOW_BASE:-}
local_base=expertflow-base:bookworm
standard_base=python:3.11-slim-bookworm
torch_req=${EXPERTFLOW_TORCH:-torch==2.13.0}
image=${EXPERTFLOW_IMAGE:-expertflow:latest}
redis_image=${EXPERTFLOW_REDIS_IMAGE:-expertflow-redis:latest}
cache=${EXPERTFLOW_DOCKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/expertflow/docker}
mirror=${EXPERTFLOW_DEBIAN_MIRROR:-http://deb.debian.org/debian}

while [ $# -gt 0 ]; do
  case "$1" in
    --base) base=${2:?--base needs an image name}; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

die() { echo "build.sh: error: $*" >&2; exit 1; }
step() { echo "build.sh: $* (${SECONDS}s)" >&2; }

if [ -z "${PYTHON:-}" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then PYTHON=$repo/.venv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" -m pip --version >/dev/null 2>&1 \
  || die "$PYTHON has no pip; set PYTHON to one that has (e.g. the set-up's .venv/bin/python)"
docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed); start dockerd first"

mkdir -p "$cache/context/deps" "$cache/context/project"
# one build at a time per cache: two would rewrite the same wheelhouse and build context under each other
exec 9>"$cache/.lock"
flock -n 9 || { step "waiting for another build.sh using $cache"; flock 9; }

# --- 1. the wheelhouse -------------------------------------------------------------------------------------
# The image's Python is Debian bookworm's 3.11 on glibc 2.36, whatever the host is: ask pip for exactly that.
platforms=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
for minor in $(seq 17 36); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
target=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none)
target+=("${platforms[@]}")

requirements=$("$PYTHON" - "$repo/pyproject.toml" "$torch_req" <<'EOF'
import sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
# what pip download misses: it evaluates python_full_version markers for this Python, not --python-version, and
# redis needs async-timeout below 3.11.3 (bookworm's python3 is 3.11.2)
print("\n".join([sys.argv[2], *deps, "async-timeout>=4.0.3"]))
EOF
)
wheelhouse=$cache/context/deps
key=$(printf '%s\n' "$requirements" "${target[@]}" | sha256sum | cut -c1-16)
if [ "$(cat "$wheelhouse/.key" 2>/dev/null)" = "$key" ]; then
  step "wheelhouse: cached ($(du -sh "$wheelhouse" | cut -f1))"
else
  step "wheelhouse: pip download for linux x86_64 cp311"
  fresh=$(mktemp -d "$cache/deps.XXXXXX")
  printf '%s\n' "$requirements" >"$fresh/requirements.txt"
  # the log keeps pip's chatter (local index warnings) out of the way, and is shown when it fails
  "$PYTHON" -m pip download --dest "$fresh" "${target[@]}" -r "$fresh/requirements.txt" >"$fresh.log" 2>&1 \
    || { cat "$fresh.log" >&2; rm -rf "$fresh" "$fresh.log"; die "pip download failed (log above)"; }
  rm -f "$fresh.log"
  echo "$key" >"$fresh/.key"  # written last: a wheelhouse with a key is complete
  rm -rf "$wheelhouse" && mv "$fresh" "$wheelhouse"
  step "wheelhouse: done ($(du -sh "$wheelhouse" | cut -f1))"
fi
torch_wheel=$(cd "$wheelhouse" && ls torch-*.whl)
case "$torch_wheel" in
  *+cpu*) step "torch in the image: $torch_wheel (CPU only: the GPU variant needs a CUDA build, see README)" ;;
  *) step "torch in the image: $torch_wheel" ;;
esac

# expertflow's own wheel, built from a copy so the checkout gets no build/ or egg-info; a fixed timestamp makes
# the wheel byte-identical for identical sources, so Docker reuses its layer when nothing changed.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
packages=$("$PYTHON" - "$repo/pyproject.toml" <<'EOF'
import sys, tomllib
# the top-level package directories pyproject's packages.find includes ("expertflow*" -> expertflow)
include = tomllib.load(open(sys.argv[1], "rb"))["tool"]["setuptools"]["packages"]["find"]["include"]
print(" ".join(sorted({p.split(".")[0].rstrip("*") for p in include})))
EOF
)
# shellcheck disable=SC2086  # $packages: plain directory names, one word each
(cd "$repo" && cp -r pyproject.toml README.md $packages "$src/")
find "$src" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
rm -rf "$src/traces/data" "$src/training/results"  # not packages: data the wheel never holds
rm -f "$cache/context/project/"*.whl
SOURCE_DATE_EPOCH=315532800 "$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$cache/context/project" "$src" \
  >"$src.log" 2>&1 || { cat "$src.log" >&2; rm -f "$src.log"; die "building expertflow's wheel failed (log above)"; }
rm -f "$src.log"
step "expertflow wheel: $(cd "$cache/context/project" && ls)"

# --- 2. the base image ---------------------------------------------------------------------------------------
if [ -z "$base" ]; then  # a registry answers or not: a failed pull takes a fraction of a second without one
  if docker image inspect "$standard_base" >/dev/null 2>&1 || timeout 300 docker pull -q "$standard_base" >/dev/null 2>&1; then
    base=$standard_base
  else
    step "base: $standard_base cannot be pulled (no registry reachable); the local Debian base instead"
    base=$local_base
  fi
elif [ "$base" = local ]; then
  base=$local_base
fi
if [ "$base" = "$local_base" ] && ! docker image inspect "$local_base" >/dev/null 2>&1; then
  rootfs=$cache/base-bookworm.tar
  if [ ! -s "$rootfs" ]; then
    command -v debootstrap >/dev/null \
      || die "the base image needs debootstrap (apt-get install debootstrap), or pass --base IMAGE"
    [ "$(id -u)" = 0 ] || die "debootstrap needs root (or pass --base IMAGE)"
    step "base: debootstrap --variant=minbase bookworm"
    dir=$(mktemp -d)
    debootstrap --variant=minbase bookworm "$dir" "$mirror" >"$dir.log" 2>&1 \
      || { cat "$dir.log" >&2; rm -rf "$dir" "$dir.log"; die "debootstrap failed (log above)"; }
    rm -f "$dir.log"
    # security and point updates as in any Debian image; no package lists or .debs in the layer
    {
      echo "deb $mirror bookworm main"
      echo "deb $mirror bookworm-updates main"
      echo "deb http://deb.debian.org/debian-security bookworm-security main"
    } >"$dir/etc/apt/sources.list"
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/cache/apt/archives/*.deb
    tar -C "$dir" -cf "$rootfs.tmp" . && mv "$rootfs.tmp" "$rootfs"
    rm -rf "$dir"
  fi
  step "base: docker import $local_base"
  docker import "$rootfs" "$local_base" >/dev/null
fi

# --- 3. the images -------------------------------------------------------------------------------------------
# The dependencies' stage gets a tag of its own: an untagged stage would count as dangling and go with the
# prune below, and with it the cache that makes a rebuild take seconds instead of minutes.
case "$image" in *:*) deps_image=$image-deps ;; *) deps_image=$image:deps ;; esac
step "image: $deps_image (the dependencies) FROM $base"
docker build --build-arg "BASE=$base" -f "$repo/docker/Dockerfile" --target deps -t "$deps_image" "$cache/context"
step "image: $image FROM $base"
docker build --build-arg "BASE=$base" -f "$repo/docker/Dockerfile" -t "$image" "$cache/context"
step "image: $redis_image FROM $base"
empty=$(mktemp -d -p "$src")
docker build --build-arg "BASE=$base" -f "$repo/docker/redis.Dockerfile" -t "$redis_image" "$empty"
# Each code change leaves the previous image untagged: drop those (ours only, by label) so repeated builds,
# as in CI, do not fill the disk.
docker image prune --force --filter label=org.expertflow.image >/dev/null
step "done: $image, $redis_image"
