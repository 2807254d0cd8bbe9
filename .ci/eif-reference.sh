#!/usr/bin/env bash
# Cross-check keygate's EIF builder and reader against AWS's reference, `eif_build`
# (crates.io; the same library nitro-cli builds with).
#
# For each case the same inputs are built by eif_build and by `keygate eif build`;
# the script then checks that
#   - PCR0/1/2 (and PCR8 for signed images) printed by both tools are equal,
#   - `keygate eif describe --json` on eif_build's file gives the same values,
#   - unsigned images are byte-identical (same metadata passed to both tools),
#   - `keygate eif verify` accepts eif_build's signed images, and
#   - `keygate eif pcr8` gives eif_build's PCR8, and
#   - AWS's own reader (EifReader, PcrSignatureChecker from the image-format crate)
#     accepts keygate's images: same PCRs, CRC ok, signature verified.
#
# eif_build is installed once into $EIF_REF_ROOT (cached; the install takes minutes).
# Exit status is non-zero on any mismatch. Usage: .ci/eif-reference.sh
#
# Environment:
#   EIF_REF_ROOT       install root for eif_build (default ~/.cache/keygate/eif-ref)
#   EIF_BUILD_VERSION  eif_build version to install (default 0.2.1)
#   KEYGATE_BIN        keygate binary to test (default: built with cargo)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
EIF_REF_ROOT=${EIF_REF_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/keygate/eif-ref}
EIF_BUILD_VERSION=${EIF_BUILD_VERSION:-0.2.1}
eif_build="$EIF_REF_ROOT/bin/eif_build"

log() { printf '%s\n' "$*" >&2; }

# --- the reference tool ------------------------------------------------------
if [[ -x "$eif_build" ]]; then
    log "eif-reference: using cached $eif_build"
else
    log "eif-reference: installing eif_build $EIF_BUILD_VERSION into $EIF_REF_ROOT (takes minutes)"
    nice -n 10 cargo install eif_build --locked --version "$EIF_BUILD_VERSION" \
        --root "$EIF_REF_ROOT" >&2
fi

# A small reader built on AWS's own library (aws-nitro-enclaves-image-format, the
# code behind `nitro-cli describe-eif` and run-enclave's signature check), so that
# keygate's images are also read, measured and verified by the reference.
ref_describe="$EIF_REF_ROOT/bin/eif_ref_describe"
if [[ ! -x "$ref_describe" ]]; then
    log "eif-reference: building eif_ref_describe (AWS EifReader + PcrSignatureChecker)"
    src="$EIF_REF_ROOT/eif-ref-describe"
    mkdir -p "$src/src" "$EIF_REF_ROOT/bin"
    cat > "$src/Cargo.toml" << 'TOML'
[package]
name = "eif_ref_describe"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
aws-nitro-enclaves-image-format = "=0.3.0"
sha2 = "0.9.5"
serde_json = "1"

[workspace]
TOML
    cat > "$src/src/main.rs" << 'RUST'
//! Read an EIF with AWS's reader: PCRs, CRC check and (signed) signature checks, as JSON.
use aws_nitro_enclaves_image_format::utils::eif_reader::EifReader;
use aws_nitro_enclaves_image_format::utils::{get_pcrs, PcrSignatureChecker};
use serde_json::json;
use sha2::{Digest, Sha384};

fn main() {
    let path = std::env::args().nth(1).expect("usage: eif_ref_describe FILE.eif");
    let mut r = EifReader::from_eif(path.clone()).expect("EifReader::from_eif");
    let signed = r.signature_section.is_some();
    let m = get_pcrs(
        &mut r.image_hasher,
        &mut r.bootstrap_hasher,
        &mut r.app_hasher,
        &mut r.cert_hasher,
        Sha384::new(),
        signed,
    )
    .expect("get_pcrs");
    let mut out = json!({ "Measurements": m.clone(), "CheckCRC": r.check_crc() });
    if signed {
        let info_ok = r.get_certificate_info(m).is_ok();
        out["SignatureCheck"] = json!(info_ok && r.sign_check == Some(true));
        let verified = PcrSignatureChecker::from_eif(&path).and_then(|mut c| c.verify());
        out["Verify"] = json!(verified.is_ok());
    }
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));
}
RUST
    (cd "$src" && nice -n 10 cargo build -q --release --target-dir "$EIF_REF_ROOT/target" >&2)
    cp "$EIF_REF_ROOT/target/release/eif_ref_describe" "$ref_describe"
fi

# --- keygate -----------------------------------------------------------------
if [[ -n "${KEYGATE_BIN:-}" ]]; then
    keygate=$KEYGATE_BIN
else
    (cd "$repo" && nice -n 10 cargo build -q -p keygate-parent >&2)
    keygate="${CARGO_TARGET_DIR:-$repo/target}/debug/keygate"
