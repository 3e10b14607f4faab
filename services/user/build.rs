// Generates the gRPC server and client for proto/user.proto with protoc
// (Debian: protobuf-compiler; PROTOC overrides the path).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/user.proto");
    tonic_prost_build::configure().compile_protos(&["proto/user.proto"], &["proto"])?;
    Ok(())
}
