fn main() {
    println!("cargo:rerun-if-changed=proto/trellis.proto");
    if let Err(e) = tonic_prost_build::configure().compile_protos(&["proto/trellis.proto"], &["proto"]) {
        panic!(
            "compiling proto/trellis.proto failed: {e}\n\
             (protoc is required: `apt-get install -y protobuf-compiler`, or run scripts/setup.sh)"
        );
    }
}
