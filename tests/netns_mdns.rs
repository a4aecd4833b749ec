//! mDNS discovery between two hosts: two network namespaces joined by a
//! bridge, a `mesh node` in one and a one-shot `mesh peers` (no bootstrap
//! address) in the other. Needs root and `ip`; skipped with a printed reason
//! otherwise. Uses only addresses inside the namespaces it creates, and
//! removes them afterwards, even on failure.

mod netns_common;

use std::process::Stdio;

use netns_common::{unavailable, Net};

#[test]
fn mdns_finds_a_peer_on_another_host() {
    if let Some(why) = unavailable() {
        eprintln!("SKIPPED mdns_finds_a_peer_on_another_host: {why}");
        return;
    }
    let net = match Net::new(&["a", "b"]) {
        Ok(net) => net,
        Err(step) => {
            eprintln!("SKIPPED mdns_finds_a_peer_on_another_host: cannot create namespaces ({step} failed)");
            return;
        }
    };
    let mut node = net
        .mesh("a")
        .args(["node", "--listen", &net.listen("a")])
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
    let peers = net
        .mesh("b")
        .args([
            "peers",
            "--json",
            "--timeout",
            "15",
            "--listen",
            &net.listen("b"),
        ])
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
