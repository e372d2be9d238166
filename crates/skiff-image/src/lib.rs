//! Content-addressed image store, image loading (OCI layouts, `docker save` and
//! oci-archive tarballs) and safe layer unpacking into overlay-ready directories.
//!
//! Architecture Invariant: this crate never runs a workload. It turns bytes into verified
//! blobs and unpacked layer directories; `skiff-runtime` mounts them.
//! Architecture Invariant: every blob is verified against its sha256 digest before it is
//! renamed into the store; a layer directory only appears (by rename) once its diff_id
//! matched.

pub mod bomb;
pub mod bundle;
pub mod chunked;
pub mod chunks;
pub mod digest;
pub mod error;
pub mod gc;
pub mod hosts;
pub mod notation;
pub mod policy;
pub mod proxy;
pub mod reference;
pub mod registry;
mod save;
pub mod store;
pub mod trust;
pub mod unpack;
pub mod wasm;
pub mod zstd;

mod load;

pub use error::ImageError;
pub use gc::{GcPolicy, Pruned};
pub use reference::{normalize_reference, reference_name};
pub use skiff_model::WasmKind;
pub use store::{ImageConfig, ImageInfo, ImageStore, ImageSummary};
pub use unpack::{unpack_layer, UnpackError};
pub use wasm::{Target, WasmModule};
