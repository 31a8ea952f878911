//! Compiles proto/control.proto with protox (a pure-Rust protobuf compiler,
//! so no system protoc is needed) and generates the tonic service code; and
//! etcd's v3 API (proto/etcd, clients only) for the cluster backend.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/control.proto");
    println!("cargo:rerun-if-changed=proto/etcd");
    let descriptors = protox::compile(["control.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    let etcd = protox::compile(["etcd/api/etcdserverpb/rpc.proto"], ["proto/etcd"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(etcd)?;
    Ok(())
}
