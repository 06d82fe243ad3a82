#!/usr/bin/env bash
# Installs the real servers the integration tests start on loopback, without touching the
# system beyond `qemu-utils`: everything else goes into one cache directory.
#
#   scripts/test-env.sh            install (or check) every component
#   scripts/test-env.sh swift      only the named components
#   scripts/test-env.sh --list     show the components and where they go
#
# Cache directory: $FLUIDCLOUD_TEST_ENV, default ~/.cache/fluidcloud-test-env. Running it
# again skips what is there, so it is cheap to call before every test run. When it is done
# it writes CACHE/env, `NAME=value` lines (also valid shell) that tests/it/common/servers.rs reads
# to find the binaries; variables of the same name in the environment take precedence.
#
# Adding a component: write `ensure_<name>` (install if missing, then call `env_set` for
# what the tests need and `did "<what happened>"`), and append <name> to COMPONENTS.
set -euo pipefail

CACHE="${FLUIDCLOUD_TEST_ENV:-$HOME/.cache/fluidcloud-test-env}"
ENV_FILE="$CACHE/env"
LOG_DIR="$CACHE/logs"

# Versions checked on this kind of machine; newer s3s-fs releases need a newer rustc.
S3S_FS_VERSION=0.14.1
SWIFT_VERSION=2.38.3

COMPONENTS=(qemu_utils iproute2 s3s_fs swift memcached qemu_system guest prometheus)

declare -A ENV_VALUES=()
ENV_ORDER=()
SUMMARY=()

env_set() {
    if [ -z "${ENV_VALUES[$1]+set}" ]; then
        ENV_ORDER+=("$1")
    fi
    ENV_VALUES[$1]="$2"
}

did() {
    SUMMARY+=("$1")
    echo "   $1"
}

die() {
    echo "test-env: $*" >&2
    exit 1
}

as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "\`$*\` needs root and sudo is not installed; run it as root once"
    fi
}

# Runs a long command with its output in a log file, so a failure shows where to look.
logged() {
    local name=$1
    shift
    local log="$LOG_DIR/$name.log"
    if ! "$@" >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        die "$name failed; the full output is in $log"
    fi
}

ensure_qemu_utils() {
    if command -v qemu-img >/dev/null; then
        did "qemu-utils: present ($(qemu-img --version | head -n 1))"
    else
        as_root apt-get update -qq
        as_root apt-get install -y -qq qemu-utils
        did "qemu-utils: installed with apt-get"
    fi
    env_set FLUIDCLOUD_QEMU_IMG "$(command -v qemu-img)"
}

# The cross-host tests stand their hosts in network namespaces (`ip netns`, veth, a bridge)
# and shape links with `tc`; both come with iproute2.
ensure_iproute2() {
    if command -v ip >/dev/null && command -v tc >/dev/null; then
        did "iproute2: present ($(ip -V))"
    else
        as_root apt-get update -qq
        as_root apt-get install -y -qq iproute2
        did "iproute2: installed with apt-get"
    fi
}

ensure_s3s_fs() {
    local bin="$CACHE/bin/s3s-fs"
    if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "$S3S_FS_VERSION"; then
        did "s3s-fs $S3S_FS_VERSION: present"
    else
        command -v cargo >/dev/null || die "cargo is needed to build s3s-fs"
        echo "   building s3s-fs $S3S_FS_VERSION (a few minutes on two cores)"
        logged s3s-fs-install cargo install --locked "s3s-fs@$S3S_FS_VERSION" \
            --features binary --root "$CACHE" --force
        did "s3s-fs $S3S_FS_VERSION: built into $CACHE/bin"
    fi
    env_set FLUIDCLOUD_S3S_FS "$bin"
}

ensure_swift() {
    local venv="$CACHE/swift-venv"
    if [ -x "$venv/bin/swift-proxy-server" ] \
        && "$venv/bin/python" -c "import swift; assert swift.__version__ == '$SWIFT_VERSION'" 2>/dev/null; then
        did "OpenStack Swift $SWIFT_VERSION: present"
    else
        command -v python3 >/dev/null || die "python3 is needed for OpenStack Swift"
        rm -rf "$venv"
        logged swift-venv python3 -m venv "$venv"
        logged swift-install "$venv/bin/pip" install --quiet "swift==$SWIFT_VERSION"
        did "OpenStack Swift $SWIFT_VERSION: installed into $venv"
    fi
    env_set FLUIDCLOUD_SWIFT_BIN "$venv/bin"
}

