//! The hub ⇄ agent protocol: joining, a node's assignment and status, and the frames of
//! the agent's tunnel (`/api/v1/nodes/{name}/tunnel`, a WebSocket over mutual TLS).
//!
//! Both sides speak these types and nothing else: the hub (`skiff-hub`) serves them, the
//! agent (`skiff-agent`) dials out with them, and the simulator (`xtask hub-sim`) fakes
//! thousands of agents with them.
//!
//! Tunnel frames are JSON text.
//! * [`Control`] frames (tagged `type`): the agent says `hello` with the revision it
//!   holds and sends `status` (instances, unshipped events) when it changed; the hub
//!   `assign`s when the node's assignment differs from what the node holds and `ack`s
//!   events. After a reconnect only a changed assignment is sent — a restarted hub
//!   sends nothing to nodes that are current.
//! * Requests (hub → agent, `id` chosen by the hub, `op`: logs, exec, session, cancel,
//!   credit) and [`Reply`]s for that id: log lines then `end`; exec output in chunks
//!   then its result; or an error. A `session` (an interactive exec) also takes
//!   requests of its id the other way: `input`, `resize` and `inputend`, at most
//!   [`INPUT_WINDOW`] of them before the agent says it `took` them.
//!
//! Flow control: a request's stream may have at most [`STREAM_WINDOW`] frames in flight;
//! the hub grants more (`credit`) as its consumer takes them. A slow `logs -f` reader or
//! a large exec output therefore stalls only its own stream, never the node's control
//! frames, and no frame exceeds [`CHUNK_BYTES`] of payload.

use crate::{Deployment, EventRecord, InstanceStatus, LogLine};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What a node reports at join: labels, platform and capacity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub os: String,
    pub arch: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    /// Runtime backends the node offers (`oci`, `wasm`); nodes that joined before this was
    /// reported run containers only.
    #[serde(default = "oci_only")]
    pub runtimes: Vec<String>,
    /// Versions of what runs workloads (`runc` → `1.1.5`), as the node found them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub versions: BTreeMap<String, String>,
    /// CDI devices, how many of each kind (`nvidia.com/gpu` → 2): what `--gpus` and
    /// device requests are placed by.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub devices: BTreeMap<String, u32>,
}

fn oci_only() -> Vec<String> {
    vec![crate::RuntimeKind::Oci.to_string()]
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// `<id>.<secret>` of the join token (the CA hash part stays with the agent).
    pub token: String,
    pub node: String,
    /// PEM certificate signing request for the node's own key.
    pub csr: String,
    pub spec: NodeSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinResponse {
    pub cert: String,
    pub ca: String,
    /// Every hub of the fleet's store (`https://` URLs), for the agent to follow when its
    /// own goes away (absent from older hubs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hubs: Vec<String>,
}

/// The most hubs a list may name, and the longest URL in it.
pub const MAX_HUBS: usize = 32;
pub const MAX_HUB_URL: usize = 256;

/// The usable entries of a hub list, in order, once each: `https://` URLs of bounded
/// length, at most [`MAX_HUBS`]. What a hub says is checked like any input.
pub fn usable_hubs<'a>(list: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    let mut out: Vec<String> = vec![];
    for h in list {
        let h = h.trim().trim_end_matches('/');
        let host = h.strip_prefix("https://").unwrap_or("");
        let fine = !host.is_empty()
            && h.len() <= MAX_HUB_URL
            && host.chars().all(|c| c.is_ascii_alphanumeric() || "-.:[]_".contains(c));
        if fine && out.len() < MAX_HUBS && !out.iter().any(|o| o == h) {
            out.push(h.to_string());
        }
    }
    out
}

/// A join token as `skiff token create` prints it: `SK1.<ca-sha256>.<id>.<secret>`, as K3s
/// embeds its CA hash. The agent fetches the CA from the hub, trusts it only if its sha256
/// is the one in the token, then presents `<id>.<secret>` over TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub ca_sha256: String,
    pub id: String,
    pub secret: String,
}

/// A join token that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a join token (SK1.<ca sha256>.<id>.<secret>; see `skiff token create`)")]
pub struct BadToken;

