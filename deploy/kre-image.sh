#!/usr/bin/env bash
# Builds the key release enclave's own image (EIF) and prints its PCRs.
#
# What goes into the image decides the KRE's PCR0/1/2, and so which KRE the control planes
# (`--expect-kre-pcr`) and the custodians (`keygate custodian unseal --expect-kre-pcr`) trust:
# the kernel, its command line, the init, the production `keygate-enclave` binary, the
# genesis policy bundle, the custodians' public keys, M and every other KRE flag. Nothing is
# read at run time from outside the image. The script trusts its inputs; it checks only that
# the binary is the production one (hardware NSM only, never keygate-enclave-dev's mock).
#
# Usage:
#   deploy/kre-image.sh --blobs DIR --genesis genesis.bundle \
#       --custodian c1.pub.pem --custodian c2.pub.pem --custodian c3.pub.pem --threshold 2 \
#       -o OUTDIR [options]
#
#   --blobs DIR             nitro-cli's blob directory (default /usr/share/nitro_enclaves/blobs):
#                           bzImage (Image on aarch64), bzImage.config, cmdline, init, nsm.ko
#   --genesis FILE          the genesis policy bundle (`keygate policy init`)
#   --custodian PEM         a custodian's public key (`keygate keygen`); repeat, in share order
#   --threshold M           how many custodians unseal (--custodian-threshold)
#   -o, --output DIR        where to write kre.eif and kre.pcrs.json (created)
#   --listen ADDR           the release channel (default vsock:5000; parent 5001, custodian 5002)
#   --kre-arg ARG           one more keygate-enclave argument (repeat; e.g. --kre-arg --max-doc-age --kre-arg 30)
#   --enclave-bin PATH      a prebuilt keygate-enclave (default: `cargo build --release` in this repo)
#   --keygate PATH          a prebuilt keygate CLI (default: built with the enclave binary)
#   --arch x86_64|aarch64   (default x86_64)
#   --signing-certificate PEM --private-key PEM   sign the image (adds PCR8)
#   --build-time RFC3339    metadata build time (default SOURCE_DATE_EPOCH, else 1970-01-01)
#
# The image has nitro-cli's layout, for AWS's bootstrap init (the blob `init`):
#   ramdisk 1 (PCR1): init, nsm.ko, dev/
#   ramdisk 2 (PCR2): cmd (keygate-enclave's argv, one per line), env, rootfs/ with
#                     usr/bin/keygate-enclave, etc/keygate/genesis.bundle,
#                     etc/keygate/custodian-N.pub.pem, and the empty mount points
# Both ramdisks are built by `keygate eif build` from directories: sorted, mtime 0, owner 0,
# modes normalised, so the same inputs give the same bytes and PCRs on any machine
# (docs/eif.md "Reproducible images"). Output: OUTDIR/kre.eif, OUTDIR/kre.pcrs.json
# (nitro-cli's {"Measurements": ...} shape), and `PCRn: HEX` lines on standard output.
#
# Exit status: 0 built; 2 bad usage or input; 1 a build step failed.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'
}
die() {
    echo "kre-image: $*" >&2
    exit 2
}

repo="$(cd "$(dirname "$0")/.." && pwd)"
blobs=/usr/share/nitro_enclaves/blobs
genesis=""
custodians=()
threshold=""
out=""
listen="vsock:5000"
extra=()
enclave_bin=""
keygate=""
arch=x86_64
sign=()
build_time=()

while [ $# -gt 0 ]; do
    case "$1" in
    -h | --help) usage; exit 0 ;;
    --blobs) blobs=${2:?--blobs needs a value}; shift 2 ;;
    --genesis) genesis=${2:?--genesis needs a value}; shift 2 ;;
    --custodian) custodians+=("${2:?--custodian needs a value}"); shift 2 ;;
    --threshold) threshold=${2:?--threshold needs a value}; shift 2 ;;
    -o | --output) out=${2:?--output needs a value}; shift 2 ;;
    --listen) listen=${2:?--listen needs a value}; shift 2 ;;
    --kre-arg) extra+=("${2:?--kre-arg needs a value}"); shift 2 ;;
    --enclave-bin) enclave_bin=${2:?--enclave-bin needs a value}; shift 2 ;;
    --keygate) keygate=${2:?--keygate needs a value}; shift 2 ;;
    --arch) arch=${2:?--arch needs a value}; shift 2 ;;
    --signing-certificate | --private-key) sign+=("$1" "${2:?$1 needs a value}"); shift 2 ;;
    --build-time) build_time=(--build-time "${2:?--build-time needs a value}"); shift 2 ;;
    *) die "unknown argument $1 (--help lists them)" ;;
    esac
done

[ -n "$genesis" ] || die "--genesis is required"
[ -f "$genesis" ] || die "genesis bundle $genesis not found"
[ ${#custodians[@]} -gt 0 ] || die "at least one --custodian is required"
[ -n "$threshold" ] || die "--threshold is required"
case "$threshold" in '' | *[!0-9]*) die "--threshold must be a number" ;; esac
[ "$threshold" -ge 1 ] && [ "$threshold" -le ${#custodians[@]} ] ||
    die "--threshold must be between 1 and the number of custodians (${#custodians[@]})"
[ -n "$out" ] || die "-o OUTDIR is required"
case "$arch" in
x86_64) kernel_name=bzImage ;;
aarch64) kernel_name=Image ;;
*) die "--arch must be x86_64 or aarch64" ;;
esac
for f in "$kernel_name" "$kernel_name.config" cmdline init nsm.ko; do
    [ -f "$blobs/$f" ] || die "$blobs/$f not found (--blobs: nitro-cli's blob directory)"
