//! Signed images against a real `docker-registry`: `skiff image keygen/sign/verify`, and a
//! node whose policy (`images:` rules) enforces or warns — a signed image runs; an
//! unsigned one, one signed by another key, and one carrying another image's signature
//! are refused with an `Untrusted` event naming image, digest and reason; `warn` runs it
//! and says so; an image that reached the store without a pull meets the same rule.

#![allow(clippy::unwrap_used)] // tests may panic on setup failures

mod common;

use common::{wait_for, Node};
use skiff_model::InstanceState;
use std::time::Duration;

type R = anyhow::Result<()>;
const SEC: Duration = Duration::from_secs(1);

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// An image of busybox plus a file saying `tag`, so each tag has its own digest.
fn image(tag: &str) -> anyhow::Result<skiff_testkit::ImageBuilder> {
    let layer = skiff_testkit::LayerBuilder::new().file("version", 0o644, tag.as_bytes())?.finish()?;
    Ok(skiff_testkit::ImageBuilder::busybox()?.layer(layer))
}

/// Pushes `image(name)` to `reg` as `name`; its reference there.
fn push(reg: &skiff_testkit::registry::Registry, name: &str) -> anyhow::Result<String> {
    let layout = tempfile::tempdir()?;
    image(name)?.write_oci_layout(layout.path(), "x")?;
    reg.push(layout.path(), name)?;
    Ok(format!("127.0.0.1:{}/{name}", reg.port))
}

/// Copies the signature manifest of `from` (a digest) to the signature tag of `to` in the
/// same repository: an attacker re-using a signature made for another image.
fn copy_signature(port: u16, repo: &str, from: &str, to: &str) -> R {
    let tag = |d: &str| format!("sha256-{}.sig", d.trim_start_matches("sha256:"));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let c = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}/v2/{repo}/manifests");
        let mt = "application/vnd.oci.image.manifest.v1+json";
        let body = c.get(format!("{base}/{}", tag(from))).header("Accept", mt).send().await?.bytes().await?;
        let put = c.put(format!("{base}/{}", tag(to))).header("Content-Type", mt).body(body).send().await?;
        anyhow::ensure!(put.status().is_success(), "PUT: {}", put.status());
        Ok(())
    })
}

