#!/usr/bin/env bash
# Build the nbdfleece container image with podman, run it, and check it from the host.
#
#   tools/container.sh [check]        build (and the base image if needed), run, check (default)
#   tools/container.sh build          build the image only
#   tools/container.sh base           build the Debian base image only (cached)
#   tools/container.sh has-base       exit 0 if the base image is cached, 1 if not
#   eval "$(tools/container.sh env)"  use podman by hand with the same configuration
#
# The script brings its own podman configuration (it never edits /etc): containers.conf with
# the runc runtime, default_ulimits = [], cgroupfs and host networking, and storage.conf with
# its own graph root (overlay, or vfs where overlay does not work). Where no registry serves
# base images, it builds one: a Debian 12 minbase root with python3 and python3-venv made by
# debootstrap, imported with `podman import` and cached under a tag keyed by a hash of the
# recipe. Missing Debian packages are installed with apt-get, as tools/test.sh does.
#
# Environment:
#   NBDFLEECE_CONTAINER_HOME    config, storage and caches (default ~/.cache/nbdfleece-container)
#   NBDFLEECE_BASE_IMAGE        build FROM this instead (docker.io/library/python:3.11-slim-bookworm)
#   NBDFLEECE_STORAGE_DRIVER    overlay or vfs (default: overlay where it works, else vfs)
#   NBDFLEECE_IMAGE             the tag to build and check (default localhost/nbdfleece:dev)
#   NBDFLEECE_CONTAINER_CA      CA bundle for pip in the build (default: the host's, if any)
#   DEBIAN_MIRROR               for debootstrap (default: apt's Debian mirror, else deb.debian.org)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
STATE=${NBDFLEECE_CONTAINER_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/nbdfleece-container}
if [ "$(id -u)" = 0 ]; then RUNDIR=/run/nbdfleece-container; else
    RUNDIR=${XDG_RUNTIME_DIR:-/tmp}/nbdfleece-container-$(id -u); fi
IMAGE=${NBDFLEECE_IMAGE:-localhost/nbdfleece:dev}
BASE_SUITE=bookworm
BASE_PACKAGES=python3,python3-venv
UPSTREAM_PORT=10809

say() { printf '%s\n' "$*"; }
die() { printf 'tools/container.sh: %s\n' "$*" >&2; exit 1; }