fi
[[ -x "$keygate" ]] || { log "eif-reference: no keygate binary at $keygate"; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

passed=0
failed=0
pass() { passed=$((passed + 1)); log "  ok   $1"; }
fail() { failed=$((failed + 1)); log "  FAIL $1"; }
check_eq() { # name expected actual
    if [[ -n "$2" && "$2" == "$3" ]]; then pass "$1"; else fail "$1: expected '$2', got '$3'"; fi
}
# The value of "PCRn" in pretty-printed JSON (both tools print one key per line).
pcr() { sed -n "s/.*\"$1\": *\"\([0-9a-f]*\)\".*/\1/p" "$2" | head -n 1; }

# --- inputs ------------------------------------------------------------------
time_fixed=2024-01-01T00:00:00+00:00
printf '#\n# Automatically generated file; DO NOT EDIT.\n# Linux/x86_64 6.1.0-keygate Kernel Configuration\n#\n' > kernel.config
printf 'fake kernel image\n' > bzImage
head -c 3000000 /dev/urandom > bigImage # larger than the readers' chunk size
printf 'first ramdisk' > r1.cpio.gz
printf 'second ramdisk' > r2.cpio.gz
head -c 200000 /dev/urandom > r3.cpio.gz
mkdir -p rootfs/usr/bin
printf '#!/bin/sh\nexec /usr/bin/app\n' > rootfs/init
chmod 755 rootfs/init
printf 'app' > rootfs/usr/bin/app

if command -v openssl > /dev/null 2>&1; then
    openssl ecparam -name secp384r1 -genkey -noout -out sec1-key.pem 2> /dev/null
    openssl req -new -x509 -key sec1-key.pem -out sec1-cert.pem -days 30 \
        -subj "/CN=keygate-eif-reference" -sha384 2> /dev/null
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out pk8-key.pem 2> /dev/null
    openssl req -new -x509 -key pk8-key.pem -out pk8-cert.pem -days 30 \
        -subj "/CN=keygate-eif-reference-pkcs8" -sha384 2> /dev/null
    log "eif-reference: signing keys generated with openssl"
else
    # Fixed test-only keys (valid until 2126) from the repository.
    cp "$repo/eif/testdata/signing-key.pem" sec1-key.pem
    cp "$repo/eif/testdata/signing-cert.pem" sec1-cert.pem
    cp sec1-key.pem pk8-key.pem
    cp sec1-cert.pem pk8-cert.pem
    log "eif-reference: openssl not found, using eif/testdata fixtures"
fi

# --- one case ------------------------------------------------------------------
# run_case NAME KERNEL "RAMDISK..." [SIGN_PREFIX] [ARCH]
run_case() {
    local name=$1 kernel=$2 ramdisks=$3 sign=${4:-} arch=${5:-x86_64}
    local ref_args=() kg_args=() r
    log "case $name"
    for r in $ramdisks; do
        ref_args+=(--ramdisk "$r")
        kg_args+=(--ramdisk "$r")
    done
    if [[ -n "$sign" ]]; then
        ref_args+=(--signing-certificate "$sign-cert.pem" --private-key "$sign-key.pem")
        kg_args+=(--signing-certificate "$sign-cert.pem" --private-key "$sign-key.pem")
    fi
    # Same metadata on both sides, so unsigned images must be byte-identical.
    "$eif_build" --kernel "$kernel" --kernel_config kernel.config \
        --cmdline "console=ttyS0 reboot=k panic=30" --arch "$arch" \
        --build-time "$time_fixed" --build-tool keygate --build-tool-version ref \
        --output "$name.ref.eif" "${ref_args[@]}" > "$name.ref.out"
    sed -n '/^{/,$p' "$name.ref.out" > "$name.ref.json"
    "$keygate" eif build --kernel "$kernel" --kernel-config kernel.config \
        --cmdline "console=ttyS0 reboot=k panic=30" --arch "$arch" \
        --build-time "$time_fixed" --build-tool-version ref \
        -o "$name.kg.eif" --json "${kg_args[@]}" > "$name.kg.json"
    "$keygate" eif describe --json "$name.ref.eif" > "$name.describe.json"

    "$ref_describe" "$name.kg.eif" > "$name.refread.json"

    local p
    local pcrs=(PCR0 PCR1 PCR2)
    [[ -n "$sign" ]] && pcrs+=(PCR8)
    for p in "${pcrs[@]}"; do
        check_eq "$name: $p keygate build = eif_build" \
            "$(pcr "$p" "$name.ref.json")" "$(pcr "$p" "$name.kg.json")"
        check_eq "$name: $p keygate describe(eif_build image) = eif_build" \
            "$(pcr "$p" "$name.ref.json")" "$(pcr "$p" "$name.describe.json")"
        check_eq "$name: $p AWS reader(keygate image) = eif_build" \
            "$(pcr "$p" "$name.ref.json")" "$(pcr "$p" "$name.refread.json")"
    done
    if grep -q '"CheckCRC": true' "$name.refread.json"; then
        pass "$name: AWS reader accepts keygate's CRC"
    else
        fail "$name: AWS reader rejects keygate's CRC"
    fi
    if [[ -z "$sign" ]]; then
        if [[ -n "$(pcr PCR8 "$name.describe.json")" ]]; then
            fail "$name: describe reports PCR8 for an unsigned image"
        else
            pass "$name: no PCR8 for an unsigned image"
        fi
        if cmp -s "$name.ref.eif" "$name.kg.eif"; then
            pass "$name: byte-identical to eif_build"
        else
            fail "$name: bytes differ from eif_build"
        fi
    else
        if "$keygate" eif verify "$name.ref.eif" > /dev/null; then
            pass "$name: keygate verifies eif_build's signature"
        else
            fail "$name: keygate rejects eif_build's signature"
        fi
        if "$keygate" eif verify "$name.kg.eif" > /dev/null; then
            pass "$name: keygate verifies its own signature"
        else
            fail "$name: keygate rejects its own signature"
        fi
        if grep -q '"SignatureCheck": true' "$name.refread.json" \
            && grep -q '"Verify": true' "$name.refread.json"; then
            pass "$name: AWS reader verifies keygate's signature"
        else
            fail "$name: AWS reader rejects keygate's signature"
        fi
        "$keygate" eif pcr8 --signing-certificate "$sign-cert.pem" > "$name.pcr8.json"
        check_eq "$name: keygate eif pcr8 = eif_build PCR8" \
            "$(pcr PCR8 "$name.ref.json")" "$(pcr PCR8 "$name.pcr8.json")"
    fi
}

# The ramdisk keygate builds from a directory, extracted from its image so that
# eif_build can be given the very same bytes.
extract_section() { # EIF INDEX OUT
    local eif=$1 i=$2 out=$3 off size
    be64() { od -An -tu1 -j "$2" -N 8 "$1" | awk '{v=0; for(i=1;i<=NF;i++) v=v*256+$i; printf "%d", v}'; }
    off=$(be64 "$eif" $((28 + 8 * i)))
    size=$(be64 "$eif" $((284 + 8 * i)))
    tail -c +$((off + 12 + 1)) "$eif" | head -c "$size" > "$out"
}

run_case unsigned-1-ramdisk bzImage "r1.cpio.gz"
run_case unsigned-2-ramdisks bzImage "r1.cpio.gz r2.cpio.gz"
run_case unsigned-3-ramdisks-large bigImage "r1.cpio.gz r2.cpio.gz r3.cpio.gz"
run_case unsigned-aarch64 bzImage "r1.cpio.gz r2.cpio.gz" "" aarch64
run_case signed-sec1-key bzImage "r1.cpio.gz r2.cpio.gz" sec1
run_case signed-pkcs8-key bigImage "r1.cpio.gz r3.cpio.gz" pk8

# A ramdisk built by keygate from a directory, then given to both tools as a file.
"$keygate" eif build --kernel bzImage --kernel-config kernel.config --cmdline x \
    --ramdisk rootfs -o dir.kg.eif > /dev/null
extract_section dir.kg.eif 3 rootfs.cpio.gz
if gzip -t rootfs.cpio.gz 2> /dev/null; then pass "directory ramdisk is valid gzip"; else fail "directory ramdisk is not valid gzip"; fi
run_case dir-ramdisk bzImage "rootfs.cpio.gz r2.cpio.gz" sec1

# Reproducibility through the CLI: same tree, other mtimes and modes, SOURCE_DATE_EPOCH.
cp -r rootfs rootfs2
touch -d '2001-02-03 04:05:06' rootfs2/init rootfs2/usr/bin/app
chmod 700 rootfs2/init
SOURCE_DATE_EPOCH=1700000000 "$keygate" eif build --kernel bzImage --kernel-config kernel.config \
    --cmdline x --ramdisk rootfs -o repro1.eif > /dev/null
SOURCE_DATE_EPOCH=1700000000 "$keygate" eif build --kernel bzImage --kernel-config kernel.config \
    --cmdline x --ramdisk rootfs2 -o repro2.eif > /dev/null
if cmp -s repro1.eif repro2.eif; then pass "reproducible: same tree, other mtimes -> same bytes"; else fail "reproducible: bytes differ"; fi

total=$((passed + failed))
echo "eif-reference: $passed passed, $failed failed ($total checks, eif_build $("$eif_build" --version 2> /dev/null | head -n 1 || echo "$EIF_BUILD_VERSION"))"
[[ $failed -eq 0 ]]
