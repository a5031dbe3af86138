//! Compiles `certctl/agent/v1/agent.proto` with protox (pure Rust), so a plain
//! `cargo build` works on a machine without `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["certctl/agent/v1/agent.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Hand-written (`src/status.rs`): answers assembled from targets
        // encoded ahead of time; the same bytes on the wire.
        .extern_path(
            ".certctl.agent.v1.StatusResponse",
            "crate::status::StatusResponse",
        )
        .compile_fds(fds)?;
    Ok(())
}
