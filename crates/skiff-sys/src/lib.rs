//! skiff's narrow seam to the operating system, for the things every role does the same
//! way and must get right: random bytes that fail rather than degrade, writes that
//! survive a power cut, paths of an untrusted tree resolved inside it, a data directory
//! that local users cannot read, and named crash points for fault-injection tests.
//!
//! Architecture Invariant: no `unsafe` (rustix and nix wrap the system calls) but the two
//! seccomp ioctls of `seccomp_notify` and glibc's `mallopt` in `arenas`, which neither
//! wraps; nothing here knows about
//! images, containers, the hub or the agent.
#![deny(unsafe_code)]

pub mod arenas;
pub mod connlimit;
pub mod crash;
pub mod durable;
pub mod init;
pub mod inroot;
pub mod kept;
pub mod notify;
pub mod perms;
pub mod pidfd;
pub mod pty;
pub mod random;
pub mod regular;
pub mod seccomp_notify;
pub mod time;
