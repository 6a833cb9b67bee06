//! Compile the gRPC contracts with a vendored `protoc`, so a fresh machine
//! builds with cargo alone. `PROTOC` in the environment still wins.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    if std::env::var_os("PROTOC").is_none() {
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    }
    tonic_prost_build::configure().compile_with_config(
        config,
        &["tessera/room_worker.proto"],
        &["."],
    )?;
    println!("cargo:rerun-if-changed=tessera");
    Ok(())
}
