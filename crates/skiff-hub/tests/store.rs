//! The hub's store, the same checks on each backend: SQLite (the embedded default) and,
//! with the `etcd` feature, a real etcd (Debian's `etcd-server`) started for the test.

#![allow(clippy::unwrap_used)] // tests may panic on setup failures

use skiff_hub::schedule::Slot;
use skiff_hub::store::*;
use skiff_model::rollout::RolloutState;
use skiff_model::Deployment;
use std::sync::Arc;

/// A store to check, and a way to open it again (a hub restarted on the same state).
struct Backend {
    name: &'static str,
    open: Box<dyn Fn() -> Arc<dyn Store>>,
    _keep: Box<dyn std::any::Any>,
}

fn backends() -> Vec<Backend> {
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("hub.db");
    let mut v = vec![Backend {
        name: "sqlite",
        open: Box::new(move || Arc::new(SqliteStore::open(&path).unwrap()) as Arc<dyn Store>),
        _keep: Box::new(t),
    }];
    #[cfg(feature = "etcd")]
    {
        let e = skiff_testkit::etcd::Etcd::start(1).unwrap();
        let target = skiff_hub::etcd::EtcdTarget::parse(&e.url("/test"), None).unwrap();
        v.push(Backend {
            name: "etcd",
            open: Box::new(move || Arc::new(skiff_hub::etcd::EtcdStore::open(&target).unwrap()) as Arc<dyn Store>),
            _keep: Box::new(e),
        });
    }
    v
}

/// Runs `check` on every backend, saying which one failed.
fn on_each(check: impl Fn(&Backend)) {
    for b in backends() {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&b)));
        if let Err(e) = r {
            eprintln!("on the {} store:", b.name);
            std::panic::resume_unwind(e);
        }
    }
}

#[test]
fn history_keeps_ten_templates_not_scales() {
    on_each(|b| {
        let s = (b.open)();
        let mut d = Deployment::new("web", "img:0");
        s.apply(std::slice::from_ref(&d), None, false, 1_000).unwrap();
        d.replicas = 3;
        s.apply(std::slice::from_ref(&d), None, false, 2_000).unwrap();
        let h = s.history("web").unwrap();
        assert_eq!(h.len(), 1, "a scale is not a revision");
        assert_eq!(h[0].state, RolloutState::Progressing);
        assert_eq!(h[0].created_ms, 1_000, "a revision is stamped with the time it was given");
        d.image = "img:dry".into();
        s.apply(std::slice::from_ref(&d), None, true, 2_000).unwrap();
        assert_eq!(s.history("web").unwrap().len(), 1, "a dry run records nothing");
        for i in 1..=11 {
            d.image = format!("img:{i}");
            s.apply(std::slice::from_ref(&d), None, false, 2_000 + i).unwrap();
        }
        let h = s.history("web").unwrap();
        assert_eq!(h.len(), 10);
        assert_eq!((h[0].revision, h[9].revision, h[9].image.as_str()), (3, 12, "img:11"));
        assert_eq!(h[9].created_ms, 2_011);
        assert!(h[..9].iter().all(|r| r.state == RolloutState::Superseded));
        assert_eq!(s.progressing().unwrap(), ["web"]);
        s.set_rollout("web", 12, RolloutState::Failed, Some("apply"), Some("web-1 unhealthy")).unwrap();
        assert!(s.progressing().unwrap().is_empty(), "only the newest revision counts");
        let last = s.history("web").unwrap().pop().unwrap();
        assert_eq!((last.state, last.message.as_deref()), (RolloutState::Failed, Some("web-1 unhealthy")));
        s.delete("web").unwrap();
        assert!(s.history("web").unwrap().is_empty());
    });
}

