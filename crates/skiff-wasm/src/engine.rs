//! The one wasmtime configuration every skiff process uses, and its identity.
//!
//! The compile cache keys artifacts by this identity: wasmtime's
//! `precompile_compatibility_hash` covers its version, the target and every setting
//! that changes generated code, so an upgrade of skiff (or of wasmtime, or a changed
//! setting here) gives a new key and the old artifacts are never loaded.

use sha2::{Digest, Sha256};
use std::hash::{Hash, Hasher};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, OptLevel, PoolingAllocationConfig};

/// How often the epoch advances while a limit needs watching (CPU share, timeout).
pub const EPOCH_TICK: std::time::Duration = std::time::Duration::from_millis(10);

/// Per slot of a pooled HTTP component: core instances, memories and tables it may use
/// (a component adapted from preview 1 has a handful of each).
const POOL_CORE_INSTANCES: u32 = 16;
const POOL_MEMORIES: u32 = 4;
const POOL_TABLES: u32 = 16;

/// The engine for one workload. `pool`: slots of the pooling allocator (HTTP
/// components served from a pool), each capped at `memory_bytes` (256 MiB when unset).
pub fn engine(pool: Option<u32>, memory_bytes: Option<u64>) -> wasmtime::Result<Engine> {
    let mut c = Config::new();
    c.epoch_interruption(true);
    c.wasm_component_model(true);
    c.parallel_compilation(true);
    c.cranelift_opt_level(OptLevel::Speed);
    if let Some(n) = pool {
        // Each slot reserves its whole linear memory up front: keep the reservation to
        // what the limit allows, so a pool fits small address spaces too.
        let max = memory_bytes.unwrap_or(256 << 20).next_multiple_of(64 << 10);
        let mut p = PoolingAllocationConfig::new();
        p.total_component_instances(n)
            .total_core_instances(n * POOL_CORE_INSTANCES)
            .total_memories(n * POOL_MEMORIES)
            .total_tables(n * POOL_TABLES)
            .max_memory_size(max as usize);
        c.memory_reservation(max);
        c.allocation_strategy(InstanceAllocationStrategy::Pooling(p));
    }
    Engine::new(&c)
}

/// Feeds `Hash` output into sha256, so the identity is the same in every process
/// (std's hashers are seeded per process).
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    fn finish(&self) -> u64 {
        0
    }
}

/// A stable hex identity of what `engine` compiles: precompiled artifacts are only
/// compatible between engines with the same identity.
pub fn id(engine: &Engine) -> String {
    let mut h = ShaHasher(Sha256::new());
    engine.precompile_compatibility_hash().hash(&mut h);
    hex::encode(&h.0.finalize()[..8])
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_identity_is_stable_and_follows_settings() {
        let a = super::id(&super::engine(None, None).unwrap());
        assert_eq!(a, super::id(&super::engine(None, None).unwrap()));
        assert_eq!(a.len(), 16);
        // A pooled engine with a small reservation generates other code (bounds checks).
        assert_ne!(a, super::id(&super::engine(Some(2), Some(1 << 20)).unwrap()));
    }
}
