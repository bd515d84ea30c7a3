//! Compiles `proto/` into Rust with protox, so the build needs no system `protoc`.
//!
//! The encoded descriptor set is written to `OUT_DIR/keel_descriptor.bin` for gRPC reflection
//! (tonic-prost-build's `compile_fds` does not write it itself).

use std::path::PathBuf;

use prost::Message as _;

const PROTOS: &[&str] = &[
    "inference/grpc_service.proto",
    "inference/model_config.proto",
    "keel/admin/v1/admin.proto",
    "keel/inference/v1/prediction.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("keel_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        // Tensor payloads stay `bytes::Bytes` end to end, so forwarding never copies them.
        .bytes(".inference")
        // Unimplemented RPCs answer UNIMPLEMENTED; test doubles implement only what they need.
        .generate_default_stubs(true)
        .compile_fds(fds)?;
    Ok(())
}
