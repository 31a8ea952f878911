//! Compiles proto/control.proto with protox (a pure-Rust protobuf compiler,
//! so no system protoc is needed) and generates the tonic service code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/control.proto");
    let descriptors = protox::compile(["control.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
