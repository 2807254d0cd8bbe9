//! Compiles the Kubernetes KMS v2 API (`proto/kms/v2/api.proto`) into Rust with protox (a
//! protobuf compiler written in Rust, so no `protoc` is needed) and tonic-build: the server
//! for `keygate kms-plugin`, and the client `keygate demo` drives it with. Also the subset of
//! etcd's v3 API the sealed-state store uses (`proto/etcd/`, client only).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    let file = dir.join("kms/v2/api.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let descriptors = protox::compile([&file], [&dir])?;
    tonic_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;

    let etcd = dir.join("etcd");
    let files = [etcd.join("etcdserverpb/rpc.proto"), etcd.join("mvccpb/kv.proto")];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let descriptors = protox::compile(&files, [&etcd])?;
    tonic_build::configure().build_client(true).build_server(false).compile_fds(descriptors)?;
    Ok(())
}
