// The client of the user service's gRPC API, from the user service's proto
// (protoc from Debian: protobuf-compiler; PROTOC overrides the path).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../user/proto/user.proto");
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&["../user/proto/user.proto"], &["../user/proto"])?;
    Ok(())
}