#[test]
fn an_update_on_several_nodes_starts_with_its_first_wave() {
    on_each(|b| {
        let s = (b.open)();
        let mut d = Deployment::new("web", "img:1");
        d.replicas = 3;
        s.apply(std::slice::from_ref(&d), None, false, 1).unwrap();
        let slot = |i: u32, n: &str| Slot { deployment: "web".into(), index: i, node: n.into() };
        s.set_slots(&[slot(1, "b"), slot(2, "a"), slot(3, "c")]).unwrap();
        assert_eq!(s.history("web").unwrap()[0].nodes, None, "a new deployment goes everywhere");
        d.image = "img:2".into();
        s.apply(std::slice::from_ref(&d), None, false, 1).unwrap();
        assert_eq!(s.history("web").unwrap()[1].nodes, Some(vec!["a".to_string()]));
        let rev = s.revision().unwrap();
        assert!(s.set_wave("web", 2, &["a".into(), "b".into()]).unwrap() > rev, "a wave changes assignments");
        assert_eq!(s.history("web").unwrap()[1].nodes.as_ref().map(Vec::len), Some(2));
    });
}

#[test]
fn apply_is_atomic_and_revisioned() {
    on_each(|b| {
        let s = (b.open)();
        let mut a = Deployment::new("a", "img");
        a.stack = "demo".into();
        let mut b = Deployment::new("b", "img");
        b.stack = "demo".into();
        let r = s.apply(&[a.clone(), b.clone()], Some("demo"), false, 1).unwrap();
        assert_eq!(r.created, ["a", "b"]);
        assert_eq!(s.revision().unwrap(), 2);
        let r = s.apply(&[a.clone()], Some("demo"), true, 1).unwrap();
        assert_eq!((r.unchanged.as_slice(), r.deleted.as_slice()), (&["a".to_string()][..], &["b".to_string()][..]));
        assert_eq!(s.list().unwrap().len(), 2, "dry run changed nothing");
        a.replicas = 3;
        let r = s.apply(&[a], Some("demo"), false, 1).unwrap();
        assert_eq!((r.updated.len(), r.deleted.len()), (1, 1));
        assert_eq!(s.get("a").unwrap().unwrap().revision, 3);
        assert!(s.delete("a").unwrap());
        assert!(!s.delete("a").unwrap());
        // Several at once (a pod): those that were there, in one change.
        let (c, d) = (Deployment::new("c", "img"), Deployment::new("d", "img"));
        s.apply(&[c, d], None, false, 2).unwrap();
        let before = s.revision().unwrap();
        let gone = s.delete_all(&["c".to_string(), "nope".to_string(), "d".to_string()]).unwrap();
        assert_eq!(gone, ["c", "d"]);
        assert!(s.list().unwrap().is_empty());
        assert!(s.revision().unwrap() > before);
    });
}