#[test]
fn signed_images_run_and_the_policy_refuses_or_warns_about_the_rest() -> R {
    skiff_testkit::require_registry_tools!();
    let reg = skiff_testkit::registry::Registry::start()?;
    let push = |name: &str| push(&reg, name);
    let (good, other_key, unsigned, reused, warned) =
        (push("fleet/app:1")?, push("fleet/app:2")?, push("fleet/plain:1")?, push("fleet/app:3")?, push("lab/app:1")?);
    let late = push("fleet/late:1")?;
    let mut n = Node::new()?;
    let keys = n.data().join("keys");
    std::fs::create_dir(&keys)?;
    let (fleet, other) = (keys.join("fleet"), keys.join("other"));
    n.ok(&["image", "keygen", "-o", fleet.to_str().unwrap()])?;
    n.ok(&["image", "keygen", "--ed25519", "-o", other.to_str().unwrap()])?;
    assert!(n.cli(&["image", "keygen", "-o", fleet.to_str().unwrap()])?.status.code() != Some(0), "no overwrite");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(keys.join("fleet.key"))?.permissions().mode() & 0o777, 0o600);

    // Sign: idempotent per key; verify answers per key.
    let fkey = keys.join("fleet.key");
    let out = n.ok(&["image", "sign", &good, "--key", fkey.to_str().unwrap()])?;
    assert!(out.contains("Signed") && out.contains(".sig"), "{out}");
    let again = n.ok(&["image", "sign", &good, "--key", fkey.to_str().unwrap()])?;
    assert!(again.contains("already carries"), "{again}");
    n.ok(&["image", "sign", &warned, "--key", fkey.to_str().unwrap()])?;
    n.ok(&["image", "sign", &other_key, "--key", keys.join("other.key").to_str().unwrap()])?;
    let fpub = keys.join("fleet.pub");
    let ok = n.ok(&["image", "verify", &good, "--key", fpub.to_str().unwrap()])?;
    assert!(ok.contains("verified"), "{ok}");
    let no = n.cli(&["image", "verify", &other_key, "--key", fpub.to_str().unwrap()])?;
    assert_eq!(no.status.code(), Some(1));
    assert!(stderr(&no).contains("no trusted key made the signature"), "{}", stderr(&no));
    let both = n.ok(&[
        "image",
        "verify",
        &other_key,
        "--key",
        fpub.to_str().unwrap(),
        "--key",
        keys.join("other.pub").to_str().unwrap(),
    ])?;
    assert!(both.contains("verified"), "{both}");

    // fleet/app:3 carries the signature of fleet/app:1.
    n.ok(&["image", "pull", &good])?;
    n.ok(&["image", "pull", &reused])?;
    let (good_digest, reused_digest) = (n.image_digest(&good)?, n.image_digest(&reused)?);
    n.ok(&["image", "rm", &reused])?;
    copy_signature(reg.port, "fleet/app", &good_digest, &reused_digest)?;

    // Pulled before it was signed: the node fetches the signature when it needs it.
    n.ok(&["image", "pull", &late])?;
    n.ok(&["image", "sign", &late, "--key", fkey.to_str().unwrap()])?;

    // An image that reaches the store without a pull (a file, a USB stick).
    n.load(&image("local")?, &format!("127.0.0.1:{}/fleet/local:1", reg.port))?;

    let policy = n.write(
        "policy.yaml",
        &format!(
            "images:\n  - match: \"127.0.0.1:{p}/fleet/**\"\n    keys: [{k}]\n  - match: \"127.0.0.1:{p}/lab/*\"\n    mode: warn\n    keys: [{o}]\n",
            p = reg.port,
            k = fpub.display(),
            o = keys.join("other.pub").display(),
        ),
    )?;
    n.up_with(None, &["--policy", policy.to_str().unwrap()])?;

    n.ok(&["run", &good, "--name", "good", "--restart", "always", "--", "sleep", "1000"])?;
    n.wait_running("good-1")?;

    n.ok(&["run", &late, "--name", "late", "--", "sleep", "1000"])?;
    n.wait_running("late-1")?;

    let refused = |name: &str, img: &str, why: &str| -> R {
        let out = n.cli(&["run", img, "--name", name, "--", "sleep", "1000"])?;
        let err = stderr(&out);
        assert!(!out.status.success(), "{name} ran");
        assert!(
            err.contains("refused by the image policy") && err.contains(why) && err.contains("sha256:"),
            "{name}: {err}"
        );
        let ev = n.events()?;
        let e = ev.iter().find(|e| e.reason == "Untrusted" && e.message.contains(img)).expect("an Untrusted event");
        assert!(e.message.contains(why), "{name}: {}", e.message);
        Ok(())
    };
    refused("unsigned", &unsigned, "no signature")?;
    refused("otherkey", &other_key, "no trusted key made the signature")?;
    refused("reused", &reused, &format!("the signature is for {good_digest}, not {reused_digest}"))?;
    refused("local", &format!("127.0.0.1:{}/fleet/local:1", reg.port), "no signature")?;
    // A refused pull stores nothing.
    assert!(n.cli(&["image", "inspect", &unsigned])?.status.code() != Some(0));

    // warn: runs, and the event says what is wrong.
    n.ok(&["run", &warned, "--name", "warned", "--", "sleep", "1000"])?;
    n.wait_running("warned-1")?;
    let ev = n.events()?;
    let e = ev.iter().find(|e| e.reason == "Untrusted" && e.message.contains(&warned)).expect("a warning event");
    assert!(e.message.contains("only warns") && e.message.contains("no trusted key"), "{}", e.message);

    // The signatures kept beside the image judge it again when a new agent starts it,
    // offline: the registry is gone, the agent restarted (workloads outlive it), and the
    // container killed, so the restart policy starts it anew.
    let reg_port = reg.port;
    drop(reg);
    n.terminate_up()?;
    n.up_with(None, &["--policy", policy.to_str().unwrap()])?;
    let before = n.wait_running("good-1")?;
    let pid = nix::unistd::Pid::from_raw(before.pid.unwrap_or_default());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)?;
    wait_for(60 * SEC, "good-1 started again", || {
        n.instance("good-1").ok().filter(|i| i.restarts > before.restarts && i.state == InstanceState::Running)
    })?;
    // ... while the new agent still refuses what is not signed, by any name: the loaded
    // image by its image ID, and under a tag no rule names.
    let local = format!("127.0.0.1:{}/fleet/local:1", reg_port);
    let id = {
        let v: serde_json::Value = serde_json::from_str(&n.ok(&["image", "inspect", &local])?)?;
        v["config_digest"].as_str().unwrap_or_default().trim_start_matches("sha256:")[..16].to_string()
    };
    for (name, img) in [("byid", id.as_str()), ("bydigest", &n.image_digest(&local)?)] {
        let out = n.cli(&["run", img, "--name", name, "--", "sleep", "1000"])?;
        let err = stderr(&out);
        assert!(!out.status.success() && err.contains("refused by the image policy"), "{name}: {err}");
    }
    Ok(())
}