done
for c in "${custodians[@]}"; do
    [ -f "$c" ] || die "custodian key $c not found"
done

# The production binaries: a release build with the source paths remapped, so the binary
# does not depend on where the repository was checked out.
if [ -z "$enclave_bin" ] || [ -z "$keygate" ]; then
    echo "kre-image: cargo build --release --locked (keygate-enclave, keygate)" >&2
    (
        cd "$repo"
        RUSTFLAGS="${RUSTFLAGS:-} --remap-path-prefix=$repo=/keygate --remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/cargo" \
            cargo build --release --locked -p keygate-enclave --bin keygate-enclave -p keygate-parent --bin keygate >&2
    ) || { echo "kre-image: cargo build failed" >&2; exit 1; }
    release="${CARGO_TARGET_DIR:-$repo/target}/release"
    [ -n "$enclave_bin" ] || enclave_bin="$release/keygate-enclave"
    [ -n "$keygate" ] || keygate="$release/keygate"
fi
[ -x "$enclave_bin" ] || die "$enclave_bin is not an executable"
[ -x "$keygate" ] || die "$keygate is not an executable"

# Only the production binary goes into an enclave image: its NSM backends are the hardware
# one alone (keygate-enclave-dev, with the mock NSM, says so in its --version).
version="$("$enclave_bin" --version)" || die "$enclave_bin --version failed"
case "$version" in
"keygate-enclave "*"(NSM backends: hardware)") ;;
*) die "$enclave_bin is not the production keygate-enclave (its --version: $version)" ;;
esac
kre_version="${version#keygate-enclave }"
kre_version="${kre_version%% *}"

stage="$(mktemp -d "${TMPDIR:-/tmp}/kre-image.XXXXXX")"
trap 'rm -rf "$stage"' EXIT

# Ramdisk 1: the bootstrap (AWS's init, which loads nsm.ko, mounts /dev /proc /sys into
# /rootfs, chroots there and runs /cmd with /env).
mkdir -p "$stage/boot/dev"
install -m 0755 "$blobs/init" "$stage/boot/init"
install -m 0644 "$blobs/nsm.ko" "$stage/boot/nsm.ko"

# Ramdisk 2: the KRE and its configuration. Paths inside the enclave are fixed, so the
# command line (and the PCRs) do not depend on where the inputs were on the build machine.
app="$stage/app"
mkdir -p "$app/rootfs/usr/bin" "$app/rootfs/etc/keygate"
for d in dev proc sys run tmp var; do mkdir -p "$app/rootfs/$d"; done
install -m 0755 "$enclave_bin" "$app/rootfs/usr/bin/keygate-enclave"
install -m 0644 "$genesis" "$app/rootfs/etc/keygate/genesis.bundle"
argv=(/usr/bin/keygate-enclave --listen "$listen" --genesis /etc/keygate/genesis.bundle)
i=0
for c in "${custodians[@]}"; do
    i=$((i + 1))
    install -m 0644 "$c" "$app/rootfs/etc/keygate/custodian-$i.pub.pem"
    argv+=(--custodian "/etc/keygate/custodian-$i.pub.pem")
done
argv+=(--custodian-threshold "$threshold" --log-json)
argv+=("${extra[@]+"${extra[@]}"}")
for a in "${argv[@]}"; do
    case "$a" in *$'\n'*) die "a KRE argument contains a newline: $a" ;; esac
done
printf '%s\n' "${argv[@]}" >"$app/cmd"
printf '%s\n' "PATH=/usr/bin:/bin" "KEYGATE_LOG=info" >"$app/env"

mkdir -p "$out"
cmdline="$(cat "$blobs/cmdline")"
"$keygate" eif build \
    --kernel "$blobs/$kernel_name" --kernel-config "$blobs/$kernel_name.config" \
    --cmdline "$cmdline" --arch "$arch" \
    --ramdisk "$stage/boot" --ramdisk "$app" \
    --image-name keygate-kre --image-version "$kre_version" \
    "${build_time[@]+"${build_time[@]}"}" "${sign[@]+"${sign[@]}"}" \
    -o "$out/kre.eif" >/dev/null ||
    { echo "kre-image: keygate eif build failed" >&2; exit 1; }

# The PCRs as the deployment will check them: measured again from the written file.
describe="$("$keygate" eif describe "$out/kre.eif")" ||
    { echo "kre-image: keygate eif describe failed" >&2; exit 1; }
pcrs="$(printf '%s\n' "$describe" | grep -E '^PCR[0-9]+: [0-9a-f]{96}$')" ||
    { echo "kre-image: no PCRs in keygate eif describe's output" >&2; exit 1; }
# kre.pcrs.json: nitro-cli's Measurements shape, nothing that depends on the output path.
{
    printf '{"Measurements": {"HashAlgorithm": "Sha384 { ... }"'
    printf '%s\n' "$pcrs" | while read -r name value; do printf ', "%s": "%s"' "${name%:}" "$value"; done
    printf '}}\n'
} >"$out/kre.pcrs.json"
echo "KRE image: $out/kre.eif"
printf '%s\n' "$pcrs"
echo "Control planes and custodians: --expect-kre-pcr N=HEX for each PCR above (also in kre.pcrs.json)."
