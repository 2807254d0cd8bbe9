#!/usr/bin/env python3
"""An independent Kubernetes KMS v2 client (grpcio) for `keygate kms-plugin`.

It generates its stubs at run time from the plugin's api.proto with grpcio-tools (nothing
generated is checked in), connects to the plugin's Unix socket as kube-apiserver does, and
checks Status, Encrypt/Decrypt round trips, refusals (tampered ciphertext, unknown and
malformed key ids, bad sizes), concurrency, and - given a ciphertext another client sealed -
that it decrypts here too.

Output: one line per check ("ok   ..." or "FAIL ..."), then one JSON line:
{"passed": N, "failed": M, "sample": {"key_id", "ciphertext", "plaintext"}} (hex), where the
sample is a ciphertext this client sealed, for the other client to open. Exit code 0 only if
every check passed.

Needs: python3 -m pip install grpcio grpcio-tools (see .ci/python-deps.sh).
"""

import argparse
import concurrent.futures
import importlib
import json
import os
import shutil
import sys


def generate_stubs(proto, workdir):
    """Compiles `proto` into `workdir` (api_pb2.py, api_pb2_grpc.py) and imports them."""
    from grpc_tools import protoc  # noqa: PLC0415 (imported late: a clear error if missing)
    import grpc_tools

    os.makedirs(workdir, exist_ok=True)
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    proto_dir = os.path.dirname(os.path.abspath(proto))
    status = protoc.main([
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{include}",
        f"--python_out={workdir}",
        f"--grpc_python_out={workdir}",
        os.path.basename(proto),
    ])
    if status != 0:
        raise SystemExit(f"protoc failed on {proto} (status {status})")
    sys.path.insert(0, workdir)
    name = os.path.splitext(os.path.basename(proto))[0]
    return importlib.import_module(f"{name}_pb2"), importlib.import_module(f"{name}_pb2_grpc")


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, name, fn):
        try:
            detail = fn()
        except Exception as e:  # a check that raises has failed; report and go on
            self.failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            return None
        self.passed += 1
        print(f"ok   {name}" + (f" ({detail})" if isinstance(detail, str) else ""), flush=True)
        return detail


