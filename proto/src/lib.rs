//! The gRPC contracts between Tessera processes, generated from `tessera/*.proto`.

pub mod room_worker {
    #![allow(clippy::all, rust_2018_idioms)]
    tonic::include_proto!("tessera.room_worker.v1");
}

/// Metadata key naming the owner of a partition in a redirect.
pub const OWNER_METADATA: &str = "tessera-owner";
