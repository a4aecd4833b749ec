//! Network namespaces joined by a bridge, for tests of several hosts. Needs
//! root and iproute2; everything created is removed on drop, even when the
//! test fails. Addresses are 10.231.X.N/24 inside the namespaces only.

#![allow(dead_code)]

use std::process::{Command, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_mesh-cli");

pub fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Why this machine cannot run namespace tests, if it cannot.
pub fn unavailable() -> Option<&'static str> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    if !root {
        return Some("needs root");
    }
    if !ip(&["-V"]) {
        return Some("needs iproute2 (`ip netns`)");
    }
    None
}

/// Namespaces (hosts) on one bridge; removed when dropped.
pub struct Net {
    tag: String,
    hosts: Vec<String>,
}

impl Net {
    /// Creates one namespace per name in `hosts`, each with address
    /// `10.231.X.(i+1)` on a veth joined to a new bridge.
    pub fn new(hosts: &[&str]) -> Result<Net, String> {
        let net = Net {
            tag: format!("{}", std::process::id() % 100_000),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
        };
        let br = net.bridge();
        for c in [
            vec!["link", "add", br.as_str(), "type", "bridge"],
            vec!["link", "set", br.as_str(), "up"],
        ] {
            if !ip(&c) {
                return Err(format!("ip {}", c.join(" ")));
            }
        }
        for (i, host) in hosts.iter().enumerate() {
            let ns = net.ns(host);
            let veth = net.veth(host);
            let inner = net.inner(host);
            let addr = format!("{}/24", net.addr(i));
            let cmds: Vec<Vec<&str>> = vec![
                vec!["netns", "add", &ns],
                vec!["link", "add", &veth, "type", "veth", "peer", "name", &inner],
                vec!["link", "set", &inner, "netns", &ns],
                vec!["link", "set", &veth, "master", &br],
                vec!["link", "set", &veth, "up"],
                vec!["-n", &ns, "addr", "add", &addr, "dev", &inner],
                vec!["-n", &ns, "link", "set", &inner, "up"],
                vec!["-n", &ns, "link", "set", "lo", "up"],
            ];
            for c in cmds {
                if !ip(&c) {
                    return Err(format!("ip {}", c.join(" ")));
                }
            }
        }
        Ok(net)
    }

    pub fn ns(&self, host: &str) -> String {
        format!("mesh{}{host}", self.tag)
    }

    fn bridge(&self) -> String {
        format!("mbr{}", self.tag)
    }

    fn veth(&self, host: &str) -> String {
        format!("mv{}{host}", self.tag)
    }

    fn inner(&self, host: &str) -> String {
        format!("mv{}{host}i", self.tag)
    }

    /// The address of the `i`th host.
    pub fn addr(&self, i: usize) -> String {
        let octet = self.tag.parse::<u32>().unwrap_or(0) % 250;
        format!("10.231.{octet}.{}", i + 1)
    }

    /// A QUIC listen address on `host`, port 0.
    pub fn listen(&self, host: &str) -> String {
        let i = self
            .hosts
            .iter()
            .position(|h| h == host)
            .expect("known host");
        format!("/ip4/{}/udp/0/quic-v1", self.addr(i))
    }

    /// `mesh ARGS...` in `host`'s namespace.
    pub fn mesh(&self, host: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(host), BIN]);
        c
    }

    /// Cuts `host` off the bridge (its interface goes down) or reconnects it.
    pub fn set_connected(&self, host: &str, up: bool) -> bool {
        ip(&[
            "-n",
            &self.ns(host),
            "link",
            "set",
            &self.inner(host),
            if up { "up" } else { "down" },
        ])
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for h in &self.hosts {
            ip(&["netns", "del", &self.ns(h)]);
        }
        ip(&["link", "del", &self.bridge()]);
    }
}
