//! A container's process 1 when its deployment asks for an init (`--init`, compose
//! `init: true`), as Docker's `docker-init` (tini): the skiff binary, mounted read-only
//! into the container, starts the command, passes it every signal it gets, reaps the
//! zombies of orphaned processes, and exits as the command did (128 + N for a signal).
//!
//! A process 1 gets no signal it has no handler for: every signal that can be caught has
//! one (`signal-hook`'s, which only notes it), and the loop passes each on.

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::ffi::OsString;

/// The path the init is mounted at inside a container (Docker's).
pub const PATH: &str = "/sbin/docker-init";

/// Where a static init may be found on the host when this binary is not static (a debug
/// build): Debian's `tini` package, Docker's own.
pub const HOST_INITS: &[&str] = &["/usr/bin/tini-static", "/usr/libexec/docker/docker-init"];

/// Whether the ELF file at `path` runs without a dynamic loader (no `PT_INTERP` program
/// header), so inside any image. 32- and 64-bit, little- or big-endian.
pub fn is_static_elf(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut head = vec![0u8; 64 * 1024];
    let n = match std::fs::File::open(path).and_then(|mut f| f.read(&mut head)) {
        Ok(n) => n,
        Err(_) => return false,
    };
    let h = &head[..n];
    if h.len() < 0x40 || &h[..4] != b"\x7fELF" {
        return false;
    }
    let (wide, little) = (h[4] == 2, h[5] == 1);
    let num = |at: usize, len: usize| -> Option<u64> {
        let b = h.get(at..at + len)?;
        let mut v = 0u64;
        for i in 0..len {
            let byte = if little { b[len - 1 - i] } else { b[i] };
            v = (v << 8) | u64::from(byte);
        }
        Some(v)
    };
    let (phoff, phentsize, phnum) =
        if wide { (num(0x20, 8), num(0x36, 2), num(0x38, 2)) } else { (num(0x1c, 4), num(0x2a, 2), num(0x2c, 2)) };
    let (Some(phoff), Some(size), Some(count)) = (phoff, phentsize, phnum) else { return false };
    const PT_INTERP: u64 = 3;
    for i in 0..count.min(256) {
        let at = phoff.saturating_add(i * size);
        match usize::try_from(at).ok().and_then(|at| num(at, 4)) {
            Some(PT_INTERP) => return false,
            Some(_) => {}
            // Program headers past what was read: not judged static.
            None => return false,
        }
    }
    true
}

/// Whether this process was started as the init (`argv[0]` is [`PATH`] or its name).
pub fn is_init(argv0: &std::ffi::OsStr) -> bool {
    std::path::Path::new(argv0).file_name().is_some_and(|n| n == "docker-init")
}

/// Runs `docker-init [--] COMMAND [ARG...]` and gives the exit code to end with. Call it
/// before any other thread exists.
pub fn main(args: &[OsString]) -> i32 {
    let args = match args.first() {
        Some(a) if a == "--" => &args[1..],
        _ => args,
    };
    let Some((program, rest)) = args.split_first() else {
        eprintln!("docker-init: no command to run");
        return 2;
    };
    // Not process 1 (a test, or a shared process namespace): orphans come here all the same.
    let _ = nix::sys::prctl::set_child_subreaper(true);
    // Every signal but those no handler may take (KILL, STOP) and those of a fault of
    // this process itself (SEGV, ILL, FPE, BUS, TRAP).
    let wanted: Vec<i32> = Signal::iterator()
        .filter(|s| {
            use Signal::*;
            !matches!(s, SIGKILL | SIGSTOP | SIGSEGV | SIGILL | SIGFPE | SIGBUS | SIGTRAP)
        })
        .map(|s| s as i32)
        .collect();
    let mut signals = match signal_hook::iterator::Signals::new(&wanted) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("docker-init: taking signals: {e}");
            return 1;
        }
    };
    // The command starts with the default handling of every signal (exec resets handlers).
    let child = match std::process::Command::new(program).args(rest).spawn() {
        Ok(c) => Pid::from_raw(c.id() as i32),
        Err(e) => {
            eprintln!("docker-init: {}: {e}", program.to_string_lossy());
            return if e.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 };
        }
    };
    loop {
        for sig in signals.wait() {
            if sig != Signal::SIGCHLD as i32 {
                if let Ok(s) = Signal::try_from(sig) {
                    let _ = kill(child, s);
                }
                continue;
            }
            // Reap everything that ended: the command, and orphans left to process 1.
            loop {
                match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(pid, code)) if pid == child => return code,
                    Ok(WaitStatus::Signaled(pid, s, _)) if pid == child => return 128 + s as i32,
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_knows_itself_by_its_name() {
        assert!(is_init(std::ffi::OsStr::new("/sbin/docker-init")));
        assert!(is_init(std::ffi::OsStr::new("docker-init")));
        assert!(!is_init(std::ffi::OsStr::new("/usr/bin/skiff")));
    }

    #[test]
    fn static_binaries_are_told_from_dynamic_ones() {
        // /bin/sh on the build machine is dynamic; busybox-static's busybox is static.
        assert!(!is_static_elf(std::path::Path::new("/bin/sh")));
        let busybox = std::path::Path::new("/bin/busybox");
        if busybox.exists() {
            assert!(is_static_elf(busybox));
        }
        let t = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(t.path(), b"#!/bin/sh\n").unwrap();
        assert!(!is_static_elf(t.path()), "not ELF");
    }
}