#[test]
fn tokens_and_nodes_persist_and_revoke() {
    on_each(|b| {
        let s = (b.open)();
        let tok = TokenRecord {
            id: "abc".into(),
            secret_sha256: "h".into(),
            created_ms: 1,
            expires_ms: Some(100),
            revoked: false,
            role: TokenRole::Join,
            max_uses: Some(2),
            used: 0,
            replace: Some("pi".into()),
        };
        s.create_token(&tok).unwrap();
        assert!(s.create_token(&tok).is_err(), "ids are unique");
        let info = NodeSpec { os: "linux".into(), arch: "arm64".into(), cpu_millis: 4000, ..Default::default() };
        let join = |name, serial, now_ms| NodeJoin {
            token_id: "abc",
            name,
            serial,
            key_sha256: serial,
            not_after_ms: 50,
            info: &info,
            now_ms,
        };
        let fresh = Joined { replaced: false, retry: false };
        assert_eq!(s.join_node(&join("pi", "01", 5)).unwrap(), Ok(fresh.clone()));
        assert_eq!(
            s.join_node(&join("pi", "02", 6)).unwrap(),
            Ok(Joined { replaced: true, retry: false }),
            "made to replace pi"
        );
        assert!(s.is_revoked("01").unwrap() && !s.is_revoked("02").unwrap());
        assert_eq!(s.join_node(&join("pi", "03", 7)).unwrap(), Err(JoinRefused::TokenUsedUp("abc".into(), 2)));
        drop(s);
        let s = (b.open)();
        assert_eq!(s.token("abc").unwrap(), Some(TokenRecord { used: 2, ..tok.clone() }));
        let n = s.node("pi").unwrap().unwrap();
        assert_eq!((n.cert_serial.as_str(), n.info.arch.as_str(), n.not_after_ms), ("02", "arm64", Some(50)));
        // A renewed certificate counts once presented; the one before is then revoked.
        s.renew_cert("pi", "04", 90, "k4").unwrap();
        s.promote_cert("pi", "04", 8).unwrap();
        let n = s.node("pi").unwrap().unwrap();
        assert_eq!((n.cert_serial.as_str(), n.not_after_ms, n.next_serial), ("04", Some(90), None));
        assert!(s.is_revoked("02").unwrap());
        assert!(s.revoke_token("abc").unwrap() && s.token("abc").unwrap().unwrap().revoked);
        assert!(!s.revoke_token("nope").unwrap());
        assert!(s.revoke_node("pi", 9).unwrap() && s.nodes().unwrap().is_empty());
        assert!(s.is_revoked("04").unwrap(), "a deleted node's certificate stays revoked");
        let other = TokenRecord { id: "def".into(), replace: None, max_uses: None, ..tok };
        s.create_token(&other).unwrap();
        let again = NodeJoin {
            token_id: "def",
            name: "pi",
            serial: "05",
            key_sha256: "k5",
            not_after_ms: 50,
            info: &info,
            now_ms: 10,
        };
        assert_eq!(s.join_node(&again).unwrap(), Ok(fresh), "a deleted node's name is free");
        let taken = NodeJoin { serial: "06", key_sha256: "k6", ..again };
        assert_eq!(s.join_node(&taken).unwrap(), Err(JoinRefused::NameTaken("pi".into())));
        let retried = NodeJoin { serial: "07", key_sha256: "k5", ..again };
        assert_eq!(
            s.join_node(&retried).unwrap(),
            Ok(Joined { replaced: false, retry: true }),
            "the same key again: its answer was lost"
        );
        assert!(s.is_revoked("05").unwrap(), "the certificate it never received is revoked");
        let late = NodeJoin { name: "pj", now_ms: 100, ..taken };
        assert_eq!(s.join_node(&late).unwrap(), Err(JoinRefused::TokenExpired("def".into())));
    });
}

