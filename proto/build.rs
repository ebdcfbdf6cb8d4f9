//! Generates the tonic/prost code for `proto/athanor/v1/*.proto`.
//!
//! A pinned protoc comes from `protoc-bin-vendored`, so a fresh machine needs no install
//! step; setting `PROTOC` overrides it.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "athanor/v1/model.proto",
        "athanor/v1/federation.proto",
        "athanor/v1/admin.proto",
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    println!("cargo:rerun-if-env-changed=PROTOC");

    let mut config = prost_build::Config::new();
    if std::env::var_os("PROTOC").is_none() {
        let protoc: PathBuf = protoc_bin_vendored::protoc_bin_path()?;
        config.protoc_executable(protoc);
    }

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &protos, &["."])?;
    Ok(())
}
