//! Domain types for skiff: deployments, instances, resources, restart policies, health
//! checks, and the messages exchanged between the CLI, the hub and agents.
//!
//! Architecture Invariant: this crate does no I/O. It depends on serde and thiserror only,
//! so everything here can be unit-tested and reused by every other crate.
#![forbid(unsafe_code)]

pub mod alerts;
pub mod api;
pub mod autoscale;
pub mod job;
pub mod mesh;
pub mod metrics;
pub mod options;
pub mod platform;
pub mod proto;
pub mod quantity;
pub mod rollout;
pub mod spec;
pub mod stateful;
pub mod status;
pub mod validate;

pub use api::EventRecord;
pub use quantity::{format_bytes, format_cpus, parse_bytes, parse_cpus, QuantityError};
pub use spec::*;
pub use status::*;
pub use validate::ValidationError;
