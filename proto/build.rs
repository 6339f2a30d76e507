//! Compiles `proto/**/*.proto` with protox (a pure-Rust protobuf compiler, so building needs
//! no `protoc`) and generates the prost messages and tonic client and server.

use std::path::Path;

const PROTOS: &[&str] = &["fulcrum/registry/v1/registry.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new("proto");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }
    let descriptors = protox::compile(PROTOS, [root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
