//! The node's DNS resolver for its instances (as Docker's 127.0.0.11), on the bridge's
//! gateway address: the fleet's service names get their virtual address, any other name
//! goes to the host's own resolvers. Only instances on the bridge are answered, and each
//! only with the services it may reach.

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// How long an answer may be kept: short, so a service that moves is found again soon.
const TTL: u32 = 5;

/// What to do with a query.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// This answer.
    Answer(Vec<u8>),
    /// Not a name of ours: ask the upstream resolvers.
    Forward,
    /// Not a DNS query: nothing.
    Drop,
}

/// `msg`'s answer with `code` and nothing else.
fn refuse(msg: &Message, code: ResponseCode) -> Reply {
    let mut r = Message::error_msg(msg.metadata.id, msg.metadata.op_code, code);
    r.queries.clone_from(&msg.queries);
    r.to_vec().map(Reply::Answer).unwrap_or(Reply::Drop)
}

/// Answers `query` with `lookup`, which gives a name's addresses if it is a peer or a
/// service the asking instance may reach (none: not a name of ours). Only standard
/// queries of one question are answered or forwarded: what else a resolver may take
/// (updates, notifies) an instance does not send to the host's.
pub fn answer(query: &[u8], lookup: impl Fn(&str) -> Vec<Ipv4Addr>) -> Reply {
    let Ok(msg) = Message::from_vec(query) else { return Reply::Drop };
    if msg.metadata.message_type != MessageType::Query {
        return Reply::Drop;
    }
    if msg.metadata.op_code != OpCode::Query {
        return refuse(&msg, ResponseCode::NotImp);
    }
    let [q] = msg.queries.as_slice() else { return refuse(&msg, ResponseCode::FormErr) };
    if q.query_class() != DNSClass::IN {
        return Reply::Forward;
    }
    let ips = lookup(&q.name().to_ascii());
    if ips.is_empty() {
        return Reply::Forward;
    }
    let mut resp = Message::response(msg.metadata.id, msg.metadata.op_code);
    resp.metadata.recursion_desired = msg.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.metadata.authoritative = true;
    resp.metadata.response_code = ResponseCode::NoError;
    resp.queries.push(q.clone());
    // A name of ours has an IPv4 address and nothing else: other types get an empty
    // answer (not an error, which would end the client's search for the A record).
    if q.query_type() == RecordType::A {
        for ip in ips {
            resp.answers.push(Record::from_rdata(q.name().clone(), TTL, RData::A(A(ip))));
        }
    }
    match resp.to_vec() {
        Ok(b) => Reply::Answer(b),
        Err(_) => Reply::Drop,
    }
}

/// The host's resolvers (loopback ones too: the agent runs on the host), read at each
/// forward (a DHCP lease may change them).
pub fn upstreams() -> Vec<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some("nameserver")).then(|| it.next()).flatten()
        })
        .filter_map(|a| a.parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .take(3)
        .collect()
}

/// Asks the upstream resolvers (`own`, else the host's) in turn (2 s each) and gives the
/// first answer.
async fn forward(query: &[u8], own: &[SocketAddr]) -> Option<Vec<u8>> {
    for up in or_hosts(own) {
        let bind: SocketAddr = if up.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().ok()?;
        let Ok(sock) = tokio::net::UdpSocket::bind(bind).await else { continue };
        if sock.send_to(query, up).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 4096];
        if let Ok(Ok((n, from))) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf)).await {
            if from == up {
                buf.truncate(n);
                return Some(buf);
            }
        }
    }
    None
}

/// Asks the upstream resolvers over TCP (a truncated answer's retry), in turn.
async fn forward_tcp(query: &[u8], own: &[SocketAddr]) -> Option<Vec<u8>> {
    use tokio::io::AsyncWriteExt;
    for up in or_hosts(own) {
        let ask = async {
            let mut c = tokio::net::TcpStream::connect(up).await?;
            c.write_all(&framed(query)).await?;
            read_framed(&mut c).await
        };
        if let Ok(Ok(b)) = tokio::time::timeout(Duration::from_secs(3), ask).await {
            return Some(b);
        }
    }
    None
}

/// A caller's own name servers (its deployment's `dns`), or the host's.
fn or_hosts(own: &[SocketAddr]) -> Vec<SocketAddr> {
    if own.is_empty() {
        upstreams()
    } else {
        own.iter().take(3).copied().collect()
    }
}