impl JoinToken {
    pub fn parse(s: &str) -> Result<Self, BadToken> {
        let parts: Vec<&str> = s.trim().split('.').collect();
        let [prefix, ca, id, secret] = parts.as_slice() else { return Err(BadToken) };
        let hex_ok = |x: &str, n: usize| x.len() == n && x.chars().all(|c| c.is_ascii_hexdigit());
        if *prefix != "SK1" || !hex_ok(ca, 64) || !hex_ok(id, 12) || !hex_ok(secret, 32) {
            return Err(BadToken);
        }
        Ok(JoinToken { ca_sha256: ca.to_string(), id: id.to_string(), secret: secret.to_string() })
    }

    /// What the agent presents to the hub: `<id>.<secret>`.
    pub fn credential(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SK1.{}.{}.{}", self.ca_sha256, self.id, self.secret)
    }
}

/// What a node runs: each deployment with the instance numbers placed on this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub revision: u64,
    pub deployments: Vec<Assigned>,
    /// The names of workloads' own metrics that some autoscaler reads: what the agent
    /// scrapes from its instances that ask for it (`Deployment::scrape`) and ships.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<String>,
    /// What the hub made of this node's part (deployments and metrics), as it sent it
    /// (opaque; absent from older hubs). The agent keeps it and says it in its next
    /// hello: a hub that finds the same part sends nothing, whatever the revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assigned {
    /// Shared: a hub holds every node's assignment, and a deployment on every node is one
    /// spec, not 100,000 copies of it.
    pub spec: std::sync::Arc<Deployment>,
    pub indexes: Vec<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeStatus {
    #[serde(default)]
    pub instances: Vec<InstanceStatus>,
    /// Events since the last acknowledged batch (the agent keeps them on disk meanwhile).
    #[serde(default)]
    pub events: Vec<EventRecord>,
    /// The id of the last event in `events` (what the hub acknowledges).
    #[serde(default)]
    pub events_through: u64,
    /// What keeps the node from taking new work (disk or memory pressure): it is
    /// NotReady while any is reported.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// Where this node serves its site's image cache (`skiff agent --serve-cache`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
    /// Where this node's agent takes direct connections from other nodes' agents for the
    /// fleet's services (`host:port`, `skiff agent --mesh-advertise`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
}

/// A site cache's address as a node states it: `http://host:port`, nothing more.
pub fn valid_cache_url(u: &str) -> bool {
    u.len() <= 256
        && u.strip_prefix("http://").is_some_and(|rest| {
            !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
}

/// The image caches of a node's site (nodes with the same `site` label that serve one),
/// and the token the site's caches take from its nodes (the same for the whole site).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteCaches {
    pub site: Option<String>,
    pub caches: Vec<String>,
    pub token: String,
}

/// The hub's answer to a status report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusAck {
    /// Every event up to this id is stored.
    pub events_through: u64,
}

/// The outcome of a command run in an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// The agent reads UDP service ports (`ServicePort.protocol`) in its views and
/// assignments: an agent that does not say so is sent TCP ports only (its
/// `deny_unknown_fields` would refuse the whole frame).
pub const FEATURE_MESH_UDP: &str = "mesh-udp";

/// A request the hub sends down a node's tunnel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Op {
    Logs {
        instance: String,
        tail: Option<usize>,
        follow: bool,
    },
    Exec {
        instance: String,
        argv: Vec<String>,
        timeout_ms: u64,
    },
    /// An interactive exec (`skiff exec -i/-t`): output streams back as `data` answers,
    /// input goes down as `input`, `resize` and `inputend` requests of the same id.
    Session {
        instance: String,
        spec: SessionSpec,
    },
    /// A TCP connection to `port` inside an instance (`skiff port-forward`): a session
    /// whose output is what the instance sends and whose input is what goes to it; its
    /// `inputend` shuts the sending side, and it ends (exit 0) when the instance closes.
    Connect {
        instance: String,
        port: u16,
    },
    /// Datagrams to UDP `port` inside an instance (the mesh's relay): a session like
    /// `connect`'s whose bytes are datagrams each framed as [`crate::mesh::Dial`] says;
    /// it ends after half a minute without one. (A request of its own: an agent that
    /// predates it says it does not know it, rather than open a TCP connection.)
    Datagrams {
        instance: String,
        port: u16,
    },
    /// An operator's action on one instance (`skiff restart|stop|start web-1`), answered
    /// `end` once it has begun.
    Act {
        instance: String,
        action: InstanceAction,
    },
    /// Bytes for a session's standard input (at most [`INPUT_CHUNK`]).
    Input {
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// A session's terminal has a new size.
    Resize {
        cols: u16,
        rows: u16,
    },
    /// A session's standard input is at its end.
    InputEnd,
    Cancel,
    /// The hub's consumer took `frames` more frames of this request's stream.
    Credit {
        frames: u32,
    },
}

