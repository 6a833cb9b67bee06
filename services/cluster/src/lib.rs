//! Cluster membership and partition ownership.
//!
//! # Layout
//! - [`partition`]: the documented, stable room → partition hash.
//! - [`assignment`]: which live worker should own each partition (rendezvous
//!   hashing, so a change of worker count moves only the partitions it must).
//! - [`ownership`]: what this worker owns right now, at which epoch, and the
//!   in-flight counter that lets a handoff wait for running work.
//! - [`leases`]: the loop that heartbeats, renews, claims and hands over leases.
//! - [`directory`]: for callers, where a partition's owner is (cached).
//! - [`router`]: calling a room's owner over gRPC, following redirects and handoffs.

pub mod assignment;
pub mod directory;
pub mod leases;
pub mod ownership;
pub mod partition;
pub mod router;

pub use ownership::{NotOwned, Ownership, PartitionGuard};
pub use partition::partition_of;
