//! Compiles `proto/` into Rust with the protoc shipped by `protoc-bin-vendored`, so a fresh
//! machine needs no system protoc, and writes the descriptor set that server reflection serves.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // tonic-prost-build no longer prints these itself, and a new migration folder does not
    // rebuild a crate that embeds migrations: say both explicitly.
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-changed=build.rs");

    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    // SAFETY: build scripts are single-threaded; the variable is read by prost-build below.
    unsafe { std::env::set_var("PROTOC", protoc) };

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Decode failures become INVALID_ARGUMENT with an ErrorInfo (src/api/codec.rs).
        .codec_path("crate::api::codec::JobsCodec")
        .file_descriptor_set_path(out_dir.join("jobs_descriptor.bin"))
        .compile_protos(
            &[PathBuf::from("proto/jobs/v1/jobs.proto")],
            &[PathBuf::from("proto"), include],
        )?;
    Ok(())
}
