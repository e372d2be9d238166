//! `xtask mesh-probe`: the two ends of `bench/mesh`, run inside containers' network
//! namespaces (`nsenter --net`).
//! - `serve ADDR`: each connection is echoed (a request/response loop), or, after a
//!   first byte `B`, read to its end and answered with the byte count (a bulk transfer).
//! - `rr ADDR COUNT`: COUNT 64-byte requests, one after another on one connection; prints
//!   `p50_us p99_us` of their round trips.
//! - `bulk ADDR MIB`: sends MIB MiB on one connection; prints `MiB/s`.
//! - `forward LISTEN UPSTREAM`: a plain TCP forwarder (no encryption), copying in 64 KiB
//!   reads as the agents do: two of them chained between the nodes are what any design
//!   that relays through a process on each node costs before it encrypts a byte.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

pub fn run(args: &[&str]) -> Result<()> {
    match args {
        ["serve", addr] => serve(addr),
        ["rr", addr, count] => rr(addr, count.parse()?),
        ["bulk", addr, mib] => bulk(addr, mib.parse()?),
        ["forward", listen, upstream] => forward(listen, upstream),
        _ => bail!("usage: xtask mesh-probe serve ADDR | rr ADDR COUNT | bulk ADDR MIB | forward LISTEN UPSTREAM"),
    }
}

fn serve(addr: &str) -> Result<()> {
    let l = TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
    for conn in l.incoming() {
        let Ok(mut c) = conn else { continue };
        std::thread::spawn(move || -> Result<()> {
            c.set_nodelay(true)?;
            let mut buf = vec![0u8; 64 << 10];
            let n = c.read(&mut buf)?;
            if n > 0 && buf[0] == b'B' {
                let mut total = (n - 1) as u64;
                loop {
                    match c.read(&mut buf)? {
                        0 => break,
                        k => total += k as u64,
                    }
                }
                c.write_all(format!("{total}\n").as_bytes())?;
                return Ok(());
            }
            c.write_all(&buf[..n])?;
            loop {
                match c.read(&mut buf)? {
                    0 => return Ok(()),
                    k => c.write_all(&buf[..k])?,
                }
            }
        });
    }
    Ok(())
}

fn forward(listen: &str, upstream: &str) -> Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    for conn in l.incoming() {
        let Ok(down) = conn else { continue };
        let Ok(up) = TcpStream::connect(upstream) else { continue };
        for s in [&down, &up] {
            let _ = s.set_nodelay(true);
        }
        let (Ok(down2), Ok(up2)) = (down.try_clone(), up.try_clone()) else { continue };
        let pipe = |mut from: TcpStream, mut to: TcpStream| {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = from.read(&mut buf) {
                    if n == 0 || to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = to.shutdown(std::net::Shutdown::Write);
            })
        };
        pipe(down2, up2);
        pipe(up, down);
    }
    Ok(())
}

fn connect(addr: &str) -> Result<TcpStream> {
    let c = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(c)
}

fn rr(addr: &str, count: usize) -> Result<()> {
    let mut c = connect(addr)?;
    let req = [b'r'; 64];
    let mut resp = [0u8; 64];
    let mut times = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        let t = Instant::now();
        c.write_all(&req)?;
        c.read_exact(&mut resp)?;
        times.push(t.elapsed().as_micros() as u64);
    }
    times.sort_unstable();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    println!("{} {}", at(0.5), at(0.99));
    Ok(())
}

fn bulk(addr: &str, mib: usize) -> Result<()> {
    let mut c = connect(addr)?;
    c.set_read_timeout(Some(Duration::from_secs(120)))?;
    let chunk = vec![b'x'; 1 << 20];
    let t = Instant::now();
    c.write_all(b"B")?;
    for _ in 0..mib {
        c.write_all(&chunk)?;
    }
    c.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    c.read_to_string(&mut answer)?;
    let got: u64 = answer.trim().parse().with_context(|| format!("the server said {answer:?}"))?;
    anyhow::ensure!(got == (mib as u64) << 20, "the server got {got} bytes of {}", (mib as u64) << 20);
    println!("{:.0}", mib as f64 / t.elapsed().as_secs_f64());
    Ok(())
}