def expect_code(grpc, fn, code):
    try:
        fn()
    except grpc.RpcError as e:
        if e.code() != code:
            raise AssertionError(f"expected {code}, got {e.code()}: {e.details()}")
        return e.details()
    raise AssertionError(f"expected {code}, but the call succeeded")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", required=True, help="the plugin's Unix socket")
    ap.add_argument("--proto", required=True, help="path of the KMS v2 api.proto")
    ap.add_argument("--workdir", required=True, help="where to generate the stubs")
    ap.add_argument("--expect-key-id", required=True)
    ap.add_argument("--foreign-key-id")
    ap.add_argument("--foreign-ciphertext", help="hex")
    ap.add_argument("--foreign-plaintext", help="hex")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    args = ap.parse_args()

    import grpc

    pb, pb_grpc = generate_stubs(args.proto, args.workdir)
    # gRPC-core would send the socket path as :authority, which HTTP/2 servers such as
    # hyper (tonic) refuse; kube-apiserver (grpc-go) sends "localhost" over Unix sockets.
    channel = grpc.insecure_channel(f"unix:{os.path.abspath(args.socket)}",
                                    options=[("grpc.default_authority", "localhost")])
    grpc.channel_ready_future(channel).result(timeout=args.timeout)
    kms = pb_grpc.KeyManagementServiceStub(channel)
    t = args.timeout
    checks = Checks()
    sample = {}

    def encrypt(pt):
        return kms.Encrypt(pb.EncryptRequest(plaintext=pt, uid="py-encrypt"), timeout=t)

    def decrypt(ct, key_id, annotations=None):
        req = pb.DecryptRequest(ciphertext=ct, uid="py-decrypt", key_id=key_id, annotations=annotations or {})
        return kms.Decrypt(req, timeout=t).plaintext

    def status():
        s = kms.Status(pb.StatusRequest(), timeout=t)
        assert s.version == "v2", s.version
        assert s.healthz == "ok", s.healthz
        assert s.key_id == args.expect_key_id, s.key_id
        return f"version={s.version} key_id={s.key_id}"

    checks.check("Status: v2, healthy, the expected key_id", status)

    seed = os.urandom(32)
    sealed = {}

    def round_trip():
        r = encrypt(seed)
        assert r.key_id == args.expect_key_id, r.key_id
        assert 0 < len(r.ciphertext) <= 1024, len(r.ciphertext)
        assert len(r.annotations) == 0, dict(r.annotations)
        assert decrypt(r.ciphertext, r.key_id) == seed
        sealed["r"] = r
        sample.update(key_id=r.key_id, ciphertext=r.ciphertext.hex(), plaintext=seed.hex())
        return f"{len(r.ciphertext)}-byte ciphertext"

    checks.check("Encrypt then Decrypt returns the DEK seed", round_trip)
    r = sealed.get("r")

    def fresh_nonces():
        assert encrypt(seed).ciphertext != encrypt(seed).ciphertext

    checks.check("two encryptions of one seed differ", fresh_nonces)

    def tamper_each_byte():
        for i in range(len(r.ciphertext)):
            t_ct = bytearray(r.ciphertext)
            t_ct[i] ^= 0x01
            expect_code(grpc, lambda: decrypt(bytes(t_ct), r.key_id), grpc.StatusCode.INVALID_ARGUMENT)
        return f"{len(r.ciphertext)} single-bit flips refused"

    checks.check("every tampered byte is refused (INVALID_ARGUMENT)", tamper_each_byte)

    def unknown_key_id():
        cluster, key, _ = args.expect_key_id.split("/")
        for other in (f"{cluster}/{key}/v999", f"other/{key}/v1"):
            expect_code(grpc, lambda: decrypt(r.ciphertext, other), grpc.StatusCode.NOT_FOUND)

    checks.check("unknown key_id is refused (NOT_FOUND)", unknown_key_id)

    def malformed_key_id():
        for bad in ("", "no-slashes", "a/b/c/d", "x" * 1025):
            expect_code(grpc, lambda: decrypt(r.ciphertext, bad), grpc.StatusCode.INVALID_ARGUMENT)

    checks.check("malformed key_id is refused (INVALID_ARGUMENT)", malformed_key_id)

    def annotations_refused():
        expect_code(grpc, lambda: decrypt(r.ciphertext, r.key_id, {"a.example.com": b"1"}),
                    grpc.StatusCode.INVALID_ARGUMENT)

    checks.check("unexpected annotations are refused", annotations_refused)

    def sizes():
        expect_code(grpc, lambda: encrypt(b""), grpc.StatusCode.INVALID_ARGUMENT)
        expect_code(grpc, lambda: encrypt(b"x" * 513), grpc.StatusCode.INVALID_ARGUMENT)
        expect_code(grpc, lambda: decrypt(b"\x01" * 20, r.key_id), grpc.StatusCode.INVALID_ARGUMENT)

    checks.check("empty and oversized inputs are refused", sizes)

    def concurrency():
        def one(i):
            pt = os.urandom(32)
            e = encrypt(pt)
            return decrypt(e.ciphertext, e.key_id) == pt

        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(one, range(160)))
        assert all(results), results.count(False)
        return "160 round trips on 8 threads"

    checks.check("concurrent round trips", concurrency)

    if args.foreign_ciphertext:
        def foreign():
            pt = decrypt(bytes.fromhex(args.foreign_ciphertext), args.foreign_key_id)
            assert pt == bytes.fromhex(args.foreign_plaintext)

        checks.check("a ciphertext sealed by the other client decrypts", foreign)

    channel.close()
    shutil.rmtree(os.path.join(args.workdir, "__pycache__"), ignore_errors=True)
    print(json.dumps({"passed": checks.passed, "failed": checks.failed, "sample": sample}), flush=True)
    return 0 if checks.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
