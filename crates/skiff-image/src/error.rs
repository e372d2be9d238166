use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("blob {digest}: content does not match its digest (got sha256:{actual})")]
    DigestMismatch { digest: String, actual: String },
    #[error("layer {digest}: uncompressed content has diff_id sha256:{actual}, the image config says {expected}")]
    DiffIdMismatch { digest: String, expected: String, actual: String },
    #[error("layer {digest}: {source}")]
    Unpack { digest: String, source: crate::UnpackError },
    #[error("layer {digest}: unpacked it would be larger than {limit} bytes ({why}); refused as a decompression bomb")]
    TooLarge { digest: String, limit: u64, why: String },
    #[error("{what}: {problem}")]
    Malformed { what: String, problem: String },
    #[error("{0:?} is not a valid digest (want sha256:<64 hex digits>)")]
    BadDigest(String),
    #[error("image {0} not found in the local store (load it with `skiff image load FILE`)")]
    NotFound(String),
    #[error("image {reference} has no manifest for {want}; it has: {have}")]
    NoPlatform { reference: String, want: String, have: String },
    #[error("{path}: neither an OCI image layout (oci-layout + index.json) nor a docker save archive (manifest.json)")]
    UnknownFormat { path: PathBuf },
    #[error("unsupported media type {0}")]
    UnsupportedMediaType(String),
    #[error("registry {registry}: {what}: {problem}")]
    Registry { registry: String, what: String, problem: String },
    #[error("registry {registry}: {what}: cannot reach it: {problem}")]
    Unreachable { registry: String, what: String, problem: String },
    #[error("registry {registry}: {what}: {message} (gave up after {attempts} attempts)")]
    Transfer { registry: String, what: String, message: String, attempts: u32 },
    #[error("{0:?} is not an image reference (examples: busybox, registry.example.com/team/app:1.4, name@sha256:...)")]
    BadReference(String),
    #[error("{0:?} is not a platform (examples: linux/amd64, linux/arm64, linux/arm/v7)")]
    BadPlatform(String),
    #[error("the image store is busy: a pull or load is running; nothing was collected (try again when it ends)")]
    Busy,
    #[error("image {image} ({digest}) is refused by the image policy ({policy}): {reason}")]
    Untrusted { image: String, digest: String, policy: String, reason: String },
    #[error("bundle {path}: needs {chunks} chunks ({bytes} bytes) that neither it nor this node's images hold: {since}; nothing was loaded", path = path.display())]
    BundleIncomplete { path: PathBuf, chunks: u64, bytes: u64, since: String },
    #[error("image {reference} is used by {users}; remove those first")]
    InUse { reference: String, users: String },
}

/// Runs `f` on the blocking pool; a task that panicked is an error naming `what`.
pub(crate) async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ImageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ImageError::Malformed { what: format!("{what} task"), problem: e.to_string() })
}

pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T, ImageError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T, ImageError> {
        self.map_err(|source| ImageError::Io { op, path: path.into(), source })
    }
}

/// An error followed by those of its causes it does not already say: reqwest and tar keep
/// the telling part ("certificate unknown", "no space left on device") in `source()`.
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let t = c.to_string();
        if !s.contains(&t) {
            s = format!("{s}: {t}");
        }
        cause = c.source();
    }
    s
}