/// What `skiff restart|stop|start INSTANCE` does to one instance on its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceAction {
    /// Its container ended (stop signal, grace period) and started again at once from the
    /// instance's own spec.
    Restart,
    /// Its container stopped (signal, grace period) and not started again, whatever its
    /// restart policy, until `start` (or its deployment replaces it).
    Stop,
    /// A stopped one started again.
    Start,
}

impl InstanceAction {
    pub fn parse(s: &str) -> Option<InstanceAction> {
        match s {
            "restart" => Some(InstanceAction::Restart),
            "stop" => Some(InstanceAction::Stop),
            "start" => Some(InstanceAction::Start),
            _ => None,
        }
    }
}

/// Input frames (`input`, `resize`, `inputend`) of one session the hub may send before the
/// agent says it took them (`took`): the agent holds at most this many per session.
pub const INPUT_WINDOW: u32 = 32;

/// The most bytes one input frame carries.
pub const INPUT_CHUNK: usize = 16 * 1024;

/// How an interactive exec is started (the API's first message, and the tunnel's
/// `session` request).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSpec {
    /// The command (empty when attaching).
    #[serde(default)]
    pub argv: Vec<String>,
    /// Attach to the instance's own process (`skiff attach`) instead of running a
    /// command: its output from now on, input to its terminal or stdin when it keeps one
    /// open; leaving never stops it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub attach: bool,
    /// Attaching: first the output its shim kept from before (up to 64 KiB), as
    /// `skiff run -it` shows what the container wrote before it attached.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replay: bool,
    /// Attaching: the end of this input closes the instance's stdin (a pipe), as
    /// `docker run -i` does; otherwise it stays open for the next attachment.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdin_once: bool,
    /// A terminal in the container (`-t`): output is the terminal's, one stream.
    #[serde(default)]
    pub tty: bool,
    /// Standard input is passed on (`-i`); without it the command reads nothing.
    #[serde(default)]
    pub stdin: bool,
    /// The terminal's size at the start (0: 80 × 24).
    #[serde(default)]
    pub cols: u16,
    #[serde(default)]
    pub rows: u16,
}

impl SessionSpec {
    /// Checks what a caller asked for, naming the field at fault.
    pub fn validate(&self) -> Result<(), String> {
        if self.attach && !self.argv.is_empty() {
            return Err("argv: attaching runs no command".into());
        }
        if !self.attach && (self.replay || self.stdin_once) {
            let field = if self.replay { "replay" } else { "stdin_once" };
            return Err(format!("{field}: only for attaching"));
        }
        if !self.attach && self.argv.is_empty() {
            return Err("argv: must not be empty".into());
        }
        if self.argv.len() > 1024 {
            return Err(format!("argv: {} arguments (at most 1024)", self.argv.len()));
        }
        if self.argv.iter().map(String::len).sum::<usize>() > 128 * 1024 {
            return Err("argv: more than 128 KiB".into());
        }
        if let Some(i) = self.argv.iter().position(|a| a.contains('\0')) {
            return Err(format!("argv[{i}]: contains a NUL byte"));
        }
        for (field, v) in [("cols", self.cols), ("rows", self.rows)] {
            if v > 4096 {
                return Err(format!("{field}: {v} is larger than 4096"));
            }
        }
        Ok(())
    }

    /// The terminal's size at the start, 80 × 24 when not given.
    pub fn size(&self) -> (u16, u16) {
        (if self.cols == 0 { 80 } else { self.cols }, if self.rows == 0 { 24 } else { self.rows })
    }
}

/// What a caller sends into an interactive exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionInput {
    Data(Vec<u8>),
    Resize {
        cols: u16,
        rows: u16,
    },
    /// Standard input ended (a pipe's end; a terminal's Ctrl-D is a byte like any other).
    End,
}

/// What comes out of one, ending with `Exit` or `Error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionOutput {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(i32),
    Error(String),
}

/// Bytes as base64 text in JSON frames.
mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(text.as_bytes()).map_err(serde::de::Error::custom)
    }
}

