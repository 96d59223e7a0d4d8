//! The code generated from `proto/` and its descriptor set; nothing hand-written.
#![allow(clippy::all, missing_docs)]

pub mod jobs {
    pub mod v1 {
        tonic::include_proto!("jobs.v1");
    }
}

pub use jobs::v1::*;

/// The descriptor set served by reflection, so `grpcurl describe` works without proto files.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("jobs_descriptor");