ensure_memcached() {
    # Swift's tempauth keeps its tokens in memcached. The Debian package is unpacked rather
    # than installed, so no daemon is started and nothing system-wide changes.
    local root="$CACHE/memcached"
    local bin="$root/usr/bin/memcached"
    local libs="$root/usr/lib/x86_64-linux-gnu"
    if runs_unpacked "$libs" "$bin" -V; then
        did "memcached: present ($(LD_LIBRARY_PATH="$libs" "$bin" -V))"
    else
        rm -rf "$root"
        unpack_with_deps "$root" memcached memcached
        must_run_unpacked "$libs" "$bin" -V
        did "memcached: unpacked from Debian's packages into $root"
    fi
    env_set FLUIDCLOUD_MEMCACHED "$bin"
    env_set FLUIDCLOUD_MEMCACHED_LIBS "$libs"
}

# Runs an apt command like `logged`, but when it fails refreshes the package lists once and
# tries again: an old list names versions the mirror no longer has, a fresh machine's none.
logged_apt() {
    local name=$1
    shift
    if ! "$@" >"$LOG_DIR/$name.log" 2>&1; then
        logged "$name-apt-update" as_root apt-get update -qq
        logged "$name" "$@"
    fi
}

# Fetches Debian packages into the cache and unpacks them under $1 (never `apt-get install`:
# that would replace the newer qemu-utils the system has).
unpack_debs() {
    local root=$1 name=$2
    shift 2
    local debs="$CACHE/debs"
    mkdir -p "$debs" "$root"
    (cd "$debs" && logged_apt "$name-download" apt-get download "$@")
    local pkg deb
    for pkg in "$@"; do
        # The newest downloaded file of the package (older versions may linger in debs/).
        deb=$(ls -1 "$debs/${pkg}"_*.deb 2>/dev/null | sort -V | tail -n 1)
        [ -n "$deb" ] || die "apt-get download $pkg left no .deb in $debs"
        dpkg -x "$deb" "$root"
    done
}

# The packages `apt-get install --no-install-recommends $2...` would add on this machine, one
# a line: the packages themselves and whatever of their dependencies, down to the last
# library, the system lacks. Only simulated, which needs no root and changes nothing.
missing_debs() {
    local name=$1
    shift
    logged_apt "$name-simulate" apt-get install --simulate --no-install-recommends "$@"
    awk '$1 == "Inst" {print $2}' "$LOG_DIR/$name-simulate.log"
}

# Unpacks under $1 the packages $3... and everything `missing_debs` says this machine lacks
# for them (the packages themselves always, as the unpacked copy looks for its files beside
# itself even when the system has them). Some packages put their libraries in /lib, which
# is /usr/lib on the merged-/usr systems they are built for: the same is done under $1, so
# that ROOT/usr/lib/x86_64-linux-gnu holds every unpacked library.
unpack_with_deps() {
    local root=$1 name=$2
    shift 2
    local extra pkgs dir
    extra=$(missing_debs "$name" "$@")
    mapfile -t pkgs < <(printf '%s\n' "$@" "$extra" | awk 'NF && !seen[$0]++')
    echo "   unpacking ${#pkgs[@]} Debian package(s): ${pkgs[*]}"
    unpack_debs "$root" "$name" "${pkgs[@]}"
    for dir in bin sbin lib lib64; do
        if [ -d "$root/$dir" ] && [ ! -L "$root/$dir" ]; then
            mkdir -p "$root/usr/$dir"
            cp -a "$root/$dir/." "$root/usr/$dir/"
            rm -rf "${root:?}/$dir"
            ln -s "usr/$dir" "$root/$dir"
        fi
    done
}