/// A dump holds the whole fleet: restored into an empty store of either kind it reads
/// back the same (the move from SQLite to etcd and back); a store that holds a fleet
/// refuses it and keeps what it had.
#[test]
fn a_dump_fills_an_empty_store_of_either_kind_and_a_full_one_refuses_it() {
    on_each(|b| {
        let s = (b.open)();
        let mut d = Deployment::new("web", "img:1");
        d.replicas = 2;
        s.apply(std::slice::from_ref(&d), None, false, 10).unwrap();
        d.image = "img:2".into();
        s.apply(std::slice::from_ref(&d), None, false, 20).unwrap();
        s.set_rollout("web", 2, RolloutState::Failed, None, Some("web-1 unhealthy")).unwrap();
        let tok = TokenRecord {
            id: "tok".into(),
            secret_sha256: "h".into(),
            created_ms: 1,
            expires_ms: None,
            revoked: false,
            role: TokenRole::Join,
            max_uses: None,
            used: 0,
            replace: None,
        };
        s.create_token(&tok).unwrap();
        let info = NodeSpec { arch: "arm64".into(), ..Default::default() };
        let join = |name, serial| NodeJoin {
            token_id: "tok",
            name,
            serial,
            key_sha256: serial,
            not_after_ms: 99,
            info: &info,
            now_ms: 5,
        };
        s.join_node(&join("pi", "01")).unwrap().unwrap();
        s.join_node(&join("pj", "02")).unwrap().unwrap();
        s.renew_cert("pi", "03", 199, "k3").unwrap();
        s.revoke_node("pj", 6).unwrap();
        s.set_slots(&[
            Slot { deployment: "web".into(), index: 1, node: "pi".into() },
            Slot { deployment: "web".into(), index: 2, node: "pi".into() },
        ])
        .unwrap();
        s.put_state("autoscaler/web", Some("{\"recommendations\":[[1,2]]}")).unwrap();
        s.put_state("autoscaler/gone", Some("x")).unwrap();
        s.put_state("autoscaler/gone", None).unwrap();
        assert_eq!(s.states("autoscaler/").unwrap().len(), 1);
        // Several at once, and a prefix that is not a whole directory.
        let changes = [
            ("events/a/1".to_string(), Some("one".to_string())),
            ("events/ab/2".to_string(), Some("two".to_string())),
            ("events/a/3".to_string(), Some("three".to_string())),
            ("events/a/3".to_string(), None),
        ];
        s.put_states(&changes).unwrap();
        assert_eq!(s.states("events/a/").unwrap(), [("events/a/1".to_string(), "one".to_string())], "{}", b.name);
        assert_eq!(s.states("events/a").unwrap().len(), 2, "{}", b.name);
        assert_eq!(s.states("events/").unwrap().len(), 2);
        let dump = s.export().unwrap();
        assert_eq!((dump.deployments.len(), dump.nodes.len(), dump.revoked.len()), (1, 1, 1), "{dump:#?}");
        assert_eq!(dump.state.len(), 3);
        assert_eq!(dump.history["web"].len(), 2);
        assert_eq!(dump.nodes[0].next_key_sha256.as_deref(), Some("k3"));
        let json = serde_json::to_string(&dump).unwrap();
        let dump: Dump = serde_json::from_str(&json).unwrap();

        for target in backends() {
            let t = (target.open)();
            t.import(&dump).unwrap_or_else(|e| panic!("into {}: {e}", target.name));
            assert_eq!(t.export().unwrap(), dump, "{} -> {}", b.name, target.name);
            assert_eq!(t.revision().unwrap(), s.revision().unwrap());
            assert!(t.is_revoked("02").unwrap() && !t.is_revoked("01").unwrap());
            // The moved store goes on as the old one would: pi's repeated join is a retry.
            assert_eq!(t.join_node(&join("pi", "01")).unwrap(), Ok(Joined { replaced: false, retry: true }));
            let e = t.import(&dump).unwrap_err();
            assert!(matches!(e, StoreError::NotEmpty(_)), "{e}");
        }
        let e = s.import(&Dump { format: 9, ..Dump::default() }).unwrap_err().to_string();
        assert!(e.contains("format 9"), "{e}");
    });
}

#[cfg(feature = "etcd")]
mod on_etcd {
    use super::*;
    use skiff_hub::etcd::{EtcdStore, EtcdTarget};
    use skiff_hub::store::Lead;
    use skiff_testkit::etcd::Etcd;

    fn open(e: &Etcd, prefix: &str) -> Arc<EtcdStore> {
        Arc::new(EtcdStore::open(&EtcdTarget::parse(&e.url(prefix), None).unwrap()).unwrap())
    }

    fn token(id: &str, max_uses: Option<u32>) -> TokenRecord {
        TokenRecord {
            id: id.into(),
            secret_sha256: "h".into(),
            created_ms: 1,
            expires_ms: None,
            revoked: false,
            role: TokenRole::Join,
            max_uses,
            used: 0,
            replace: None,
        }
    }

    /// Joins node `name` with token `t`; whether the token let it.
    fn join(s: &EtcdStore, name: &str, info: &NodeSpec) -> bool {
        let j = NodeJoin { token_id: "t", name, serial: name, key_sha256: name, not_after_ms: 9, info, now_ms: 1 };
        s.join_node(&j).unwrap().is_ok()
    }

