//! A real local registry (Debian's `docker-registry`) on 127.0.0.1 fed by `skopeo`, and a
//! fault-injecting TCP proxy in front of it (the only fake: it cuts and corrupts).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Registry {
    dir: tempfile::TempDir,
    child: Child,
    pub port: u16,
    /// The CA that signed the registry's certificate, when it serves HTTPS.
    pub ca_file: Option<PathBuf>,
    /// The user and password the registry (or its token server) wants, if any.
    pub creds: Option<(String, String)>,
    /// The token server, for token auth.
    pub tokens: Option<TokenServer>,
}

/// How the registry is set up: plain HTTP and anonymous by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Auth {
    #[default]
    Anonymous,
    /// `auth: htpasswd` (bcrypt), as small private registries use.
    Htpasswd,
    /// `auth: token`: the registry answers 401 with a bearer challenge naming a token
    /// server, which hands out JWTs signed by a key the registry trusts (Docker Hub's flow).
    Token,
}

pub const USER: &str = "skiff";
pub const PASSWORD: &str = "s3cret-pass";

impl Registry {
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(false, Auth::Anonymous)
    }

    /// A registry serving HTTPS (with a certificate from a fresh CA) when `tls`, with `auth`.
    pub fn start_with(tls: bool, auth: Auth) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        let mut ca_file = None;
        if tls {
            let (ca, cert, key) = crate::tls::server_cert(dir.path())?;
            cfg.push_str(&format!("  tls:\n    certificate: {}\n    key: {}\n", cert.display(), key.display()));
            ca_file = Some(ca);
        }
        let mut tokens = None;
        match auth {
            Auth::Anonymous => {}
            Auth::Htpasswd => {
                let hash = bcrypt::hash_with_result(PASSWORD, 4)?.format_for_version(bcrypt::Version::TwoY);
                let file = dir.path().join("htpasswd");
                std::fs::write(&file, format!("{USER}:{hash}\n"))?;
                cfg.push_str(&format!("auth:\n  htpasswd:\n    realm: skiff-test\n    path: {}\n", file.display()));
            }
            Auth::Token => {
                let t = TokenServer::start(dir.path())?;
                cfg.push_str(&format!(
                    "auth:\n  token:\n    realm: http://127.0.0.1:{}/token\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                    t.port,
                    TOKEN_SERVICE,
                    TOKEN_ISSUER,
                    t.bundle.display()
                ));
                tokens = Some(t);
            }
        }
        let path = dir.path().join("config.yml");
        std::fs::write(&path, cfg)?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let creds = (auth != Auth::Anonymous).then(|| (USER.to_string(), PASSWORD.to_string()));
        Ok(Registry { dir, child, port, ca_file, creds, tokens })
    }

    /// Pushes an OCI layout (all platforms of an index) as `repo:tag`.
    pub fn push(&self, layout: &Path, repo_tag: &str) -> anyhow::Result<()> {
        self.push_with(layout, repo_tag, &[])
    }

    /// `push`, with more `skopeo copy` arguments (`--dest-compress-format zstd:chunked`).
    pub fn push_with(&self, layout: &Path, repo_tag: &str, extra: &[&str]) -> anyhow::Result<()> {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--all", "--dest-tls-verify=false"]).args(extra);
        if let Some((u, p)) = &self.creds {
            cmd.arg(format!("--dest-creds={u}:{p}"));
        }
        let out = cmd
            .arg(format!("oci:{}", layout.display()))
            .arg(format!("docker://127.0.0.1:{}/{repo_tag}", self.port))
            .output()?;
        anyhow::ensure!(out.status.success(), "skopeo: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }

    /// Where the registry keeps the blob `digest` (`sha256:...`) on disk: a test damages
    /// it there to stand for a registry or a link that corrupts.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2.min(hex.len())])
            .join(hex)
            .join("data")
    }

    /// A Docker `config.json` in `dir` holding `user:password` for this registry.
    pub fn docker_config(&self, dir: &Path, user: &str, password: &str) -> anyhow::Result<PathBuf> {
        use base64::Engine;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let path = dir.join("config.json");
        let v = serde_json::json!({"auths": {format!("127.0.0.1:{}", self.port): {"auth": auth}}});
        std::fs::write(&path, serde_json::to_vec_pretty(&v)?)?;
        Ok(path)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = &self.dir;
    }
}

pub const TOKEN_SERVICE: &str = "skiff-test-registry";
pub const TOKEN_ISSUER: &str = "skiff-test-issuer";