# The libraries the files $2... need that are not found with LD_LIBRARY_PATH=$1, one a line
# (and any file `ldd` cannot read); nothing when everything they link against is there.
missing_libs() {
    local libs=$1 file out
    shift
    for file in "$@"; do
        if out=$(LD_LIBRARY_PATH="$libs" ldd "$file" 2>&1); then
            awk '/=> not found/ {print $1}' <<<"$out"
        else
            echo "$file"
        fi
    done | sort -u
}

# Whether the unpacked program $2 counts as present: with LD_LIBRARY_PATH=$1 it and the
# files $4... (its plugins) find every library they link against, and `$2 $3` runs.
runs_unpacked() {
    local libs=$1 bin=$2 arg=$3
    shift 3
    [ -x "$bin" ] && [ -z "$(missing_libs "$libs" "$bin" "$@")" ] \
        && LD_LIBRARY_PATH="$libs" "$bin" "$arg" >/dev/null 2>&1
}

# Dies unless `runs_unpacked` holds right after unpacking, naming what is still missing.
must_run_unpacked() {
    local libs=$1 bin=$2 arg=$3
    shift 3
    [ -x "$bin" ] || die "unpacking left no $bin"
    local missing
    missing=$(missing_libs "$libs" "$bin" "$@")
    [ -z "$missing" ] || die "with LD_LIBRARY_PATH=$libs, ${bin##*/} or its plugins still" \
        "lack: ${missing//$'\n'/ } (no unpacked package provides them; see ldd)"
    LD_LIBRARY_PATH="$libs" "$bin" "$arg" >/dev/null 2>&1 \
        || die "the unpacked ${bin##*/} does not start: LD_LIBRARY_PATH=$libs $bin $arg"
}

# The emulator, its modules (TCG is one), its data files and the firmware below: unpacked
# even when the system has them, as the unpacked emulator looks for modules and data beside
# itself and FLUIDCLOUD_QEMU_FIRMWARE points into the cache. The libraries they need are
# whatever `missing_debs` finds this machine lacks.
QEMU_SYSTEM_DEBS=(qemu-system-x86 qemu-system-common qemu-system-data seabios ipxe-qemu)

ensure_qemu_system() {
    local root="$CACHE/qemu-system"
    local bin="$root/usr/bin/qemu-system-x86_64"
    local libs="$root/usr/lib/x86_64-linux-gnu"
    # Loaded at run time from beside the binary; `ldd` on the binary alone misses them.
    local modules=("$libs"/qemu/*.so)
    if runs_unpacked "$libs" "$bin" --version "${modules[@]}"; then
        did "qemu-system-x86_64: present ($(LD_LIBRARY_PATH="$libs" "$bin" --version | head -n 1))"
    else
        rm -rf "$root"
        unpack_with_deps "$root" qemu-system "${QEMU_SYSTEM_DEBS[@]}"
        modules=("$libs"/qemu/*.so)
        must_run_unpacked "$libs" "$bin" --version "${modules[@]}"
        did "qemu-system-x86_64: unpacked from Debian's packages into $root"
    fi
    env_set FLUIDCLOUD_QEMU_SYSTEM "$bin"
    env_set FLUIDCLOUD_QEMU_LIBS "$libs"
    # Firmware: SeaBIOS, the option ROMs qemu ships, iPXE ROMs of the emulated NICs.
    env_set FLUIDCLOUD_QEMU_FIRMWARE "$root/usr/share/seabios:$root/usr/share/qemu:$root/usr/lib/ipxe/qemu"
}

# The test guest: Debian's kernel (its virtio, AHCI, SCSI and NIC drivers are modules the
# tests put into an initramfs) and a static busybox for the guest's /init.
ensure_guest() {
    local root="$CACHE/guest"
    local kernel modules busybox="$root/bin/busybox"
    kernel=$(ls -1 "$root"/boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$kernel" ] && [ -x "$busybox" ] && [ -f "$root/lib/modules/${kernel##*/vmlinuz-}/modules.dep" ]; then
        did "guest: present (kernel ${kernel##*/vmlinuz-}, $("$busybox" | head -n 1 | cut -d' ' -f1-2))"
    else
        local image
        image=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' \
            | awk '{print $1}' | sort -V | tail -n 1)
        [ -n "$image" ] || die "apt-cache knows no linux-image-6.1.0-*-amd64 package; run apt-get update"
        rm -rf "$root"
        unpack_debs "$root" guest busybox-static "$image"
        kernel=$(ls -1 "$root"/boot/vmlinuz-* | sort -V | tail -n 1)
        [ -x "$busybox" ] || die "busybox-static left no $busybox"
        # Debian's vmlinuz is readable by root only; the tests may run as anyone.
        chmod a+r "$kernel"
        # The package leaves modules.dep to depmod in its postinst, which unpacking skips;
        # busybox's depmod writes it without needing kmod on the host.
        logged guest-depmod "$busybox" depmod -b "$root" "${kernel##*/vmlinuz-}"
        did "guest: unpacked $image and busybox-static into $root"
    fi
    modules="$root/lib/modules/${kernel##*/vmlinuz-}"
    env_set FLUIDCLOUD_GUEST_KERNEL "$kernel"
    env_set FLUIDCLOUD_GUEST_MODULES "$modules"
    env_set FLUIDCLOUD_GUEST_BUSYBOX "$busybox"
}