need_packages() {  # PACKAGE:COMMAND...: install the Debian packages whose command is missing
    local missing="" p
    for p in "$@"; do command -v "${p#*:}" >/dev/null || missing="$missing ${p%%:*}"; done
    [ -z "$missing" ] && return 0
    command -v apt-get >/dev/null || die "missing:$missing (install them, then run again)"
    local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    say "installing:$missing"
    $sudo apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

# -- podman's configuration, written fresh every run ------------------------------------------

storage_driver() {
    if [ -n "${NBDFLEECE_STORAGE_DRIVER:-}" ]; then echo "$NBDFLEECE_STORAGE_DRIVER"; return; fi
    if [ -s "$STATE/storage-driver" ]; then cat "$STATE/storage-driver"; return; fi
    # overlay needs kernel support (and, rootless, a recent kernel): try it once, remember.
    write_config overlay
    if podman info >/dev/null 2>"$STATE/overlay-probe.log"; then echo overlay; else echo vfs; fi \
        | tee "$STATE/storage-driver"
}

write_config() {
    local driver=$1
    mkdir -p "$STATE/config" "$RUNDIR"
    cat >"$STATE/config/containers.conf" <<EOF
# Written by tools/container.sh; edits are overwritten.
[containers]
default_ulimits = []
netns = "host"
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$RUNDIR/libpod"
EOF
    cat >"$STATE/config/storage.conf" <<EOF
# Written by tools/container.sh; edits are overwritten.
[storage]
driver = "$driver"
graphroot = "$STATE/storage-$driver"
runroot = "$RUNDIR/storage-$driver"
EOF
    export CONTAINERS_CONF="$STATE/config/containers.conf"
    export CONTAINERS_STORAGE_CONF="$STATE/config/storage.conf"
}

setup_podman() {
    need_packages podman:podman runc:runc
    mkdir -p "$STATE"
    write_config "$(storage_driver)"
}

# -- the base image: Debian 12 minbase with python3, from debootstrap --------------------------

build_rootfs() {  # $1: an empty folder. Everything here is part of the cache key.
    local root=$1 mirror=$2
    # Called in a condition, where set -e is off: every step says when it failed.
    debootstrap --variant=minbase --include="$BASE_PACKAGES" "$BASE_SUITE" "$root" "$mirror" \
        || return 1
    if grep -q " $root/" /proc/mounts; then echo "debootstrap left mounts under $root"; return 1; fi
    # What slim images leave out: package caches and lists, man pages, locales, docs
    # (the copyright files stay).
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin \
        "$root"/var/lib/apt/lists/* "$root"/var/log/* \
        "$root"/usr/share/man "$root"/usr/share/info "$root"/usr/share/locale
    find "$root/usr/share/doc" -type f ! -name copyright -delete || return 1
    find "$root/usr/share/doc" -depth -type d -empty -delete || return 1
    [ -x "$root/usr/bin/python3" ] || { echo "no python3 in $root"; return 1; }
}

base_tag() {
    local key
    key=$( { declare -f build_rootfs; echo "$BASE_SUITE $BASE_PACKAGES $(uname -m)"; } \
        | sha256sum | cut -c1-12)
    echo "localhost/nbdfleece-base:$BASE_SUITE-$key"
}

debian_mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
    local uri
    uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }')
    [ -n "$uri" ] || uri=$(awk '$1 == "deb" && $2 !~ /security/ { print $2; exit }' \
        /etc/apt/sources.list 2>/dev/null || true)
    echo "${uri:-http://deb.debian.org/debian}"
}

ensure_base() {
    local tag root mirror start
    tag=$(base_tag)
    if podman image exists "$tag"; then say "base image: $tag (cached)" >&2; echo "$tag"; return; fi
    [ "$(id -u)" = 0 ] || die "debootstrap needs root (or set NBDFLEECE_BASE_IMAGE)"
    need_packages debootstrap:debootstrap
    mirror=$(debian_mirror)
    say "base image: building $tag with debootstrap from $mirror" >&2
    start=$SECONDS
    for root in "$STATE"/rootfs.*; do  # left by an interrupted run (never one with mounts)
        if [ -d "$root" ] && ! grep -q " $root/" /proc/mounts; then rm -rf "$root"; fi
    done
    root=$(mktemp -d "$STATE/rootfs.XXXXXX")
    if ! build_rootfs "$root" "$mirror" >"$STATE/debootstrap.log" 2>&1; then
        tail -20 "$STATE/debootstrap.log" >&2
        grep -q " $root/" /proc/mounts || rm -rf "$root"
        die "debootstrap failed (log: $STATE/debootstrap.log)"
    fi
    tar -C "$root" --numeric-owner -c . | podman import -q \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
        --message "Debian $BASE_SUITE minbase + $BASE_PACKAGES (tools/container.sh)" \
        - "$tag" >/dev/null
    rm -rf "$root"
    # Bases of older recipes are not needed any more (an image still built on one keeps it).
    podman images --format '{{.Repository}}:{{.Tag}}' | grep '^localhost/nbdfleece-base:' \
        | grep -vxF "$tag" | xargs -r podman rmi >/dev/null 2>&1 || true
    say "base image: $tag built in $((SECONDS - start)) s" >&2
    echo "$tag"
}

# -- the image ----------------------------------------------------------------------------------

build_image() {
    local base args=() start ca
    if [ -n "${NBDFLEECE_BASE_IMAGE:-}" ]; then base=$NBDFLEECE_BASE_IMAGE
    else base=$(ensure_base); args+=(--pull=never); fi
    ca=${NBDFLEECE_CONTAINER_CA:-/etc/ssl/certs/ca-certificates.crt}
    if [ -r "$ca" ]; then
        # pip inside the build trusts what the host trusts (TLS-intercepting proxies).
        args+=(-v "$ca:/run/nbdfleece-build-ca.crt:ro" --build-arg PIP_CERT=/run/nbdfleece-build-ca.crt)
    fi
    start=$SECONDS
    say "image: building $IMAGE from $base" >&2
    args+=(--format docker --network=host --layers --build-arg BASE_IMAGE="$base" -f "$REPO/Dockerfile")
    # The build stage gets a tag too, so that pruning untagged images below keeps its
    # layers (the dependencies) as build cache.
    if ! { podman build "${args[@]}" --target build -t "$IMAGE-build" "$REPO" \
            && podman build "${args[@]}" -t "$IMAGE" "$REPO"; } >"$STATE/build.log" 2>&1; then
        tail -30 "$STATE/build.log" >&2
        die "podman build failed (log: $STATE/build.log)"
    fi
    # Images replaced by this build are untagged now; without this the private storage
    # grows by the venv layer (about 65 MB) at every code change.
    podman image prune -f >/dev/null
    say "image: $IMAGE built in $((SECONDS - start)) s, $(image_size) MB" >&2
}

image_size() {
    podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{ printf "%.0f", $1 / 1000000 }'
}

# -- the checks -------------------------------------------------------------------------------

CHECKS=0
WORK=""
AGENT=""
NAME=""
VOLUME=""

ok() { CHECKS=$((CHECKS + 1)); say "ok   $*"; }

fail() {
    say "FAIL $*"
    if [ -n "$NAME" ] && podman container exists "$NAME"; then
        say "---- podman logs $NAME (last 40 lines)"
        podman logs "$NAME" 2>&1 | tail -40
    fi
    exit 1
}

# run_check DESCRIPTION COMMAND...: the command must succeed; its output goes to $WORK/out.
run_check() {
    local what=$1; shift
    if "$@" >"$WORK/out" 2>&1; then ok "$what"; else
        say "---- $*"; cat "$WORK/out"; fail "$what"; fi
}

cleanup() {
    if [ -n "$NAME" ]; then podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true; fi
    if [ -n "$VOLUME" ]; then podman volume rm -f "$VOLUME" >/dev/null 2>&1 || true; fi
    if [ -n "$WORK" ]; then rm -rf "$WORK"; fi
}

host_nbdfleece() {
    if [ -x "$REPO/.venv/bin/nbdfleece" ]; then "$REPO/.venv/bin/nbdfleece" "$@"
    elif command -v nbdfleece >/dev/null; then nbdfleece "$@"
    else PYTHONPATH=$REPO python3 -m nbdfleece "$@"; fi
}

# nbdfleece-backup from the host. It creates the snapshot's overlay itself and hands its
# path to the server over QMP, so the server must open a file the agent made: the agent runs
# as the server's uid (10809), and its scratch folder is mounted into the container under the
# same path, with a second QMP socket in it (the volume's own socket lies under this script's
# storage, which only root can reach).
backup_checks() {
    local kind=$1 port=$2
    run_check "nbdfleece-backup $kind of demo (as uid 10809)" run_agent "$kind" \
        --server "nbd://127.0.0.1:$port" --qmp "$WORK/scratch/qmp.sock" --export demo \
        --to "$WORK/agent/backups" --scratch "$WORK/scratch" --quiet
    run_check "nbdfleece-backup verify" run_agent verify --from "$WORK/agent/backups"
    rm -f "$WORK/agent/restored.raw"
    run_check "nbdfleece-backup restore, identical to the live export (qemu-img compare)" \
        restore_and_compare "nbd://127.0.0.1:$port/demo"
}

run_agent() { setpriv --reuid=10809 --regid=10809 --clear-groups "$AGENT" "$@"; }

restore_and_compare() {
    run_agent restore --from "$WORK/agent/backups" --to "$WORK/agent/restored.raw" --quiet \
        && qemu-img compare -f raw -F raw "$WORK/agent/restored.raw" "$1"
}

last_point_bytes() {  # the data bytes the newest point of the backup folder holds
    run_agent list --from "$WORK/agent/backups" >&2
    python3 - "$WORK/agent/backups" <<'EOF'
import json, pathlib, sys
manifest = json.loads((pathlib.Path(sys.argv[1]) / "manifest.json").read_text())
print(manifest["points"][-1]["data_bytes"])
EOF
}

backup_agent() {  # prints how to run nbdfleece-backup, if it exists
    if [ -x "$REPO/.venv/bin/nbdfleece-backup" ]; then echo "$REPO/.venv/bin/nbdfleece-backup"
    elif command -v nbdfleece-backup >/dev/null; then command -v nbdfleece-backup
    fi
}

# output_is WANT COMMAND...: the command succeeds and prints exactly WANT.
output_is() {
    local want=$1 got; shift
    got=$("$@") || return 1
    printf 'got: %s\nwant: %s\n' "$got" "$want"
    [ "$got" = "$want" ]
}

map_of() {  # base:allocation as "OFFSET LENGTH TYPE" runs joined by ';'
    nbdinfo --map "$1" | awk '{ print $1, $2, $3 }' | paste -sd ';'
}

snapshot_names() {
    host_nbdfleece snapshot --qmp "unix:$1" list | cut -f1 | paste -sd ' '
}

last_health_output() {
    podman inspect --format '{{json .State.Health.Log}}' "$NAME" \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)[-1]["Output"].strip())'
}

count_in_log() {
    podman logs "$NAME" 2>&1 | grep -c "$1" || true
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# The image's own metadata, as the Dockerfile declares it.
check_metadata() {
    podman image inspect "$IMAGE" >"$WORK/image.json"
    python3 - "$WORK/image.json" "$UPSTREAM_PORT" <<'EOF'
import json
import sys

image = json.load(open(sys.argv[1]))[0]
config, port = image["Config"], sys.argv[2]
health = image.get("Healthcheck") or config.get("Healthcheck") or {}
checks = [
    ("runs as a non-root user (10809)", config.get("User") in ("10809:10809", "10809", "nbdfleece")),
    ("/data is a volume", "/data" in (config.get("Volumes") or {})),
    (f"exposes {port}/tcp", f"{port}/tcp" in (config.get("ExposedPorts") or {})),
    ("stop signal SIGTERM", config.get("StopSignal") == "SIGTERM"),
    ("entrypoint nbdfleece serve", config.get("Entrypoint") == ["nbdfleece", "serve"]),
    (f"default command listens on 0.0.0.0:{port}", f"0.0.0.0:{port}" in (config.get("Cmd") or [])),
    ("default command has the QMP socket in /data", "unix:/data/qmp.sock" in (config.get("Cmd") or [])),
    ("health check runs nbdfleece probe", (health.get("Test") or [])[1:3] == ["nbdfleece", "probe"]),
]
for what, good in checks:
    print(("ok   " if good else "FAIL ") + "image: " + what)
EOF
}

# The image's HEALTHCHECK command as JSON, with ARGS added. podman runs it through a systemd
# timer, which this machine has not: the script passes it again with --health-interval
# disable and runs it itself (podman healthcheck run).
health_cmd() {
    python3 - "$WORK/image.json" "$@" <<'EOF'
import json, sys
image = json.load(open(sys.argv[1]))[0]
test = (image.get("Healthcheck") or image["Config"].get("Healthcheck"))["Test"]
assert test[0] == "CMD", test
print(json.dumps(test[1:] + sys.argv[2:]))
EOF
}

# podman run with the image's own command and health check, moved to 127.0.0.1:PORT: with
# --network=host, 0.0.0.0 would open the disk on every interface of this machine.
run_container() {
    local port=$1 cmd=() health
    mapfile -t cmd < <(python3 -c '
import json, sys
for arg in json.load(open(sys.argv[1]))[0]["Config"]["Cmd"]:
    print(arg.replace(f"0.0.0.0:{sys.argv[2]}", f"127.0.0.1:{sys.argv[3]}"))
' "$WORK/image.json" "$UPSTREAM_PORT" "$port")
    health=$(health_cmd "127.0.0.1:$port")
    # --health-interval=disable: no systemd timer here; the script runs the check itself.
    local extra=()
    if [ -n "$AGENT" ]; then
        extra=(-v "$WORK/scratch:$WORK/scratch")
        cmd+=(--qmp "unix:$WORK/scratch/qmp.sock")
    fi
    podman run -d --name "$NAME" --network=host -v "$VOLUME:/data" "${extra[@]}" \
        --health-cmd "$health" --health-interval disable "$IMAGE" "${cmd[@]}" >/dev/null \
        || fail "podman run"
}

wait_healthy() {
    local i
    for i in $(seq 1 120); do
        [ "$(podman inspect --format '{{.State.Status}}' "$NAME")" = running ] \
            || fail "container exited while starting"
        if podman healthcheck run "$NAME" >/dev/null 2>&1; then
            ok "podman healthcheck run: healthy (attempt $i, one every 0.5 s)"
            return
        fi
        sleep 0.5
    done
    fail "not healthy within 60 s"
}

stop_gracefully() {
    podman stop -t 30 "$NAME" >/dev/null || fail "podman stop"
    local rc
    rc=$(podman inspect --format '{{.State.ExitCode}}' "$NAME")
    [ "$rc" = 0 ] || fail "exit code $rc after podman stop (0 expected)"
    podman logs "$NAME" >"$WORK/log" 2>&1
    if ! grep -q "SIGTERM received: stopping gracefully" "$WORK/log" \
            || ! grep -q "INFO nbdfleece: stopped" "$WORK/log"; then
        fail "no graceful-stop lines in the log"
    fi
    ok "podman stop: SIGTERM, graceful stop logged, exit code 0"
}

check() {
    setup_podman
    need_packages qemu-utils:qemu-io libnbd-bin:nbdinfo
    build_image
    local port uri sock mapped
    WORK=$(mktemp -d /tmp/nbdfleece-container.XXXXXX)
    NAME=nbdfleece-check-$$
    VOLUME=nbdfleece-check-$$
    trap cleanup EXIT

    check_metadata >"$WORK/meta" || fail "image metadata: cannot read"
    cat "$WORK/meta"
    ! grep -q '^FAIL' "$WORK/meta" || fail "image metadata"
    CHECKS=$((CHECKS + $(grep -c '^ok' "$WORK/meta")))

    podman volume create "$VOLUME" >/dev/null
    mapped=$(podman volume inspect --format '{{.Mountpoint}}' "$VOLUME")
    ln -s "$mapped" "$WORK/data"  # a short path for the QMP socket (108-byte limit)
    sock=$WORK/data/qmp.sock

    # Run 0 changes nothing: the image's own command (0.0.0.0:10809) and health check, in a
    # network namespace of its own (--network=none: nothing outside can reach it).
    say "run 0: $NAME, the image's own command and health check, --network=none"
    podman run -d --name "$NAME" --network=none -v "$VOLUME:/data" \
        --health-cmd "$(health_cmd)" --health-interval disable "$IMAGE" >/dev/null \
        || fail "podman run"
    wait_healthy
    run_check "the image's own health check output" \
        output_is "nbdfleece probe: 127.0.0.1:10809: NBD server up, exports: 'demo'" last_health_output
    stop_gracefully
    podman rm "$NAME" >/dev/null

    port=$(free_port)
    uri=nbd://127.0.0.1:$port/demo
    AGENT=$(backup_agent)
    if [ -z "$AGENT" ]; then say "skip nbdfleece-backup: not installed (pip install -e . in .venv)"
    elif [ "$(id -u)" != 0 ]; then AGENT=""; say "skip nbdfleece-backup: needs root (setpriv)"
    else
        chmod 0755 "$WORK"
        mkdir "$WORK/scratch" "$WORK/agent"
        chown 10809:10809 "$WORK/scratch" "$WORK/agent"
    fi
    say "run 1: $NAME on 127.0.0.1:$port, volume $VOLUME"
    run_container "$port"
    wait_healthy
    run_check "server runs as uid 10809 inside" output_is 10809 podman exec "$NAME" id -u
    run_check "demo.raw in the new named volume, owned by uid 10809" \
        output_is 10809 stat -c %u "$WORK/data/demo.raw"
    run_check "probe from the host: export demo" host_nbdfleece probe "127.0.0.1:$port" --export demo
    run_check "nbdinfo --size: 1 GiB" output_is 1073741824 nbdinfo --size "$uri"
    run_check "nbdinfo --map: one hole (the image run 0 created)" output_is "0 1073741824 3" map_of "$uri"
    run_check "qemu-io: write 1 MiB of 0xa5, read it back" \
        qemu-io -f raw -c 'write -P 0xa5 0 1M' -c 'read -P 0xa5 0 1M' "$uri"
    run_check "nbdinfo --map: 1 MiB of data, then a hole" \
        output_is "0 1048576 0;1048576 1072693248 3" map_of "$uri"
    run_check "QMP from the host through the volume: snapshot create" \
        host_nbdfleece snapshot --qmp "unix:$sock" create snap --of demo
    run_check "qemu-io: write 64 KiB of 0x5a to demo after the snapshot" \
        qemu-io -f raw -c 'write -P 0x5a 0 64k' "$uri"
    run_check "snapshot export still reads 0xa5 (point in time)" \
        qemu-io -r -f raw -c 'read -P 0xa5 0 1M' "nbd://127.0.0.1:$port/snap"
    run_check "snapshot list shows snap" output_is snap snapshot_names "$sock"
    run_check "snapshot delete" host_nbdfleece snapshot --qmp "unix:$sock" delete snap
    if [ -n "$AGENT" ]; then
        backup_checks full "$port"
    fi
    run_check "nbdfleece-backup inside the container: full backup into /data/backups, verify" \
        podman exec "$NAME" sh -c "nbdfleece-backup full --server nbd://127.0.0.1:$port \
            --qmp /data/qmp.sock --export demo --to /data/backups --quiet \
            && nbdfleece-backup verify --from /data/backups"
    stop_gracefully
    podman rm "$NAME" >/dev/null

    port=$(free_port)
    uri=nbd://127.0.0.1:$port/demo
    say "run 2: a new container on 127.0.0.1:$port, same volume"
    run_container "$port"
    wait_healthy
    run_check "the image was not created again" output_is 0 count_in_log 'created sparse image'
    run_check "data persisted in the volume (0x5a, then 0xa5)" \
        qemu-io -r -f raw -c 'read -P 0x5a 0 64k' -c 'read -P 0xa5 64k 960k' "$uri"
    if [ -n "$AGENT" ]; then
        run_check "qemu-io: write 64 KiB of 0x77 at 2 MiB" qemu-io -f raw -c 'write -P 0x77 2M 64k' "$uri"
        backup_checks incremental "$port"
        run_check "the incremental holds only the new 64 KiB (its bitmap survived the restart)" \
            output_is "65536" last_point_bytes
    fi
    stop_gracefully

    say "tools/container.sh: all $CHECKS checks passed ($IMAGE, $(image_size) MB, podman $(podman version --format '{{.Client.Version}}'), $(podman info --format '{{.Store.GraphDriverName}}') storage)"
}

case "${1:-check}" in
    check) check ;;
    build) setup_podman; build_image ;;
    base) setup_podman; ensure_base >/dev/null ;;
    has-base)
        command -v podman >/dev/null || exit 1
        mkdir -p "$STATE"; write_config "$(storage_driver)"
        if [ -n "${NBDFLEECE_BASE_IMAGE:-}" ]; then podman image exists "$NBDFLEECE_BASE_IMAGE"
        else podman image exists "$(base_tag)"; fi ;;
    env)
        setup_podman >/dev/null
        printf 'export CONTAINERS_CONF=%q CONTAINERS_STORAGE_CONF=%q\n' \
            "$CONTAINERS_CONF" "$CONTAINERS_STORAGE_CONF" ;;
    *) sed -n '2,9p' "$0" >&2; exit 2 ;;
esac