/// A token server for the registry's `auth: token`: checks basic credentials and answers
/// with an ES256 JWT granting the scopes asked for, its certificate in the `x5c` header.
pub struct TokenServer {
    pub port: u16,
    bundle: PathBuf,
    /// Requests answered with a token.
    pub issued: Arc<AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl TokenServer {
    fn start(dir: &Path) -> anyhow::Result<Self> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(rcgen::DnType::CommonName, "skiff test token signer");
        let cert = params.self_signed(&key)?;
        let bundle = dir.join("token-signer.pem");
        std::fs::write(&bundle, cert.pem())?;
        let rng = ring::rand::SystemRandom::new();
        let signer = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &key.serialize_der(),
            &rng,
        )
        .map_err(|e| anyhow::anyhow!("token key: {e}"))?;
        let x5c = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, cert.der());
        let l = TcpListener::bind("127.0.0.1:0")?;
        l.set_nonblocking(true)?;
        let port = l.local_addr()?.port();
        let issued = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let count = Arc::clone(&issued);
        serve_until(l, Arc::clone(&stop), move |c| {
            let _ = answer_token(c, &signer, &rng, &x5c, &count);
        });
        Ok(TokenServer { port, bundle, issued, stop })
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = vec![];
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                    Ok(v) => out.push(v),
                    Err(_) => out.extend_from_slice(&b[i..i + 3]),
                }
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn answer_token(
    c: &mut TcpStream,
    signer: &ring::signature::EcdsaKeyPair,
    rng: &ring::rand::SystemRandom,
    x5c: &str,
    count: &AtomicU64,
) -> anyhow::Result<()> {
    use base64::Engine;
    let mut head = vec![];
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = c.read(&mut buf)?;
        anyhow::ensure!(n > 0 && head.len() < 64 * 1024, "bad request");
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let target = head.split_whitespace().nth(1).unwrap_or("/");
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let mut scopes = vec![];
    let mut service = String::new();
    for kv in query.split('&') {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "scope" => scopes.push(percent_decode(v)),
            "service" => service = percent_decode(v),
            _ => {}
        }
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let want = format!("Basic {}", b64.encode(format!("{USER}:{PASSWORD}")));
    let authorized = head
        .lines()
        .any(|l| l.split_once(':').is_some_and(|(k, v)| k.eq_ignore_ascii_case("authorization") && v.trim() == want));
    if !authorized || service != TOKEN_SERVICE {
        let body = r#"{"details":"incorrect username or password"}"#;
        write!(
            c,
            "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        return Ok(());
    }
    let access: Vec<serde_json::Value> = scopes
        .iter()
        .filter_map(|s| {
            let mut p = s.splitn(3, ':');
            let (t, name, actions) = (p.next()?, p.next()?, p.next()?);
            Some(serde_json::json!({"type": t, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
        })
        .collect();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [x5c]});
    let n = count.fetch_add(1, Ordering::Relaxed);
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER, "sub": USER, "aud": TOKEN_SERVICE,
        "exp": now + 300, "nbf": now - 10, "iat": now, "jti": format!("skiff-{now}-{n}"),
        "access": access,
    });
    let signing_input =
        format!("{}.{}", url.encode(serde_json::to_vec(&header)?), url.encode(serde_json::to_vec(&claims)?));
    let sig = signer.sign(rng, signing_input.as_bytes()).map_err(|e| anyhow::anyhow!("sign: {e}"))?;
    let token = format!("{signing_input}.{}", url.encode(sig.as_ref()));
    let body = serde_json::json!({"token": token, "expires_in": 300}).to_string();
    write!(
        c,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}

/// A TCP proxy to the registry that counts the bytes it forwards to the client, and can
/// cut every connection after `cut_after` bytes or flip the byte at `flip_at`.
pub struct FaultProxy {
    pub port: u16,
    /// Bytes forwarded from the registry to clients.
    pub down: Arc<AtomicU64>,
}

impl FaultProxy {
    pub fn start(upstream: u16, cut_after: Option<u64>, flip_at: Option<u64>) -> anyhow::Result<Self> {
        Self::start_with(upstream, cut_after, flip_at, None)
    }

    /// Like `start`, also limiting each connection to `bytes_per_sec`.
    pub fn start_with(
        upstream: u16,
        cut_after: Option<u64>,
        flip_at: Option<u64>,
        bytes_per_sec: Option<u64>,
    ) -> anyhow::Result<Self> {
        Self::start_to(&format!("127.0.0.1:{upstream}"), cut_after, flip_at, bytes_per_sec)
    }

    /// The proxy in front of any `host:port`.
    pub fn start_to(
        upstream: &str,
        cut_after: Option<u64>,
        flip_at: Option<u64>,
        bytes_per_sec: Option<u64>,
    ) -> anyhow::Result<Self> {
        let upstream = upstream.to_string();
        let l = TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        let down = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&down);
        std::thread::spawn(move || {
            for c in l.incoming().take(10_000) {
                let Ok(client) = c else { continue };
                let Ok(server) = TcpStream::connect(upstream.as_str()) else { continue };
                let (Ok(mut c_r), Ok(mut s_w)) = (client.try_clone(), server.try_clone()) else { continue };
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_r, &mut s_w);
                    let _ = s_w.shutdown(std::net::Shutdown::Write);
                });
                let counter = Arc::clone(&counter);
                std::thread::spawn(move || {
                    let (mut s_r, mut c_w) = (server, client);
                    let mut buf = [0u8; 16 * 1024];
                    let chunk = if bytes_per_sec.is_some() { 4 * 1024 } else { buf.len() };
                    let mut sent = 0u64;
                    loop {
                        let n = match s_r.read(&mut buf[..chunk]) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let mut n = n;
                        if let Some(cut) = cut_after {
                            n = n.min((cut - sent) as usize);
                        }
                        if let Some(f) = flip_at {
                            if f >= sent && f < sent + n as u64 {
                                buf[(f - sent) as usize] ^= 0xff;
                            }
                        }
                        if c_w.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        sent += n as u64;
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                        if let Some(rate) = bytes_per_sec {
                            std::thread::sleep(Duration::from_micros(n as u64 * 1_000_000 / rate.max(1)));
                        }
                        if cut_after.is_some_and(|c| sent >= c) {
                            break;
                        }
                    }
                    let _ = c_w.shutdown(std::net::Shutdown::Both);
                    let _ = s_r.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Ok(FaultProxy { port, down })
    }
}

/// Skips (or, with SKIFF_REQUIRE_PRIVILEGED, fails) when root or the registry tools are
/// missing.
#[macro_export]
macro_rules! require_registry_tools {
    () => {
        $crate::require_privileged!();
        for bin in ["docker-registry", "skopeo"] {
            if $crate::which(bin).is_none() {
                if std::env::var_os("SKIFF_REQUIRE_PRIVILEGED").is_some() {
                    panic!("{bin} is not installed (apt-get install docker-registry skopeo)");
                }
                eprintln!("skipping: {bin} is not installed");
                return Ok(());
            }
        }
    };
}

/// A stand-in registry that answers every `/v2/` request with one fixed response: the
/// fault injector for 429s, 5xx answers and malformed manifests a real registry won't send.
pub struct StatusServer {
    pub port: u16,
    /// Requests answered.
    pub hits: Arc<AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl StatusServer {
    pub fn start(status: u16, content_type: &str, body: &str) -> anyhow::Result<Self> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        l.set_nonblocking(true)?;
        let port = l.local_addr()?.port();
        let hits = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let count = Arc::clone(&hits);
        let response = format!(
            "HTTP/1.1 {status} Status\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        serve_until(l, Arc::clone(&stop), move |c| {
            let mut buf = [0u8; 8192];
            // A TLS ClientHello (a client trying HTTPS first) is turned away at once.
            match c.read(&mut buf) {
                Ok(n) if n > 0 && buf[0] != 0x16 => {
                    count.fetch_add(1, Ordering::Relaxed);
                    let _ = c.write_all(response.as_bytes());
                }
                _ => {}
            }
            let _ = c.shutdown(std::net::Shutdown::Both);
        });
        Ok(StatusServer { port, hits, stop })
    }
}

impl Drop for StatusServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Accepts connections on a non-blocking `l` and hands each (blocking, 5 s read timeout)
/// to `handle`, until `stop` is set; bounded to 100 000 rounds.
fn serve_until(
    l: TcpListener,
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: impl Fn(&mut TcpStream) + Send + 'static,
) {
    std::thread::spawn(move || {
        for _ in 0..100_000u32 {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let Ok((mut c, _)) = l.accept() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            let _ = c.set_nonblocking(false);
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            handle(&mut c);
        }
    });
}