# Prometheus and promtool, which the dashboard and alert-rule tests run: Debian's package alone,
# unpacked. Its dependencies are the scripts and fonts of the web UI, which the tests do not
# use; the two Go binaries link against nothing but libc.
ensure_prometheus() {
    local root="$CACHE/prometheus"
    local bin="$root/usr/bin/prometheus" promtool="$root/usr/bin/promtool"
    local libs="$root/usr/lib/x86_64-linux-gnu"
    if runs_unpacked "$libs" "$bin" --version "$promtool"; then
        did "prometheus: present ($("$bin" --version 2>&1 | head -n 1))"
    else
        rm -rf "$root"
        unpack_debs "$root" prometheus prometheus
        must_run_unpacked "$libs" "$bin" --version "$promtool"
        must_run_unpacked "$libs" "$promtool" --version
        did "prometheus: unpacked Debian's package into $root"
    fi
    env_set FLUIDCLOUD_PROMETHEUS "$bin"
    env_set FLUIDCLOUD_PROMTOOL "$promtool"
}

write_env() {
    local tmp="$ENV_FILE.tmp.$$"
    {
        echo "# Written by scripts/test-env.sh; read by tests/it/common/servers.rs."
        # Components not asked for this time keep their earlier lines.
        if [ -f "$ENV_FILE" ]; then
            local line name
            while IFS= read -r line; do
                name=${line%%=*}
                case "$line" in
                    '#'* | '') continue ;;
                esac
                [ -n "${ENV_VALUES[$name]+set}" ] || echo "$line"
            done <"$ENV_FILE"
        fi
        local key
        for key in "${ENV_ORDER[@]}"; do
            echo "$key=${ENV_VALUES[$key]}"
        done
    } >"$tmp"
    mv "$tmp" "$ENV_FILE"
}

main() {
    local wanted=()
    for arg in "$@"; do
        case "$arg" in
            --list)
                echo "cache: $CACHE"
                printf '  %s\n' "${COMPONENTS[@]}"
                exit 0
                ;;
            -h | --help)
                sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
                exit 0
                ;;
            *)
                local known=0 c
                for c in "${COMPONENTS[@]}"; do
                    [ "$c" = "${arg//-/_}" ] && known=1
                done
                [ "$known" = 1 ] || die "unknown component \`$arg\`; known: ${COMPONENTS[*]}"
                wanted+=("${arg//-/_}")
                ;;
        esac
    done
    [ "${#wanted[@]}" -gt 0 ] || wanted=("${COMPONENTS[@]}")

    mkdir -p "$CACHE" "$LOG_DIR"
    echo "== test environment in $CACHE"
    local c
    for c in "${wanted[@]}"; do
        "ensure_$c"
    done
    write_env
    echo "== wrote $ENV_FILE (${#SUMMARY[@]} component(s) checked)"
}

main "$@"
