//! mDNS discovery between two hosts: two network namespaces joined by a
//! bridge, a `mesh node` in one and a one-shot `mesh peers` (no bootstrap
//! address) in the other. Needs root and `ip`; skipped with a printed reason
//! otherwise. Uses only addresses inside the namespaces it creates, and
//! removes them afterwards, even on failure.

use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_mesh-cli");

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Removes the namespaces and the bridge when dropped.
struct Net {
    tag: String,
}

impl Net {
    fn ns(&self, side: &str) -> String {
        format!("mesh{}{side}", self.tag)
    }
    fn bridge(&self) -> String {
        format!("mbr{}", self.tag)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        ip(&["netns", "del", &self.ns("a")]);
        ip(&["netns", "del", &self.ns("b")]);
        ip(&["link", "del", &self.bridge()]);
    }
}

fn setup() -> Result<Net, String> {
    let net = Net {
        tag: format!("{}", std::process::id() % 100_000),
    };
    let br = net.bridge();
    let steps: Vec<Vec<String>> = vec![
        vec![
            "link".into(),
            "add".into(),
            br.clone(),
            "type".into(),
            "bridge".into(),
        ],
        vec!["link".into(), "set".into(), br.clone(), "up".into()],
    ];
    for s in steps {
        let s: Vec<&str> = s.iter().map(String::as_str).collect();
        if !ip(&s) {
            return Err(format!("ip {}", s.join(" ")));
        }
    }
    for (i, side) in ["a", "b"].into_iter().enumerate() {
        let ns = net.ns(side);
        let veth = format!("mv{}{side}", net.tag);
        let inner = format!("{veth}i");
        let addr = format!(
            "10.231.{}.{}/24",
            net.tag.parse::<u32>().unwrap_or(0) % 250,
            i + 1
        );
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

#[test]
fn mdns_finds_a_peer_on_another_host() {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    if !root || !ip(&["-V"]) {
        eprintln!(
            "SKIPPED mdns_finds_a_peer_on_another_host: needs root and iproute2 (`ip netns`)"
        );
        return;
    }
    let net = match setup() {
        Ok(net) => net,
        Err(step) => {
            eprintln!("SKIPPED mdns_finds_a_peer_on_another_host: cannot create namespaces ({step} failed)");
            return;
        }
    };
    let octet = net.tag.parse::<u32>().unwrap_or(0) % 250;
    let mut node = Command::new("ip")
        .args(["netns", "exec", &net.ns("a"), BIN, "node", "--listen"])
        .arg(format!("/ip4/10.231.{octet}.1/udp/0/quic-v1"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mesh node in namespace a");
    let mut first = String::new();
    {
        use std::io::BufRead;
        let mut out = std::io::BufReader::new(node.stdout.take().unwrap());
        out.read_line(&mut first).unwrap();
    }
    let node_id = first
        .trim()
        .strip_prefix("peer id: ")
        .expect("peer id line")
        .to_owned();

    // No --bootstrap: the one-shot command must find the node by mDNS.
    let peers = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.ns("b"),
            BIN,
            "peers",
            "--json",
            "--timeout",
            "15",
            "--listen",
        ])
        .arg(format!("/ip4/10.231.{octet}.2/udp/0/quic-v1"))
        .output()
        .expect("run mesh peers in namespace b");
    let _ = node.kill();
    let _ = node.wait();
    assert!(
        peers.status.success(),
        "mesh peers failed: {}",
        String::from_utf8_lossy(&peers.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&peers.stdout).unwrap();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == node_id.as_str()),
        "{node_id} not found by mDNS in {list}"
    );
    drop(net);
}
