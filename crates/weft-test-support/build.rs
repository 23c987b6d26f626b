//! Compiles the test protos with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../proto");
    let echo = "weft/test/v1/echo.proto";
    let health = "grpc/health/v1/health.proto";
    println!("cargo:rerun-if-changed={proto_root}/{echo}");
    println!("cargo:rerun-if-changed={proto_root}/{health}");
    let fds = protox::compile([echo, health], [proto_root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