    /// Two hubs on one etcd: each sees what the other wrote, and writes made at the same
    /// time are all kept (every apply bumped the revision once; a token's uses are never
    /// exceeded, however the joins interleave).
    #[test]
    fn two_hubs_share_one_state_and_lose_no_write_made_at_the_same_time() {
        let e = Etcd::start(1).unwrap();
        let (a, b) = (open(&e, "/fleet"), open(&e, "/fleet"));
        a.create_token(&token("t", Some(5))).unwrap();
        assert!(matches!(b.create_token(&token("t", None)), Err(StoreError::Exists(_))), "ids are unique");
        let info = NodeSpec::default();
        let writers: Vec<_> = [("a", Arc::clone(&a)), ("b", Arc::clone(&b))]
            .into_iter()
            .map(|(hub, s)| {
                let info = info.clone();
                std::thread::spawn(move || {
                    let mut joined = 0;
                    for i in 0..10 {
                        let d = Deployment::new(format!("{hub}{i}"), "img");
                        s.apply(&[d], None, false, i).unwrap();
                        joined += usize::from(join(&s, &format!("{hub}-node{i}"), &info));
                    }
                    joined
                })
            })
            .collect();
        let joined: usize = writers.into_iter().map(|w| w.join().unwrap()).sum();
        assert_eq!(joined, 5, "the token's five uses, no more");
        assert_eq!(a.token("t").unwrap().unwrap().used, 5);
        assert_eq!(a.revision().unwrap(), 20 + 5, "20 applies and 5 joins, each bumped once");
        let names = |s: &EtcdStore| s.list().unwrap().into_iter().map(|d| d.spec.name).collect::<Vec<_>>();
        assert_eq!(names(&a).len(), 20);
        assert_eq!(names(&a), names(&b));
        assert_eq!(a.nodes().unwrap(), b.nodes().unwrap());
        assert_eq!(b.history("a3").unwrap().len(), 1);
        assert_eq!(b.progressing().unwrap().len(), 20);

        // Another prefix is another fleet.
        let other = open(&e, "/other");
        assert!(other.list().unwrap().is_empty() && other.revision().unwrap() == 0);
    }