/// A message as DNS over TCP sends it: its length (two bytes), then itself.
fn framed(m: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(m.len() + 2);
    out.extend_from_slice(&(m.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
    out.extend_from_slice(&m[..m.len().min(usize::from(u16::MAX))]);
    out
}

async fn read_framed<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let n = s.read_u16().await?;
    let mut b = vec![0u8; usize::from(n)];
    s.read_exact(&mut b).await?;
    Ok(b)
}

/// What a query gets, wherever it came from: our answer, an upstream's (over `tcp` or
/// UDP), or SERVFAIL when none answered.
async fn reply_to(
    query: &[u8],
    lookup: impl Fn(&str) -> Vec<Ipv4Addr>,
    own: &[SocketAddr],
    tcp: bool,
) -> Option<Vec<u8>> {
    match answer(query, lookup) {
        Reply::Answer(b) => Some(b),
        Reply::Drop => None,
        Reply::Forward => {
            let got = if tcp { forward_tcp(query, own).await } else { forward(query, own).await };
            match got {
                Some(b) => Some(b),
                // No upstream answered: say so, rather than let the client wait.
                None => Message::from_vec(query).ok().and_then(|q| match refuse(&q, ResponseCode::ServFail) {
                    Reply::Answer(b) => Some(b),
                    _ => None,
                }),
            }
        }
    }
}

/// DNS over TCP on `listener` (answers too long for UDP are asked again this way): the
/// same answers, at most 16 queries a connection, 10 s of silence ends it.
pub async fn serve_tcp(listener: tokio::net::TcpListener, lookup: Lookup, client_of: ClientOf) {
    use tokio::io::AsyncWriteExt;
    let open = super::per_address(usize::MAX, QUERIES_PER_CLIENT);
    loop {
        let Ok((mut conn, from)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let SocketAddr::V4(from4) = from else { continue };
        let client = *from4.ip();
        let Some(own) = client_of(client) else { continue };
        let Ok(taken) = open.try_enter(std::net::IpAddr::V4(client)) else { continue };
        let lookup = Arc::clone(&lookup);
        tokio::spawn(async move {
            let _taken = taken;
            for _ in 0..16 {
                let Ok(Ok(query)) = tokio::time::timeout(Duration::from_secs(10), read_framed(&mut conn)).await else {
                    return;
                };
                let Some(b) = reply_to(&query, |name| lookup(client, name), &own, true).await else { return };
                if conn.write_all(&framed(&b)).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// The addresses a name has for the instance at an address.
pub type Lookup = Arc<dyn Fn(Ipv4Addr, &str) -> Vec<Ipv4Addr> + Send + Sync>;

/// Whether an address is an instance's, and if so its own name servers (empty: the host's).
pub type ClientOf = Arc<dyn Fn(Ipv4Addr) -> Option<Vec<SocketAddr>> + Send + Sync>;

/// Queries one instance may have in flight (past that they are dropped, as a resolver
/// under load drops): one asking slow names waits for its own, not its neighbours'.
const QUERIES_PER_CLIENT: usize = 8;
/// How long a query from an address the node does not know yet waits for it to be known
/// (an instance starting asks before the catalog has it).
const UNKNOWN_WAIT: Duration = Duration::from_millis(300);

/// Serves queries on `socket` until the task is dropped. `lookup(client, name)`: the
/// addresses `name` has for the instance at `client`; `client_of`: whether an address is
/// an instance's (others are not answered at all), and where its other names are asked.
pub async fn serve(socket: tokio::net::UdpSocket, lookup: Lookup, client_of: ClientOf) {
    let socket = Arc::new(socket);
    let in_flight = super::per_address(usize::MAX, QUERIES_PER_CLIENT);
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("dns: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let SocketAddr::V4(from4) = from else { continue };
        let client = *from4.ip();
        let Ok(slot) = in_flight.try_enter(std::net::IpAddr::V4(client)) else { continue };
        let (socket, lookup, client_of, query) =
            (Arc::clone(&socket), Arc::clone(&lookup), Arc::clone(&client_of), buf[..n].to_vec());
        tokio::spawn(async move {
            let _slot = slot;
            let own = match client_of(client) {
                Some(own) => own,
                None => {
                    tokio::time::sleep(UNKNOWN_WAIT).await;
                    let Some(own) = client_of(client) else { return };
                    own
                }
            };
            if let Some(b) = reply_to(&query, |name| lookup(client, name), &own, false).await {
                let _ = socket.send_to(&b, from).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::new(4242, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.queries.push(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    fn lookup(name: &str) -> Vec<Ipv4Addr> {
        match name.trim_end_matches('.') {
            "db" => vec![Ipv4Addr::new(10, 213, 130, 7)],
            "web" => vec![Ipv4Addr::new(10, 213, 0, 2), Ipv4Addr::new(10, 213, 0, 3)],
            _ => vec![],
        }
    }

    #[test]
    fn a_service_name_gets_its_virtual_address_and_others_go_upstream() {
        let Reply::Answer(b) = answer(&query("db.", RecordType::A), lookup) else { panic!("no answer") };
        let m = Message::from_vec(&b).unwrap();
        assert_eq!((m.metadata.id, m.metadata.message_type), (4242, MessageType::Response));
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(m.answers.len(), 1);
        assert_eq!(m.answers[0].data, RData::A(A(Ipv4Addr::new(10, 213, 130, 7))));
        assert_eq!(m.answers[0].ttl, TTL);
        // AAAA for a service: an empty answer, not NXDOMAIN.
        let Reply::Answer(b) = answer(&query("db.", RecordType::AAAA), lookup) else { panic!("no answer") };
        let m = Message::from_vec(&b).unwrap();
        assert!(m.answers.is_empty() && m.metadata.response_code == ResponseCode::NoError);
        // Instances of a peer on this node: each of their addresses.
        let Reply::Answer(b) = answer(&query("web.", RecordType::A), lookup) else { panic!("no answer") };
        assert_eq!(Message::from_vec(&b).unwrap().answers.len(), 2);
        assert_eq!(answer(&query("example.org.", RecordType::A), lookup), Reply::Forward);
        assert_eq!(answer(b"\x00\x01garbage", lookup), Reply::Drop);
        // An update is not forwarded to the host's resolvers: refused here.
        let mut update = Message::new(7, MessageType::Query, OpCode::Update);
        update.queries.push(Query::query(Name::from_ascii("db.").unwrap(), RecordType::SOA));
        let Reply::Answer(b) = answer(&update.to_vec().unwrap(), lookup) else { panic!("not refused") };
        assert_eq!(Message::from_vec(&b).unwrap().metadata.response_code, ResponseCode::NotImp);
        // Two questions at once: refused, not forwarded.
        let mut two = Message::new(8, MessageType::Query, OpCode::Query);
        two.queries.push(Query::query(Name::from_ascii("a.").unwrap(), RecordType::A));
        two.queries.push(Query::query(Name::from_ascii("b.").unwrap(), RecordType::A));
        let Reply::Answer(b) = answer(&two.to_vec().unwrap(), lookup) else { panic!("not refused") };
        assert_eq!(Message::from_vec(&b).unwrap().metadata.response_code, ResponseCode::FormErr);
    }

    #[tokio::test]
    async fn over_tcp_queries_are_framed_by_their_length() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = l.local_addr().unwrap();
        let lookup: Lookup = Arc::new(|_, name: &str| lookup(name));
        tokio::spawn(serve_tcp(l, lookup, Arc::new(|c: Ipv4Addr| c.is_loopback().then(Vec::new))));
        let mut c = tokio::net::TcpStream::connect(at).await.unwrap();
        for id in [1u16, 2] {
            let mut q = Message::new(id, MessageType::Query, OpCode::Query);
            q.queries.push(Query::query(Name::from_ascii("web.").unwrap(), RecordType::A));
            c.write_all(&framed(&q.to_vec().unwrap())).await.unwrap();
            let m = Message::from_vec(&read_framed(&mut c).await.unwrap()).unwrap();
            assert_eq!((m.metadata.id, m.answers.len()), (id, 2), "two queries on one connection");
        }
    }

    #[test]
    fn responses_are_not_answered() {
        let Reply::Answer(b) = answer(&query("db.", RecordType::A), lookup) else { panic!("no answer") };
        assert_eq!(answer(&b, lookup), Reply::Drop, "an answer sent to us is no question");
    }
}