#[test]
fn a_policy_with_a_mistake_is_refused_at_start_naming_the_field() -> R {
    let n = Node::bare()?;
    let bad = n.write("policy.yaml", "images:\n  - match: \"**\"\n    keys: [/nonexistent/k.pub]\n")?;
    let out = n.up_refused_with(None, &["--policy", bad.to_str().unwrap()])?;
    assert!(stderr(&out).contains("images[0].keys[0]: /nonexistent/k.pub"), "{}", stderr(&out));
    let bad = n.write("policy2.yaml", "images:\n  - match: \"**\"\n    mode: strict\n    keys: [/k]\n")?;
    let out = n.up_refused_with(None, &["--policy", bad.to_str().unwrap()])?;
    assert!(stderr(&out).contains("images[0].mode: \"strict\" is not one of enforce, warn"), "{}", stderr(&out));
    Ok(())
}

/// Notation beside cosign: `skiff image sign --cert` makes what `notation sign` makes (an
/// artifact referring to the image, listed in the referrers fallback tag this registry
/// needs); a node trusting the signer's root runs the image, and refuses an image signed
/// under another root, by an untrusted identity, or not at all.
#[test]
fn notation_signatures_are_made_found_and_judged() -> R {
    skiff_testkit::require_registry_tools!();
    let reg = skiff_testkit::registry::Registry::start()?;
    let push = |name: &str| push(&reg, name);
    let (good, rogue, intern, unsigned) =
        (push("vendor/app:1")?, push("vendor/app:2")?, push("vendor/app:3")?, push("vendor/app:4")?);
    let mut n = Node::new()?;
    let release = skiff_testkit::tls::code_signing("release")?;
    let other = skiff_testkit::tls::code_signing("release")?;
    let files = |p: &skiff_testkit::tls::CodeSigning, name: &str| -> anyhow::Result<(String, String, String)> {
        let key = n.write(&format!("{name}.key"), &p.key_pem)?;
        let chain = n.write(&format!("{name}.chain.pem"), &p.chain_pem)?;
        let root = n.write(&format!("{name}.root.pem"), &p.root_pem)?;
        Ok((key.display().to_string(), chain.display().to_string(), root.display().to_string()))
    };
    let (key, chain, root) = files(&release, "release")?;
    let (okey, ochain, _) = files(&other, "other")?;
    let out = n.ok(&["image", "sign", &good, "--key", &key, "--cert", &chain])?;
    assert!(out.contains("Signed") && out.contains("with Notation") && out.contains("/vendor/app@sha256:"), "{out}");
    n.ok(&["image", "sign", &rogue, "--key", &okey, "--cert", &ochain])?;
    // The intern's root is in the trust store too, but the intern is no trusted identity.
    let intern_pki = skiff_testkit::tls::code_signing("intern")?;
    let (ikey, ichain, iroot) = files(&intern_pki, "intern")?;
    n.ok(&["image", "sign", &intern, "--key", &ikey, "--cert", &ichain])?;
    // A key that is not the certificate's is refused before anything is pushed.
    let mismatch = n.cli(&["image", "sign", &unsigned, "--key", &okey, "--cert", &chain])?;
    assert!(!mismatch.status.success() && stderr(&mismatch).contains("not the one of the first certificate"));

    // `image verify` with a trust store.
    let ok = n.ok(&[
        "image",
        "verify",
        &good,
        "--trust-store",
        &root,
        "--trusted-identity",
        "x509.subject: O=skiff, CN=release",
    ])?;
    assert!(ok.contains("verified, signed by certificate") && ok.contains("CN=release"), "{ok}");
    let no = n.cli(&["image", "verify", &rogue, "--trust-store", &root])?;
    assert_eq!(no.status.code(), Some(1));
    assert!(stderr(&no).contains("does not lead to the trust store"), "{}", stderr(&no));

    let policy = n.write(
        "policy.yaml",
        &format!(
            "images:\n  - match: \"127.0.0.1:{p}/vendor/**\"\n    notation:\n      trust_store: [{root}, {iroot}]\n      identities: [\"x509.subject: C=US, O=skiff, CN=release\"]\n",
            p = reg.port,
        ),
    )?;
    n.up_with(None, &["--policy", policy.to_str().unwrap()])?;
    n.ok(&["run", &good, "--name", "good", "--", "sleep", "1000"])?;
    n.wait_running("good-1")?;
    for (name, img, why) in [
        ("rogue", &rogue, "does not lead to the trust store"),
        ("intern", &intern, "is not a trusted identity"),
        ("unsigned", &unsigned, "no signature"),
    ] {
        let out = n.cli(&["run", img, "--name", name, "--", "sleep", "1000"])?;
        let err = stderr(&out);
        assert!(
            !out.status.success() && err.contains("refused by the image policy") && err.contains(why),
            "{name}: {err}"
        );
    }
    // A deployment's own rule only adds to the node's: one that merely warns does not let
    // in what the node's policy refuses.
    let k = n.data().join("lenient");
    n.ok(&["image", "keygen", "-o", k.to_str().unwrap()])?;
    let lenient = format!("{}.pub", k.display());
    let out = n.cli(&[
        "run",
        &rogue,
        "--name",
        "lenient",
        "--verify-key",
        &lenient,
        "--verify-mode",
        "warn",
        "--",
        "sleep",
        "1000",
    ])?;
    let err = stderr(&out);
    assert!(!out.status.success() && err.contains("does not lead to the trust store"), "{err}");
    // The envelope is kept beside the image: a restarted agent judges it offline.
    drop(reg);
    n.terminate_up()?;
    n.up_with(None, &["--policy", policy.to_str().unwrap()])?;
    n.ok(&["run", &good, "--name", "again", "--", "sleep", "1000"])?;
    n.wait_running("again-1")?;
    Ok(())
}