    /// Three hubs joining nodes as fast as they can, sixteen at a time each (all hubs of a
    /// store serve joins): every join goes through, none gives up for the others' writes
    /// getting in between.
    #[test]
    fn many_hubs_joining_at_once_all_get_through() {
        let e = Etcd::start(1).unwrap();
        let hubs = [open(&e, "/busy"), open(&e, "/busy"), open(&e, "/busy")];
        hubs[0].create_token(&token("t", None)).unwrap();
        let info = NodeSpec::default();
        let writers: Vec<_> = hubs
            .iter()
            .enumerate()
            .flat_map(|(h, s)| (0..16).map(move |t| (h, t, Arc::clone(s))))
            .map(|(h, t, s)| {
                let info = info.clone();
                std::thread::spawn(move || {
                    for i in 0..10 {
                        assert!(join(&s, &format!("h{h}-t{t}-n{i}"), &info));
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        assert_eq!(hubs[2].nodes().unwrap().len(), 3 * 16 * 10);
        assert_eq!(hubs[1].token("t").unwrap().unwrap().used, 3 * 16 * 10);
    }

    /// A hub's list of nodes is current the moment another hub's join or removal lands
    /// (each hub keeps the records by a watch, and reads them once it has delivered the
    /// marker every change of a record rewrites), and listing them again reads that
    /// marker, not every record.
    #[test]
    fn a_hubs_node_list_is_current_at_once_and_not_read_whole_each_time() {
        let e = Etcd::start(1).unwrap();
        let (a, b) = (open(&e, "/watched"), open(&e, "/watched"));
        a.create_token(&token("t", None)).unwrap();
        let info = NodeSpec {
            labels: (0..20).map(|i| (format!("label-{i}"), "x".repeat(50))).collect(),
            ..Default::default()
        };
        for i in 0..150 {
            let name = format!("n{i}");
            assert!(join(&a, &name, &info));
            assert!(b.nodes().unwrap().iter().any(|n| n.name == name), "{name} listed by the other hub at once");
            assert!(b.node(&name).unwrap().is_some(), "{name} found by the other hub at once");
        }
        assert!(b.revoke_node("n7", 2).unwrap());
        assert!(!a.nodes().unwrap().iter().any(|n| n.name == "n7"), "gone at the other hub at once");
        assert!(a.node("n7").unwrap().is_none(), "and not found there");
        let whole = serde_json::to_vec(&a.nodes().unwrap()).unwrap().len() as f64;
        let sent = || e.metric("etcd_network_client_grpc_sent_bytes_total");
        let before = sent();
        for _ in 0..20 {
            assert_eq!(a.nodes().unwrap().len(), 149);
        }
        let per_list = (sent() - before) / 20.0;
        assert!(per_list < whole / 20.0, "etcd sent {per_list} B per list of {whole} B of records");
    }

    /// Another hub's placement is read at once, and a placement that did not change is
    /// not read again (every hub reads it at each move of the store; one deployment on
    /// 100,000 nodes is 2 MB).
    #[test]
    fn a_hubs_placement_is_current_at_once_and_not_read_whole_each_time() {
        let e = Etcd::start(1).unwrap();
        let (a, b) = (open(&e, "/placed"), open(&e, "/placed"));
        a.apply(&[Deployment::new("web", "img")], None, false, 1).unwrap();
        let placed = |n: u32, on: &str| -> Vec<Slot> {
            (1..=n).map(|i| Slot { deployment: "web".into(), index: i, node: format!("{on}-{i}") }).collect()
        };
        a.set_slots(&placed(2000, "pi")).unwrap();
        assert_eq!(*b.slots().unwrap(), placed(2000, "pi"));
        let whole = serde_json::to_vec(&*b.slots().unwrap()).unwrap().len() as f64;
        let sent = || e.metric("etcd_network_client_grpc_sent_bytes_total");
        let before = sent();
        for _ in 0..20 {
            assert_eq!(b.slots().unwrap().len(), 2000);
        }
        let per_read = (sent() - before) / 20.0;
        assert!(per_read < whole / 20.0, "etcd sent {per_read} B per read of a placement of {whole} B");
        for (n, on) in [(2000, "jetson"), (1999, "jetson"), (0, "")] {
            a.set_slots(&placed(n, on)).unwrap();
            assert_eq!(*b.slots().unwrap(), placed(n, on), "another hub's new placement ({n} on {on}) at once");
        }
    }

    /// A hub hears of another hub's change as it lands (a watch of the store's revision),
    /// not at its next look.
    #[test]
    fn a_hub_hears_of_another_hubs_change_as_it_lands() {
        let e = Etcd::start(1).unwrap();
        let (a, b) = (open(&e, "/moves"), open(&e, "/moves"));
        let mut moves = b.revisions().expect("a shared store says when it moves");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        for i in 0..3 {
            a.apply(&[Deployment::new(format!("web{i}"), "img")], None, false, i).unwrap();
            let now = a.revision().unwrap();
            let wait = moves.wait_for(|r| *r == now);
            let heard = rt.block_on(async { tokio::time::timeout(std::time::Duration::from_secs(5), wait).await });
            assert!(heard.is_ok(), "revision {now} heard by the other hub");
        }
    }

    /// etcd gone: reads and writes fail with an error naming it, within the store's
    /// timeout, and nothing is half-written; etcd back: the same store serves again.
    #[test]
    fn a_lost_etcd_is_a_clear_error_and_its_return_is_served() {
        let mut e = Etcd::start(1).unwrap();
        let s = open(&e, "/skiff");
        let d = Deployment::new("web", "img:1");
        s.apply(std::slice::from_ref(&d), None, false, 1).unwrap();
        s.set_slots(&[Slot { deployment: "web".into(), index: 1, node: "pi".into() }]).unwrap();
        let rev = s.revision().unwrap();
        e.kill(0);
        let t0 = std::time::Instant::now();
        let mut d2 = d.clone();
        d2.image = "img:2".into();
        let err = s.apply(&[d2.clone()], None, false, 2).unwrap_err().to_string();
        assert!(err.contains(&e.members[0].client), "names the endpoint: {err}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(30), "bounded, not a hang");
        assert!(s.list().is_err());
        e.restart(0).unwrap();
        let mut back = None;
        for _ in 0..100 {
            if let Ok(r) = s.revision() {
                back = Some(r);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert_eq!(back, Some(rev), "the failed apply wrote nothing");
        assert_eq!(s.get("web").unwrap().unwrap().spec.image, "img:1");
        s.apply(&[d2], None, false, 3).unwrap();
        assert_eq!(s.history("web").unwrap().len(), 2);
        let unreachable = EtcdStore::open(&EtcdTarget::parse("etcd://127.0.0.1:1", None).unwrap());
        let err = unreachable.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("127.0.0.1:1"), "{err}");
    }

    /// The member that leads etcd is lost, round after round: killed (its connections
    /// close) or hung (stopped, its connections left open). The store's reads and writes
    /// made at once all go through: etcd elects another leader, and a request that hung on
    /// a member meanwhile is sent again within the store's bound.
    #[test]
    fn losing_the_member_that_leads_etcd_fails_no_read_or_write() {
        let mut e = Etcd::start(3).unwrap();
        let s = open(&e, "/skiff");
        s.apply(&[Deployment::new("web", "img:0")], None, false, 1).unwrap();
        let rounds = 6;
        for round in 1..=rounds {
            let hang = round % 2 == 0;
            let leader = e.leader().expect("etcd has a leader");
            if hang {
                e.freeze(leader, false);
            } else {
                e.kill(leader);
            }
            let t0 = std::time::Instant::now();
            let how = if hang { "hung" } else { "killed" };
            let at = |what: &str, err: StoreError| format!("round {round} (leader {how}): {what}: {err}");
            let rev = s.revision().unwrap_or_else(|err| panic!("{}", at("revision", err)));
            let now = s.get("web").unwrap_or_else(|err| panic!("{}", at("get", err))).unwrap();
            assert_eq!(now.spec.image, format!("img:{}", round - 1));
            let d = Deployment::new("web", format!("img:{round}"));
            s.apply(&[d], None, false, round + 1).unwrap_or_else(|err| panic!("{}", at("apply", err)));
            assert_eq!(s.revision().unwrap(), rev + 1, "round {round}: the apply landed once");
            eprintln!("leader {how}: read, read, wrote, read in {:?}", t0.elapsed());
            if hang {
                e.freeze(leader, true);
            } else {
                e.restart(leader).unwrap();
            }
        }
        assert_eq!(s.history("web").unwrap().len(), rounds as usize + 1);
    }

    fn wait_lead(rx: &tokio::sync::watch::Receiver<Lead>, want: impl Fn(&Lead) -> bool) -> Lead {
        for _ in 0..200 {
            let now = rx.borrow().clone();
            if want(&now) {
                return now;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("lead still {:?}", rx.borrow())
    }

    /// One hub leads a store; another stands by, naming it. A leader whose lease is gone
    /// (given up, or expired while etcd did not hear from it) is fenced off: its writes
    /// are refused, the new leader's go through. Shared values are the first hub's.
    #[test]
    fn one_hub_leads_and_a_deposed_one_cannot_write() {
        let e = Etcd::start(1).unwrap();
        let (a, b) = (open(&e, "/f"), open(&e, "/f"));
        let ttl = std::time::Duration::from_secs(2);
        let la = a.campaign("hub-a", ttl).unwrap();
        wait_lead(&la, |l| *l == Lead::Active);
        let lb = b.campaign("hub-b", ttl).unwrap();
        wait_lead(&lb, |l| *l == Lead::Standby(Some("hub-a".into())));
        a.apply(&[Deployment::new("web", "img:1")], None, false, 1).unwrap();
        assert_eq!(a.shared("ca", "a's").unwrap(), "a's");
        assert_eq!(b.shared("ca", "b's").unwrap(), "a's", "the first hub's CA is everyone's");

        a.resign();
        wait_lead(&lb, |l| *l == Lead::Active);
        wait_lead(&la, |l| matches!(l, Lead::Lost(_)));
        let err = a.apply(&[Deployment::new("web", "img:2")], None, false, 2).unwrap_err().to_string();
        assert!(err.contains("no longer the active one"), "{err}");
        // State (events, controllers' memory) is fenced the same way, though written
        // without the store's lock.
        let err = a.put_state("events/x", Some("deposed")).unwrap_err().to_string();
        assert!(err.contains("no longer the active one"), "{err}");
        b.put_state("events/x", Some("active")).unwrap();
        assert_eq!(a.states("events/").unwrap(), [("events/x".to_string(), "active".to_string())]);
        b.apply(&[Deployment::new("web", "img:3")], None, false, 3).unwrap();
        assert_eq!(a.get("web").unwrap().unwrap().spec.image, "img:3", "reads still work");

        // A restore into an empty prefix that a hub already leads is refused.
        let g = open(&e, "/g");
        let lg = g.campaign("hub-g", ttl).unwrap();
        wait_lead(&lg, |l| *l == Lead::Active);
        let e = open(&e, "/g").import(&b.export().unwrap()).unwrap_err().to_string();
        assert!(e.contains("a hub is running"), "{e}");
    }

    /// On etcd, secrets are sealed where etcd keeps them (its data, its traffic, a copy of
    /// its database): secret variables and files, the CA and the admin token every hub
    /// shares. Hubs with the same key read them; a hub with another key is refused.
    #[test]
    fn secrets_are_sealed_in_etcd_and_a_hub_with_another_key_is_refused() {
        use skiff_hub::seal::{SealedStore, SecretKey, SEALED};
        let e = Etcd::start(1).unwrap();
        let raw = open(&e, "/sealed");
        let sealed = |k: u8| SealedStore::new(raw.clone(), SecretKey::from_bytes(&[k; 32]));
        let a = sealed(7).unwrap();
        let mut d = Deployment::new("db", "img:1");
        d.env.insert("PASSWORD".into(), "hunter2-sealed".into());
        d.secret_env = vec!["PASSWORD".into()];
        a.apply(std::slice::from_ref(&d), None, false, 1).unwrap();
        assert_eq!(a.shared("ca", "-----BEGIN PRIVATE KEY----- ca").unwrap(), "-----BEGIN PRIVATE KEY----- ca");
        assert_eq!(a.get("db").unwrap().unwrap().spec, d);
        // What etcd holds.
        let kept = raw.get("db").unwrap().unwrap().spec.env["PASSWORD"].clone();
        assert!(kept.starts_with(SEALED) && !kept.contains("hunter2"), "{kept}");
        assert!(raw.history("db").unwrap()[0].spec.env["PASSWORD"].starts_with(SEALED));
        let ca = raw.shared_value("ca").unwrap().unwrap();
        assert!(ca.starts_with(SEALED) && !ca.contains("PRIVATE"), "{ca}");
        // A second hub with the same key reads them; one with its own key cannot start.
        let b = sealed(7).unwrap();
        assert_eq!(b.shared("ca", "b's own").unwrap(), "-----BEGIN PRIVATE KEY----- ca", "the first hub's CA");
        assert_eq!(b.get("db").unwrap().unwrap().spec, d);
        let err = sealed(8).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("sealed with secrets key") && err.contains("--secrets-key"), "{err}");
    }
}