/// Frames of one request's stream the agent may send before the hub grants more.
pub const STREAM_WINDOW: u32 = 64;

/// The most output one exec frame carries (JSON escaping may grow it up to six times:
/// still well under the tunnel's 1 MiB message limit).
pub const CHUNK_BYTES: usize = 128 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    #[serde(flatten)]
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Answer {
    Log(LogLine),
    End,
    /// A piece of an exec's output (`stdout` or `stderr`), before its result.
    Output {
        stream: String,
        data: String,
    },
    /// An exec's end: its exit code (output sent before in `output` chunks, or here by
    /// agents that predate chunks).
    Exec(ExecResult),
    /// A piece of a session's output (`stdout` or `stderr`; a terminal's is `stdout`).
    Data {
        stream: String,
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// The agent took this many input frames of a session (0: the session started).
    Took {
        frames: u32,
    },
    Error(String),
}

impl Answer {
    /// Whether more answers follow this one.
    pub fn is_last(&self) -> bool {
        !matches!(self, Answer::Log(_) | Answer::Output { .. } | Answer::Data { .. } | Answer::Took { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub id: u64,
    #[serde(flatten)]
    pub answer: Answer,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Control {
    /// Agent → hub, first frame: the revision of the assignment the node holds, and the
    /// runtimes it offers (absent from agents that predate them).
    Hello {
        revision: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        runtimes: Option<Vec<String>>,
        /// Versions of what runs workloads (runc), as at join (absent from older agents).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        versions: Option<BTreeMap<String, String>>,
        /// CDI devices by kind, as now (absent from older agents).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        devices: Option<BTreeMap<String, u32>>,
        /// What the agent understands beyond what its fields say (absent from older
        /// agents): [`FEATURE_MESH_UDP`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        features: Option<Vec<String>>,
        /// The digest of the assignment the node holds, as the hub sent it
        /// ([`Assignment::digest`]; absent from older agents).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<String>,
    },
    /// Agent → hub: instances and unshipped events, when they changed.
    Status { status: NodeStatus },
    /// Hub → agent: the node's assignment, when it differs from what the node holds.
    Assign { assignment: Assignment },
    /// Hub → agent: events stored up to this id.
    Ack { events_through: u64 },
    /// Agent → hub: resource samples, oldest first, up to id `through` of the node's buffer.
    Metrics { samples: Vec<crate::metrics::PackedSample>, through: u64 },
    /// Agent → hub: samples as changes, each from the one before it on this connection
    /// (the first from the last sample sent on it), up to id `through`.
    #[serde(rename = "metricsdelta")]
    MetricsDelta { samples: Vec<crate::metrics::DeltaSample>, through: u64 },
    /// Hub → agent: samples received up to this id. (A hub also says it in its pings'
    /// payload, the id as decimal text: one frame fewer per batch on a metered link.)
    MetricsAck { through: u64 },
    /// Agent → hub: a CSR for a key the node just made, to renew its certificate before
    /// it expires (or when asked to).
    Renew { csr: String },
    /// Hub → agent: the renewed certificate. The current one stays accepted until the node
    /// connects with this one.
    Renewed { cert: String },
    /// Hub → agent: renew now (the certificate is older than this hub allows).
    RenewNow,
    /// Hub → agent: every hub of the fleet's store, on connecting and when the list
    /// changes: where the agent goes when this hub is gone.
    Hubs { hubs: Vec<String> },
    /// Hub → agent: the fleet's services this node may reach and who may reach its own,
    /// after the hello and whenever that changes.
    Services { view: crate::mesh::MeshView },
    /// Hub → agent: this hub is cut off from its store (it shows what it last read and
    /// changes nothing). The agent looks for another hub of the store that answers (not
    /// one that said this too in the last minutes) and moves to it; the hub also hands
    /// its nodes over, by starting again, once another hub of the store says it leads.
    CutOff,
}

/// How often the hub pings a tunnel; a node that answers nothing for three of these is
/// dropped (it dials again).
pub const PING_EVERY: std::time::Duration = std::time::Duration::from_secs(20);

/// The header of a hub's answer to a tunnel's upgrade that names the frame encodings it
/// reads beyond text (comma-separated). A hub that predates it sends none, and is sent
/// text only.
pub const TUNNEL_FEATURES: &str = "skiff-tunnel-features";
/// [`TUNNEL_FEATURES`]: the hub reads an agent's frames deflated (raw DEFLATE, RFC 1951)
/// in binary frames. On a metered link a batch of samples is half its text's bytes.
pub const FEATURE_DEFLATE: &str = "deflate";

/// Whether a hub's [`TUNNEL_FEATURES`] header names `feature`.
pub fn tunnel_reads(header: Option<&str>, feature: &str) -> bool {
    header.is_some_and(|h| h.split(',').any(|f| f.trim() == feature))
}

/// Frames shorter than this go as text: DEFLATE's own bytes would eat what it saves.
const DEFLATE_FROM: usize = 96;
/// The most a deflated frame may grow when inflated (times its own length, plus 4 KiB):
/// a node cannot make the hub read far more than it sent. An agent sends a frame that
/// deflates better than this as text.
pub const MAX_DEFLATE_RATIO: usize = 64;

/// `text` deflated, when that is shorter than `text` (and `text` long enough to try), and
/// within [`MAX_DEFLATE_RATIO`].
pub fn deflate_frame(text: &str) -> Option<Vec<u8>> {
    use std::io::Write;
    if text.len() < DEFLATE_FROM {
        return None;
    }
    let mut z = flate2::write::DeflateEncoder::new(Vec::with_capacity(text.len() / 2), flate2::Compression::default());
    z.write_all(text.as_bytes()).ok()?;
    let out = z.finish().ok()?;
    (out.len() < text.len() && text.len() <= inflated_bound(out.len())).then_some(out)
}

/// The most text a deflated frame of `len` bytes may carry.
fn inflated_bound(len: usize) -> usize {
    len.saturating_mul(MAX_DEFLATE_RATIO).saturating_add(4 << 10)
}

/// A deflated frame's text, refused past `max` bytes (a small frame that inflates to
/// gigabytes is bounded like a long text frame) or past [`MAX_DEFLATE_RATIO`] times its
/// own length.
pub fn inflate_frame(bytes: &[u8], max: usize) -> Result<String, FrameError> {
    use std::io::Read;
    let max = max.min(inflated_bound(bytes.len()));
    let mut text = String::new();
    let mut z = flate2::read::DeflateDecoder::new(bytes).take(max as u64 + 1);
    z.read_to_string(&mut text)
        .map_err(|e| FrameError(format!("a deflated frame that does not inflate to text: {e}")))?;
    if text.len() > max {
        return Err(FrameError(format!("a deflated frame of more than {max} bytes")));
    }
    Ok(text)
}

/// A tunnel frame that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FrameError(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_deflate_when_it_pays_and_inflate_within_bounds() {
        let batch = serde_json::to_string(&Control::MetricsAck { through: 7 }).unwrap();
        assert_eq!(deflate_frame(&batch), None, "a short frame stays text");
        let long = format!("{{\"type\":\"status\",\"pad\":\"{}\"}}", "ab".repeat(300));
        let z = deflate_frame(&long).expect("deflated");
        assert!(z.len() < long.len() / 4, "{} of {}", z.len(), long.len());
        assert_eq!(inflate_frame(&z, 1 << 20).unwrap(), long);
        // A bomb: small deflated, past the bound inflated, and past the ratio (which the
        // agent keeps: such a frame goes as text).
        let spaces = " ".repeat(3 << 20);
        assert_eq!(deflate_frame(&spaces), None);
        let bomb = {
            use std::io::Write;
            let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
            z.write_all(spaces.as_bytes()).unwrap();
            z.finish().unwrap()
        };
        assert!(bomb.len() < 8 << 10);
        assert!(inflate_frame(&bomb, 1 << 20).unwrap_err().0.contains("more than"));
        assert!(inflate_frame(&bomb, 64 << 20).is_err(), "past the ratio however large the bound");
        assert!(inflate_frame(b"\xff\xfe not deflate", 1 << 20).is_err());
        let not_text = {
            use std::io::Write;
            let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
            z.write_all(&[0xff; 200]).unwrap();
            z.finish().unwrap()
        };
        assert!(inflate_frame(&not_text, 1 << 20).is_err(), "not UTF-8");
        // The hub's header: a list, read by name.
        assert!(tunnel_reads(Some("deflate"), FEATURE_DEFLATE));
        assert!(tunnel_reads(Some("zstd, deflate"), FEATURE_DEFLATE));
        assert!(!tunnel_reads(Some("deflated"), FEATURE_DEFLATE));
        assert!(!tunnel_reads(None, FEATURE_DEFLATE));
    }

    #[test]
    fn session_frames_carry_bytes_and_specs_are_checked() {
        let r = Request { id: 7, op: Op::Input { data: vec![0, 0xff, b'\r'] } };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"id":7,"op":"input","data":"AP8N"}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        let a = Reply { id: 7, answer: Answer::Data { stream: "stdout".into(), data: vec![0xe2, 0x82] } };
        assert_eq!(serde_json::from_str::<Reply>(&serde_json::to_string(&a).unwrap()).unwrap(), a);
        assert!(!Answer::Took { frames: 0 }.is_last() && !a.answer.is_last());
        assert!(serde_json::from_str::<Request>(r#"{"id":1,"op":"input","data":"not base64!"}"#).is_err());

        let ok = SessionSpec { argv: vec!["sh".into()], tty: true, stdin: true, ..Default::default() };
        let attach = SessionSpec { attach: true, ..Default::default() };
        assert_eq!(attach.validate(), Ok(()));
        let both = SessionSpec { attach: true, ..ok.clone() };
        assert_eq!(both.validate(), Err("argv: attaching runs no command".to_string()));
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(ok.size(), (80, 24));
        let bad = |f: fn(&mut SessionSpec)| {
            let mut s = ok.clone();
            f(&mut s);
            s.validate().unwrap_err()
        };
        assert_eq!(bad(|s| s.argv.clear()), "argv: must not be empty");
        assert_eq!(bad(|s| s.argv = vec!["a\0b".into()]), "argv[0]: contains a NUL byte");
        assert_eq!(bad(|s| s.cols = 5000), "cols: 5000 is larger than 4096");
        assert!(serde_json::from_str::<SessionSpec>(r#"{"argv":["sh"],"tyy":true}"#)
            .unwrap_err()
            .to_string()
            .contains("tyy"));
    }

    #[test]
    fn hub_lists_keep_only_usable_urls() {
        let list: Vec<String> = [
            "https://hub-a.example:8443/",
            "https://hub-a.example:8443",
            "http://plain:80",
            "https://[::1]:8443",
            "https://evil host/",
            "https://",
            "file:///etc/passwd",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(std::iter::once(format!("https://{}", "a".repeat(300))))
        .collect();
        assert_eq!(usable_hubs(&list), ["https://hub-a.example:8443", "https://[::1]:8443"]);
        let many: Vec<String> = (0..100).map(|i| format!("https://h{i}:1")).collect();
        assert_eq!(usable_hubs(&many).len(), MAX_HUBS);
        let c: Control = serde_json::from_str(r#"{"type":"hubs","hubs":["https://a:1"]}"#).unwrap();
        assert_eq!(c, Control::Hubs { hubs: vec!["https://a:1".into()] });
        let old: JoinResponse = serde_json::from_str(r#"{"cert":"c","ca":"a"}"#).unwrap();
        assert!(old.hubs.is_empty(), "an older hub's answer");
    }

    #[test]
    fn frames_are_flat_json() {
        let r = Request { id: 3, op: Op::Logs { instance: "web-1".into(), tail: Some(5), follow: true } };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"id":3,"op":"logs","instance":"web-1","tail":5,"follow":true}"#
        );
        let back: Reply = serde_json::from_str(r#"{"id":3,"end":null}"#).unwrap();
        assert_eq!(back, Reply { id: 3, answer: Answer::End });
        let e: Reply = serde_json::from_str(r#"{"id":4,"error":"no such instance"}"#).unwrap();
        assert_eq!(e.answer, Answer::Error("no such instance".into()));
    }

    #[test]
    fn join_tokens_round_trip_and_reject_garbage() {
        let t = JoinToken { ca_sha256: "ab".repeat(32), id: "0123456789ab".into(), secret: "cd".repeat(16) };
        let s = t.to_string();
        assert_eq!(JoinToken::parse(&s).unwrap(), t);
        assert_eq!(t.credential(), format!("0123456789ab.{}", "cd".repeat(16)));
        for bad in ["", "SK1.x.y.z", &s.replace("SK1", "SK2"), &format!("{s}.extra")] {
            assert_eq!(JoinToken::parse(bad), Err(BadToken), "{bad}");
        }
    }
}
