//! The precompiled-artifact cache: `<dir>/<module id>-<engine id>.cwasm` with a
//! `.sha256` beside it.
//!
//! * **Key.** The module id is a verified content address from the image store (a layer
//!   digest, or a layer diff_id plus a path); the engine id covers wasmtime's version,
//!   the target and the code-generating settings ([`crate::engine::id`]). A change of
//!   either is a different file, so a stale artifact is never looked up.
//! * **Writes.** An artifact is compiled into a temporary file, synced, its sha256
//!   written beside it, then renamed into place: a reader sees a whole file or none.
//!   Two processes compiling the same module at once both rename; either result is
//!   the same code.
//! * **Reads.** The artifact's sha256 is checked against its `.sha256` before wasmtime
//!   maps it; a mismatch (a torn disk, a flipped bit) removes both and compiles again.
//!   Files are never rewritten in place, only replaced by rename and removed by unlink,
//!   so a mapped artifact never changes under a running instance.
//! * **Collection.** [`Cache::prune`] removes artifacts of other engines and of modules
//!   no image holds any more.

use crate::WasmError;
use sha2::{Digest, Sha256};
use skiff_model::WasmKind;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use wasmtime::component::Component;
use wasmtime::{Engine, Module};

/// A compiled program, as loaded from the cache.
pub enum Compiled {
    Module(Module),
    Component(Component),
}

/// Artifacts younger than this are kept even if nothing runs them: an embedded apply
/// compiles a program before the deployment naming it is stored.
pub const MIN_AGE: std::time::Duration = std::time::Duration::from_secs(120);

