//! How many heaps the C allocator keeps, for a process of many threads and much memory.
//!
//! glibc gives threads that allocate at the same time heaps ("arenas") of their own, up to
//! eight per core, and keeps what was freed in each for reuse by that heap alone. A hub's
//! blocking threads each make and drop the copies a placement of every node needs, so
//! the freed memory piles up per thread: with 20,000 simulated nodes on 6 hubs
//! (`bench/hub-fleet 20000 6`), the leading hub held 782 MiB with glibc's default and
//! 187 MiB with two arenas, at the same speed.
#![allow(unsafe_code)]

/// From now on at most `n` arenas (glibc; elsewhere nothing happens). Returns whether the
/// limit was set. Called before the process starts its threads.
pub fn limit(n: i32) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt takes two integers and changes only the allocator's settings.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, n) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = n;
        false
    }
}

/// From now on memory freed at the top of a heap is kept for reuse up to `trim_above`
/// bytes, and allocations below `mmap_above` bytes come from the heaps (glibc; elsewhere
/// nothing happens). Returns whether both were set.
///
/// glibc gives the top of a heap back to the system once 128 KiB of it is free, and maps
/// large allocations on their own; memory taken again is then faulted in and cleared page
/// by page. A hub makes and drops every node's part, and a frame for each of its nodes,
/// at each apply: at 100,000 nodes a seventh of a standby hub's time in an apply went to
/// clearing such pages again.
pub fn keep_freed(trim_above: i32, mmap_above: i32) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt takes two integers and changes only the allocator's settings.
        unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, trim_above) == 1
                && libc::mallopt(libc::M_MMAP_THRESHOLD, mmap_above) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = (trim_above, mmap_above);
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_limit_is_taken() {
        assert_eq!(super::limit(2), cfg!(all(target_os = "linux", target_env = "gnu")));
    }

    #[test]
    fn the_hub_s_thresholds_are_taken() {
        let gnu = cfg!(all(target_os = "linux", target_env = "gnu"));
        assert_eq!(super::keep_freed(64 << 20, 32 << 20), gnu);
    }
}
