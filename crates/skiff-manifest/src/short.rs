//! The short forms `docker run` flags and compose files share, parsed once so that
//! `skiff run -v ./data:/data` and a compose `volumes: [./data:/data]` mean the same
//! thing (a bind mount of `./data`), as they do in Docker.

use skiff_model::{Macvlan, NetworkMode, Volume, VolumeSource};
use std::path::{Path, PathBuf};

/// A volume's source: a path (it starts with `/`, `.` or `~`) is a bind mount, resolved
/// against `dir` and, for `~` and `~/`, against `home`; anything else names a volume.
/// `~user` forms, and `~` without a home, are refused.
pub fn volume_source(src: &str, dir: &Path, home: Option<&Path>) -> Result<VolumeSource, String> {
    if !(src.starts_with('/') || src.starts_with('.') || src.starts_with('~')) {
        return Ok(VolumeSource::Named { name: src.to_string() });
    }
    let p = match src.strip_prefix('~') {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => match home {
            Some(h) => h.join(rest.trim_start_matches('/')),
            None => return Err(format!("{src:?}: ~ needs HOME, which is not set")),
        },
        Some(_) => return Err(format!("{src:?}: ~user paths are not supported; give the path")),
        None => dir.join(src),
    };
    Ok(VolumeSource::Bind { path: normalize(&p) })
}

/// `SOURCE:TARGET[:MODE]` (`MODE`: `ro`, `rw`, with `z`/`Z` allowed and ignored), the
/// source as [`volume_source`] reads it; `TARGET` alone is an anonymous volume.
pub fn volume(s: &str, dir: &Path, home: Option<&Path>) -> Result<Volume, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let (src, dst, mode) = match parts.as_slice() {
        [dst] if !dst.is_empty() => {
            return Ok(Volume { source: VolumeSource::Anonymous, target: dst.to_string(), read_only: false })
        }
        [src, dst] => (*src, *dst, ""),
        [src, dst, mode] => (*src, *dst, *mode),
        _ => return Err(format!("{s:?} is not SOURCE:TARGET[:ro]")),
    };
    if src.is_empty() || dst.is_empty() {
        return Err(format!("{s:?} is not SOURCE:TARGET[:ro]"));
    }
    let read_only = match mode {
        "" | "rw" => false,
        "ro" => true,
        m if m.split(',').all(|o| ["ro", "rw", "z", "Z"].contains(&o)) => m.split(',').any(|o| o == "ro"),
        m => return Err(format!("mode {m:?} is not ro or rw")),
    };
    Ok(Volume { source: volume_source(src, dir, home)?, target: dst.to_string(), read_only })
}

/// `macvlan:PARENT[,ip=A][,ip_range=CIDR][,subnet=CIDR][,gateway=A]` (`--network`).
pub fn macvlan(s: &str) -> Result<Macvlan, String> {
    let rest = s.strip_prefix("macvlan:").ok_or_else(|| format!("{s:?} is not macvlan:PARENT[,ip=...]"))?;
    let mut parts = rest.split(',');
    let parent = parts.next().unwrap_or_default().to_string();
    if parent.is_empty() {
        return Err("macvlan: needs the parent interface (macvlan:eth0,ip=...)".into());
    }
    let mut m = Macvlan { parent, subnet: None, gateway: None, ip_range: None, ip: None };
    for p in parts {
        let (k, v) = p.split_once('=').ok_or_else(|| format!("{p:?} is not key=value"))?;
        let slot = match k {
            "ip" => &mut m.ip,
            "ip_range" | "ip-range" => &mut m.ip_range,
            "subnet" => &mut m.subnet,
            "gateway" => &mut m.gateway,
            other => return Err(format!("{other:?} is not a macvlan option (ip, ip_range, subnet, gateway)")),
        };
        *slot = Some(v.to_string());
    }
    Ok(m)
}

/// `bridge`, `host` or `none`.
pub fn network_mode(s: &str) -> Result<NetworkMode, String> {
    match s {
        "bridge" => Ok(NetworkMode::Bridge),
        "host" => Ok(NetworkMode::Host),
        "none" => Ok(NetworkMode::None),
        other => Err(format!("{other:?} is not supported (bridge, host, none)")),
    }
}

/// `p` without `.` and `..` components (lexically, as Compose resolves bind sources).
pub(crate) fn normalize(p: &Path) -> String {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            c => out.push(c),
        }
    }
    out.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_bind_and_names_are_volumes_the_same_for_run_and_compose() {
        let dir = Path::new("/srv/app");
        let home = Some(Path::new("/home/u"));
        let v = |s: &str| volume(s, dir, home);
        let bind = |p: &str| VolumeSource::Bind { path: p.into() };
        assert_eq!(v("./data:/data").unwrap().source, bind("/srv/app/data"));
        assert_eq!(
            v("../shared:/s:ro").unwrap(),
            Volume { source: bind("/srv/shared"), target: "/s".into(), read_only: true }
        );
        assert_eq!(v("~/cfg:/cfg").unwrap().source, bind("/home/u/cfg"));
        assert_eq!(v("/abs:/x:rw").unwrap().source, bind("/abs"));
        assert_eq!(
            v("data:/data:ro,z").unwrap(),
            Volume { source: VolumeSource::Named { name: "data".into() }, target: "/data".into(), read_only: true }
        );
        assert_eq!(v("/data").unwrap().source, VolumeSource::Anonymous);
        assert_eq!(v("a:b:c:d").unwrap_err(), "\"a:b:c:d\" is not SOURCE:TARGET[:ro]");
        assert_eq!(v(":/x").unwrap_err(), "\":/x\" is not SOURCE:TARGET[:ro]");
        assert_eq!(v("a:/x:rx").unwrap_err(), "mode \"rx\" is not ro or rw");
        assert_eq!(v("~:/h").unwrap().source, bind("/home/u"));
        assert_eq!(v("~bob/x:/x").unwrap_err(), "\"~bob/x\": ~user paths are not supported; give the path");
        assert_eq!(volume("~/x:/x", dir, None).unwrap_err(), "\"~/x\": ~ needs HOME, which is not set");
        assert_eq!(network_mode("host"), Ok(NetworkMode::Host));
        let m = macvlan("macvlan:eth0,ip=192.168.1.50,gateway=192.168.1.1").unwrap();
        assert_eq!(
            (m.parent.as_str(), m.ip.as_deref(), m.gateway.as_deref()),
            ("eth0", Some("192.168.1.50"), Some("192.168.1.1"))
        );
        assert_eq!(
            macvlan("macvlan:eth0,mode=vepa").unwrap_err(),
            "\"mode\" is not a macvlan option (ip, ip_range, subnet, gateway)"
        );
        assert!(macvlan("macvlan:").is_err());
        assert_eq!(network_mode("overlay").unwrap_err(), "\"overlay\" is not supported (bridge, host, none)");
    }
}