/// A deployment's own rule (`skiff run --verify-key`, compose `x-skiff-signature`) binds
/// its image on a node whose policy names no image, and travels with the deployment.
#[test]
fn a_deployment_brings_its_own_signature_rule() -> R {
    skiff_testkit::require_registry_tools!();
    let reg = skiff_testkit::registry::Registry::start()?;
    let push = |name: &str| push(&reg, name);
    let (signed, unsigned) = (push("team/app:1")?, push("team/app:2")?);
    let mut n = Node::new()?;
    let k = n.data().join("team");
    n.ok(&["image", "keygen", "-o", k.to_str().unwrap()])?;
    let (key, public) = (format!("{}.key", k.display()), format!("{}.pub", k.display()));
    n.ok(&["image", "sign", &signed, "--key", &key])?;
    n.up_with(None, &[])?;

    n.ok(&["run", &signed, "--name", "good", "--verify-key", &public, "--", "sleep", "1000"])?;
    n.wait_running("good-1")?;
    // The rule is part of the deployment: its key, as PEM text.
    let all: Vec<serde_json::Value> = serde_json::from_str(&n.ok(&["get", "deployments", "-o", "json"])?)?;
    let d = &all.iter().find(|d| d["spec"]["name"] == "good").expect("the deployment")["spec"];
    assert!(d["signature"]["keys"][0].as_str().unwrap_or_default().contains("BEGIN PUBLIC KEY"), "{d}");

    let out = n.cli(&["run", &unsigned, "--name", "bad", "--verify-key", &public, "--", "sleep", "1000"])?;
    let err = stderr(&out);
    assert!(!out.status.success() && err.contains("(deployment bad)") && err.contains("no signature"), "{err}");
    assert!(n.events()?.iter().any(|e| e.reason == "Untrusted" && e.message.contains("deployment bad")));
    // warn runs it, with an event.
    n.ok(&[
        "run",
        &unsigned,
        "--name",
        "tolerated",
        "--verify-key",
        &public,
        "--verify-mode",
        "warn",
        "--",
        "sleep",
        "1000",
    ])?;
    n.wait_running("tolerated-1")?;

    // Compose: the key file is read relative to the compose file.
    let compose = n.write(
        "compose.yaml",
        &format!(
            "services:\n  web:\n    image: {signed}\n    command: [sleep, '1000']\n    x-skiff-signature:\n      keys: [team.pub]\n"
        ),
    )?;
    assert_eq!(
        compose.with_file_name("team.pub").display().to_string(),
        public,
        "the key lies beside the compose file"
    );
    n.ok(&["apply", "-f", compose.to_str().unwrap()])?;
    wait_for(60 * SEC, "web from compose", || n.instance("web-1").ok().filter(|i| i.state == InstanceState::Running))?;
    let bad =
        n.write("bad.yaml", "services:\n  web:\n    image: x\n    x-skiff-signature:\n      keys: [missing.pub]\n")?;
    let out = n.cli(&["apply", "-f", bad.to_str().unwrap()])?;
    assert!(
        stderr(&out).contains("x-skiff-signature.keys[0]") && stderr(&out).contains("missing.pub"),
        "{}",
        stderr(&out)
    );
    Ok(())
}
