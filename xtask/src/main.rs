//! Repository tasks: `cargo xtask wasm-programs DIR` writes the WebAssembly test programs
//! (hello, an HTTP component, a ticker, ...) as .wasm files; `cargo xtask demo-image DIR` builds the demo image (an OCI layout
//! named localhost/skiff-demo:latest) from Debian's busybox-static; `demo-image-tar FILE`
//! writes the same image as a `docker save` tarball (for `docker load` in benchmarks).
#![forbid(unsafe_code)]

use anyhow::{bail, Result};

mod flood;
mod hubsim;
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
            "usage: cargo xtask demo-image DIR | demo-image-tar FILE | bench-image DIR MIB LAYERS | fault-proxy PORTFILE UPSTREAM CUT COUNTERFILE | hub-sim ADMIN_CONF TOKEN NODES IDLE_SECS HUB_PID [METRICS_SECS] | http-load PORT STOP_FILE MAX_SECS | wasm-programs DIR | wasm-bench SKIFF DIR ITERATIONS COUNTS... | wasm-bench-cli SKIFF DATA ITERATIONS WASM_IMAGE CONTAINER_IMAGE"
        ),
    }
}