pub struct Cache {
    dir: PathBuf,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> WasmError + 'a {
    move |source| WasmError::Io { op, path: path.to_path_buf(), source }
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

impl Cache {
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, WasmError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        // Artifacts are native code that will be mapped executable: only root may write.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io("chmod", &dir))?;
        Ok(Cache { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the artifact of `module_id` for `engine_id` lives.
    pub fn artifact_path(&self, module_id: &str, engine_id: &str) -> PathBuf {
        self.dir.join(format!("{module_id}-{engine_id}.cwasm"))
    }

    /// The compiled program for `module` (content identity `module_id`): from the cache,
    /// or compiled now and stored. Returns it and whether it came from the cache.
    pub fn load_or_compile(
        &self,
        engine: &Engine,
        module: &Path,
        module_id: &str,
    ) -> Result<(Compiled, bool), WasmError> {
        if module_id.is_empty() || !module_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(WasmError::Invalid {
                path: module.to_path_buf(),
                message: format!("module id {module_id:?} is not hex"),
            });
        }
        let path = self.artifact_path(module_id, &crate::engine::id(engine));
        if path.exists() {
            match self.load(engine, &path) {
                Ok(c) => return Ok((c, true)),
                Err(e) => {
                    tracing::warn!(artifact = %path.display(), error = %e, "discarding a cached artifact");
                    let _ = fs::remove_file(&path);
                    let _ = fs::remove_file(path.with_extension("sha256"));
                }
            }
        }
        self.compile(engine, module, &path)?;
        Ok((self.load(engine, &path)?, false))
    }

    fn compile(&self, engine: &Engine, module: &Path, path: &Path) -> Result<(), WasmError> {
        let bytes = fs::read(module).map_err(io("read", module))?;
        let kind = WasmKind::detect(&bytes).ok_or_else(|| WasmError::NotWasm { path: module.to_path_buf() })?;
        let compiled = match kind {
            WasmKind::Module => engine.precompile_module(&bytes),
            WasmKind::Component => engine.precompile_component(&bytes),
        }
        .map_err(|e| WasmError::Invalid { path: module.to_path_buf(), message: format!("{e:#}") })?;
        let tmp =
            self.dir.join(format!(".{}.{}.tmp", path.file_name().unwrap_or_default().display(), std::process::id()));
        let res = (|| {
            let mut f = fs::File::create(&tmp).map_err(io("create", &tmp))?;
            f.write_all(&compiled).map_err(io("write", &tmp))?;
            f.sync_all().map_err(io("sync", &tmp))?;
            let sum = hex::encode(Sha256::digest(&compiled));
            let sum_path = path.with_extension("sha256");
            let sum_tmp = tmp.with_extension("sum");
            fs::write(&sum_tmp, &sum).map_err(io("write", &sum_tmp))?;
            fs::rename(&sum_tmp, &sum_path).map_err(io("rename", &sum_path))?;
            fs::rename(&tmp, path).map_err(io("rename", path))
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
            let _ = fs::remove_file(tmp.with_extension("sum"));
        }
        res
    }

    fn load(&self, engine: &Engine, path: &Path) -> Result<Compiled, WasmError> {
        let want = fs::read_to_string(path.with_extension("sha256")).map_err(io("read", path))?;
        let got = sha256_file(path).map_err(io("read", path))?;
        if want.trim() != got {
            return Err(WasmError::Invalid {
                path: path.to_path_buf(),
                message: format!("cached artifact has sha256 {got}, its record says {}", want.trim()),
            });
        }
        let invalid = |e: wasmtime::Error| WasmError::Invalid { path: path.to_path_buf(), message: format!("{e:#}") };
        let kind = Engine::detect_precompiled_file(path).map_err(invalid)?;
        // SAFETY: `deserialize_file` maps the file and runs its code, so it must hold exactly
        // what wasmtime's `precompile_*` produced and must not change while mapped. Both
        // hold here: the file was written by `compile` above from wasmtime's own output,
        // into a directory only root can write (0700), and its sha256 was just checked
        // against the record written beside it; wasmtime itself refuses an artifact of
        // another version or configuration. Cache files are only ever created by rename
        // and removed by unlink, never rewritten, so a mapping stays valid.
        #[allow(unsafe_code)]
        let compiled = unsafe {
            match kind {
                Some(wasmtime::Precompiled::Module) => Module::deserialize_file(engine, path).map(Compiled::Module),
                Some(wasmtime::Precompiled::Component) => {
                    Component::deserialize_file(engine, path).map(Compiled::Component)
                }
                None => return Err(invalid(wasmtime::format_err!("not a precompiled artifact"))),
            }
        };
        compiled.map_err(invalid)
    }

    /// Removes artifacts of other engines, and those `keep` rejects unless compiled in the
    /// last [`MIN_AGE`]; returns the bytes freed. `engine_id` is asked for only when there
    /// is an artifact to judge: building an engine to learn its identity loads the whole
    /// compiler, which a node that runs no WebAssembly should never page in.
    pub fn prune(&self, engine_id: impl FnOnce() -> Option<String>, keep: impl Fn(&str) -> bool) -> u64 {
        let mut freed = 0;
        let Ok(rd) = fs::read_dir(&self.dir) else { return 0 };
        let mut engine_id = Some(engine_id);
        let mut current: Option<String> = None;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".cwasm").or_else(|| name.strip_suffix(".sha256")) else {
                continue;
            };
            let Some((module_id, engine)) = stem.rsplit_once('-') else { continue };
            if let Some(f) = engine_id.take() {
                match f() {
                    Some(id) => current = Some(id),
                    // Without the engine's identity nothing can be judged stale.
                    None => return 0,
                }
            }
            // A program compiled in the last minutes may be one being checked for a
            // deployment not stored yet (as image GC's minimum age).
            let young =
                e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().unwrap_or_default() < MIN_AGE);
            if current.as_deref() != Some(engine) || (!keep(module_id) && !young) {
                freed += e.metadata().map(|m| m.len()).unwrap_or(0);
                let _ = fs::remove_file(e.path());
            }
        }
        freed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_asks_for_the_engine_only_when_there_is_an_artifact() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        fs::write(dir.path().join("notes.txt"), "not an artifact").unwrap();
        let asked = std::cell::Cell::new(0);
        let id = || {
            asked.set(asked.get() + 1);
            Some("e1".to_string())
        };
        assert_eq!(cache.prune(id, |_| false), 0);
        assert_eq!(asked.get(), 0, "no artifact: no engine built");

        fs::write(dir.path().join("m1-e1.cwasm"), "current").unwrap();
        fs::write(dir.path().join("m1-e0.cwasm"), "stale!!").unwrap();
        let id = || {
            asked.set(asked.get() + 1);
            Some("e1".to_string())
        };
        assert_eq!(cache.prune(id, |_| true), 7, "the other engine's artifact goes");
        assert_eq!(asked.get(), 1, "asked once for all artifacts");
        assert!(dir.path().join("m1-e1.cwasm").exists());
        // An engine that cannot be built judges nothing stale.
        assert_eq!(cache.prune(|| None, |_| false), 0);
        assert!(dir.path().join("m1-e1.cwasm").exists());
    }
}
