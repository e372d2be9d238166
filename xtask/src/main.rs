//! Repository tasks: `cargo xtask wasm-programs DIR` writes the WebAssembly test programs
//! (hello, an HTTP component, a ticker, ...) as .wasm files; `cargo xtask demo-image DIR` builds the demo image (an OCI layout
//! named localhost/skiff-demo:latest) from Debian's busybox-static; `demo-image-tar FILE`
//! writes the same image as a `docker save` tarball (for `docker load` in benchmarks).
#![forbid(unsafe_code)]

use anyhow::{bail, Result};

mod flood;
mod hubfleet;
mod hubsim;
mod meshprobe;
mod wasmbench;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["demo-image", dir] => {
            let dir = std::path::Path::new(dir);
            if dir.exists() {
                std::fs::remove_dir_all(dir)?;
            }
            let img = skiff_testkit::ImageBuilder::busybox()?;
            let digest = img.write_oci_layout(dir, "localhost/skiff-demo:latest")?;
            println!("built localhost/skiff-demo:latest ({digest}) in {}", dir.display());
            Ok(())
        }
        ["demo-image-tar", file] => {
            skiff_testkit::ImageBuilder::busybox()?
                .write_docker_save(std::path::Path::new(file), "localhost/skiff-demo:latest")?;
            println!("wrote a docker-save tarball of localhost/skiff-demo:latest to {file}");
            Ok(())
        }
        ["bench-image", dir, mib, layers] => {
            // busybox plus LAYERS layers of incompressible data, MIB MiB in all.
            let (mib, layers): (usize, usize) = (mib.parse()?, layers.parse()?);
            let mut img = skiff_testkit::ImageBuilder::busybox()?;
            for i in 0..layers {
                let data = skiff_testkit::incompressible((mib << 20) / layers.max(1), i as u64 + 1);
                img = img.layer(skiff_testkit::LayerBuilder::new().file(&format!("data/{i}"), 0o644, &data)?.finish()?);
            }
            let dir = std::path::Path::new(dir);
            if dir.exists() {
                std::fs::remove_dir_all(dir)?;
            }
            img.write_oci_layout(dir, "localhost/bench:1")?;
            println!("built a {mib} MiB image with {layers} data layers in {}", dir.display());
            Ok(())
        }
        ["delta-images", dir, rest @ ..] if rest.is_empty() || rest.len() == 2 => {
            // Two versions of an image (OCI layouts DIR/v1 and DIR/v2, named
            // localhost/delta:1 and :2): busybox plus one data layer. Without files, a 50 MiB
            // file whose second version has a 1 MiB edit in the middle and an appended file;
            // with OLD NEW, those two files as /usr/local/bin/app.
            let (old, new, name) = match rest {
                [old, new] => (std::fs::read(old)?, std::fs::read(new)?, "usr/local/bin/app"),
                _ => {
                    let old = skiff_testkit::incompressible(50 << 20, 11);
                    let mut new = old.clone();
                    new[25 << 20..26 << 20].copy_from_slice(&skiff_testkit::incompressible(1 << 20, 12));
                    (old, new, "data/blob")
                }
            };
            let dir = std::path::Path::new(dir);
            if dir.exists() {
                std::fs::remove_dir_all(dir)?;
            }
            let v1 = skiff_testkit::LayerBuilder::new().file(name, 0o755, &old)?;
            let mut v2 = skiff_testkit::LayerBuilder::new().file(name, 0o755, &new)?;
            if rest.is_empty() {
                v2 = v2.file("data/appended", 0o644, &skiff_testkit::incompressible(64 << 10, 13))?;
            }
            skiff_testkit::ImageBuilder::busybox()?.layer(v1.finish()?).write_oci_layout(&dir.join("v1"), "localhost/delta:1")?;
            skiff_testkit::ImageBuilder::busybox()?.layer(v2.finish()?).write_oci_layout(&dir.join("v2"), "localhost/delta:2")?;
            println!("built localhost/delta:1 and :2 in {}", dir.display());
            Ok(())
        }
        ["chunk-sizes", old, new] => chunk_sizes(old, new),
        ["fault-proxy", listen_port_file, upstream, cut_after, counter_file] => {
            // A TCP proxy for benchmarks: 127.0.0.1:<port> -> UPSTREAM (host:port), cutting
            // every connection after CUT_AFTER bytes (0 = never). Writes its port to
            // LISTEN_PORT_FILE and, every 100 ms, the bytes it forwarded to COUNTER_FILE.
            let cut: u64 = cut_after.parse()?;
            let proxy = skiff_testkit::registry::FaultProxy::start_to(upstream, (cut > 0).then_some(cut), None, None)?;
            std::fs::write(listen_port_file, proxy.port.to_string())?;
            loop {
                std::fs::write(counter_file, proxy.down.load(std::sync::atomic::Ordering::Relaxed).to_string())?;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        ["hub-sim", conf, token, nodes, idle, pid, rest @ ..] if rest.len() <= 1 => {
            let metrics: u64 = rest.first().map(|m| m.parse()).transpose()?.unwrap_or(0);
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(hubsim::run(conf, token, nodes.parse()?, idle.parse()?, pid.parse()?, metrics))
        }
        ["hub-fleet", conf, token, nodes, per_part, hubs, pids, etcd, idle, dir, metrics, repeat] => {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            let metrics = match *metrics {
                "1" => true,
                "0" => false,
                other => anyhow::bail!("METRICS: {other:?} is neither 1 nor 0"),
            };
            let (nodes, per_part, idle, repeat) = (nodes.parse()?, per_part.parse()?, idle.parse()?, repeat.parse()?);
            rt.block_on(hubfleet::run(conf, token, nodes, per_part, hubs, pids, etcd, idle, dir, metrics, repeat))
        }
        ["hub-fleet-part", conf, token, first, count, hubs, dir, k] => {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(hubfleet::part(conf, token, first.parse()?, count.parse()?, hubs, dir, k.parse()?))
        }
        ["hub-ha", conf, token, nodes, standby, pid] => {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(hubsim::ha(conf, token, nodes.parse()?, standby, pid.parse()?))
        }
        ["attack-images", dir] => {
            // The hostile images of issue 13's tests, as OCI layouts for a replay by hand:
            // probe (the seccomp probe at /probe), zero (/etc/passwd -> /dev/zero), fifo
            // (/etc/group a FIFO), bomb (48 MiB of zeros in a few KB of gzip).
            use skiff_testkit::{ImageBuilder, LayerBuilder};
            let dir = std::path::Path::new(dir);
            let probe = skiff_testkit::seccomp_probe()?;
            let images = [
                ("probe", LayerBuilder::new().file("probe", 0o755, &probe)?.finish()?),
                ("zero", LayerBuilder::new().symlink("etc/passwd", "/dev/zero")?.finish()?),
                ("fifo", LayerBuilder::new().fifo("etc/group")?.finish()?),
                ("bomb", LayerBuilder::new().file("bomb", 0o644, &vec![0u8; 48 << 20])?.finish()?),
            ];
            for (name, layer) in images {
                let out = dir.join(name);
                if out.exists() {
                    std::fs::remove_dir_all(&out)?;
                }
                ImageBuilder::busybox()?.layer(layer).write_oci_layout(&out, &format!("localhost/{name}:1"))?;
            }
            println!("wrote probe, zero, fifo and bomb layouts under {}", dir.display());
            Ok(())
        }
        ["flood", conf, conns, samples] => {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(flood::run(conf, conns.parse()?, samples.parse()?))
        }
        ["http-load", port, stop_file, max_secs] => {
            // A client loop for benchmarks: GET 127.0.0.1:PORT/ one request after another
            // (fresh connection each, 5 ms apart) until STOP_FILE exists or MAX_SECS pass;
            // then prints `sent failed p50_ms p99_ms max_ms` and the first failures.
            use skiff_testkit::traffic::{report, Traffic};
            let limit = std::time::Duration::from_secs(max_secs.parse()?);
            let t = Traffic::start(port.parse()?, "/", std::time::Duration::from_millis(5), 1_000_000, limit);
            let begin = std::time::Instant::now();
            while !std::path::Path::new(stop_file).exists() && begin.elapsed() < limit {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let r = report(&t.finish());
            println!("{} {} {:.1} {:.1} {:.1}", r.sent, r.failed, r.p50_ms, r.p99_ms, r.max_ms);
            for f in &r.failures {
                eprintln!("failed {f}");
            }
            Ok(())
        }
        ["mesh-probe", rest @ ..] => meshprobe::run(rest),
        ["wasm-bench", skiff, dir, iterations, counts @ ..] => wasmbench::run(skiff, dir, iterations, counts),
        ["wasm-bench-cli", skiff, data, iterations, wasm, container] => {
            wasmbench::cli(skiff, data, iterations, wasm, container)
        }
        ["wasm-programs", dir] => {
            // The WebAssembly test programs, as files: for the demo, benchmarks and by hand.
            use skiff_testkit::wasm;
            let dir = std::path::Path::new(dir);
            std::fs::create_dir_all(dir)?;
            let programs: [(&str, Vec<u8>); 11] = [
                ("hello.wasm", wasm::hello()?),
                ("hello-p2.wasm", wasm::command_component()?),
                ("http.wasm", wasm::http_component()?),
                ("ticker.wasm", wasm::ticker(1000)?),
                ("idle.wasm", wasm::idle()?),
                ("busy.wasm", wasm::busy()?),
                ("grow.wasm", wasm::grow(64)?),
                ("exit3.wasm", wasm::exit_with(3)?),
                ("signal.wasm", wasm::signal()?),
                // Refused before anything runs: an import no WASI host has, and no _start.
                ("bad-import.wasm", wasm::bad_import()?),
                ("reactor.wasm", wasm::reactor()?),
            ];
            for (name, bytes) in programs {
                wasm::write(dir, name, &bytes)?;
            }
            Ok(())
        }
        _ => bail!(
            "usage: cargo xtask demo-image DIR | demo-image-tar FILE | bench-image DIR MIB LAYERS | delta-images DIR [OLD NEW] | chunk-sizes OLD NEW | fault-proxy PORTFILE UPSTREAM CUT COUNTERFILE | hub-sim ADMIN_CONF TOKEN NODES IDLE_SECS HUB_PID [METRICS_SECS] | hub-ha ADMIN_CONF TOKEN NODES STANDBY_URL ACTIVE_PID | hub-fleet ADMIN_CONF TOKEN NODES PER_PART HUBS HUB_PIDS ETCD_URL IDLE_SECS DIR METRICS(1|0) REPEAT | http-load PORT STOP_FILE MAX_SECS | mesh-probe serve ADDR / rr ADDR COUNT / bulk ADDR MIB / forward LISTEN UPSTREAM | wasm-programs DIR | wasm-bench SKIFF DIR ITERATIONS COUNTS... | wasm-bench-cli SKIFF DATA ITERATIONS WASM_IMAGE CONTAINER_IMAGE"
        ),
    }
}

/// For average chunk sizes from 4 to 64 KiB: how many bytes of NEW are in chunks OLD
/// lacks, and the size of NEW's chunk list. How `skiff_image::chunks::AVG_SIZE` was chosen.
fn chunk_sizes(old: &str, new: &str) -> Result<()> {
    use skiff_image::chunks::{ChunkRef, Chunker, ENTRY_LEN};
    let (old, new) = (std::fs::read(old)?, std::fs::read(new)?);
    let cut = |data: &[u8], avg: usize| {
        let mut chunker = Chunker::with_sizes(avg / 4, avg, avg * 4);
        let mut out = vec![];
        let mut sink = |c: &[u8]| -> Result<(), ()> {
            out.push(ChunkRef::of(c));
            Ok(())
        };
        let _ = chunker.push(data, &mut sink);
        let _ = chunker.finish(&mut sink);
        out
    };
    println!("{:>8} {:>12} {:>8} {:>10}", "avg", "delta bytes", "% of new", "index");
    for avg in [4 << 10, 8 << 10, 16 << 10, 32 << 10, 64 << 10] {
        let have: std::collections::HashSet<[u8; 32]> = cut(&old, avg).iter().map(|c| c.digest).collect();
        let chunks = cut(&new, avg);
        let delta: u64 = chunks.iter().filter(|c| !have.contains(&c.digest)).map(|c| u64::from(c.len)).sum();
        let index = chunks.len() * ENTRY_LEN;
        println!("{:>7}K {delta:>12} {:>7.1}% {index:>10}", avg >> 10, delta as f64 * 100.0 / new.len().max(1) as f64);
    }
    Ok(())
}
