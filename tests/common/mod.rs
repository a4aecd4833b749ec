//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::{
    future::Future,
    path::{Path, PathBuf},
    time::Duration,
};

use futures::StreamExt;
use mesh::{Message, Multiaddr, Node, PeerId, PeerState, Subscription};

/// Generous bound for conditions awaited in tests (never a sleep).
pub const WAIT: Duration = Duration::from_secs(20);

pub fn loopback() -> Multiaddr {
    "/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()
}

/// Fast failure detection so tests of dead peers finish quickly.
pub fn fast_fd() -> mesh::core::membership::Config {
    mesh::core::membership::Config {
        probe_interval: Duration::from_millis(200),
        probe_timeout: Duration::from_millis(100),
        suspicion_timeout: Duration::from_millis(600),
        ..Default::default()
    }
}

pub async fn start(bootstrap: Option<&Multiaddr>) -> Node {
    let mut b = Node::builder()
        .listen(loopback())
        .mdns(false)
        .failure_detection(fast_fd());
    if let Some(addr) = bootstrap {
        b = b.bootstrap(addr.clone());
    }
    b.start().await.expect("node starts")
}

pub async fn addr(node: &Node) -> Multiaddr {
    eventually("a listen address", || async {
        node.listen_addrs().await.into_iter().next()
    })
    .await
}

/// Polls `f` until it returns `Some`, failing the test after [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `node` sees `peer` in `state`.
pub async fn peer_state(node: &Node, peer: PeerId, state: PeerState) {
    eventually(&format!("{peer} to be {state:?}"), || async {
        node.peers()
            .await
            .iter()
            .any(|p| p.id == peer && p.state == state)
            .then_some(())
    })
    .await
}

/// The transport a conformance test's data links use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    /// QUIC only (shared memory off).
    Quic,
    /// Shared-memory rings between these same-host nodes (the default).
    Shm,
}

impl Net {
    /// A loopback node with fast failure detection on this transport.
    pub fn builder(self) -> mesh::Builder {
        Node::builder()
            .listen(loopback())
            .mdns(false)
            .failure_detection(fast_fd())
            .shm(self == Net::Shm)
    }

    pub async fn start(self, bootstrap: Option<&Multiaddr>) -> Node {
        let mut b = self.builder();
        if let Some(addr) = bootstrap {
            b = b.bootstrap(addr.clone());
        }
        b.start().await.expect("node starts")
    }

    /// Arguments that put a `mesh` CLI process on this transport.
    pub fn cli_args(self) -> &'static [&'static str] {
        match self {
            Net::Quic => &["--no-shm"],
            Net::Shm => &[],
        }
    }

    /// Waits until `node` has a data link to each of `peers` on this
    /// transport.
    pub async fn linked(self, node: &Node, peers: &[PeerId]) {
        let shm = self == Net::Shm;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let known = node.peers().await;
            let done = peers.iter().all(|p| {
                known
                    .iter()
                    .any(|k| &k.id == p && k.linked && k.state == PeerState::Alive && k.shm == shm)
            });
            if done {
                return;
            }
            // What the node last saw goes into the failure message.
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for links over {self:?} to {peers:?}; {} last saw {:?}",
                node.peer_id(),
                known
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `n` nodes on `net` bootstrapped from the first, all linked and ready;
/// `first` configures the first node, `rest` the others.
pub async fn mesh_of(
    net: Net,
    n: usize,
    first: impl Fn(mesh::Builder) -> mesh::Builder,
    rest: impl Fn(mesh::Builder) -> mesh::Builder,
) -> Vec<Node> {
    let host = first(net.builder()).start().await.expect("node starts");
    let host_addr = addr(&host).await;
    let mut nodes = vec![host];
    for _ in 1..n {
        let node = rest(net.builder().bootstrap(host_addr.clone()))
            .start()
            .await
            .expect("node starts");
        node.ready_timeout(WAIT).await.expect("ready");
        nodes.push(node);
    }
    let ids: Vec<_> = nodes.iter().map(|n| n.peer_id()).collect();
    for (i, node) in nodes.iter().enumerate() {
        let others: Vec<_> = ids
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, id)| *id)
            .collect();
        net.linked(node, &others).await;
    }
    nodes
}

/// Waits until `node` has a data link to each of `peers`.
pub async fn linked(node: &Node, peers: &[PeerId]) {
    eventually("links", || async {
        let known = node.peers().await;
        peers
            .iter()
            .all(|p| {
                known
                    .iter()
                    .any(|k| &k.id == p && k.linked && k.state == PeerState::Alive)
            })
            .then_some(())
    })
    .await
}

/// The next message that is not a routing probe (see [`until_routed`]).
pub async fn next(sub: &mut Subscription) -> Message {
    loop {
        let m = tokio::time::timeout(WAIT, sub.next())
            .await
            .expect("a message in time")
            .expect("subscription open");
        if m.payload != "probe" {
            return m;
        }
    }
}

/// Waits until `publisher` routes `topic` to `subscriber` (the declaration
/// of its subscription has arrived), without publishing anything.
pub async fn until_routes_to(publisher: &Node, topic: &str, subscriber: &Node) {
    eventually(
        &format!("{topic} to be routed to the subscriber"),
        || async {
            publisher
                .remote_subscribers(topic)
                .await
                .unwrap()
                .contains(&subscriber.peer_id())
                .then_some(())
        },
    )
    .await;
}

/// Publishes `probe` messages on `topic` until one reaches `sub`: the way to
/// know a subscription has spread without sleeping. Later probes may still
/// arrive; [`next`] skips them.
pub async fn until_routed(publisher: &Node, topic: &str, sub: &mut Subscription) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        publisher.publish(topic, "probe").await.unwrap();
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(100), sub.next()).await {
            assert_eq!(m.payload, "probe");
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "subscription never routed"
        );
    }
}

/// Runs each named `async fn(Net)` of the calling test file as two tests:
/// `quic::NAME` (shared memory off) and `shm::NAME` (data links on rings).
#[allow(unused_macros)]
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod quic {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Net::Quic).await
                }
            )*
        }
        mod shm {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Net::Shm).await
                }
            )*
        }
    };
}

/// Builds example `name` with this test's profile and returns its path.
/// (An example that starts itself as other processes cannot run inside
/// the test binary, and cargo builds examples for `cargo test` only when
/// no target is selected.)
pub fn example(name: &str) -> PathBuf {
    // This binary is TARGET/PROFILE/deps/TEST-HASH.
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let mut build = std::process::Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()));
    // Without the variables cargo set for this test (the package's name,
    // version, manifest dir): build scripts that watch them (ring's does)
    // would see a change, so that this build and the next `cargo test`
    // rebuild each other's dependencies every time.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_EXE_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_MANIFEST_LINKS",
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "OUT_DIR",
            ]
            .contains(&&*key)
        {
            build.env_remove(&*key);
        }
    }
    build.args([
        "build",
        "--quiet",
        "--manifest-path",
        concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
        "--example",
        name,
    ]);
    match profile_dir.file_name().and_then(|p| p.to_str()) {
        Some("debug") => {}
        Some("release") => {
            build.arg("--release");
        }
        Some(other) => {
            build.args(["--profile", other]);
        }
        None => panic!("no profile directory in {}", exe.display()),
    }
    let status = build.status().expect("cargo runs");
    assert!(status.success(), "cargo build --example {name}: {status}");
    let path = profile_dir
        .join("examples")
        .join(name)
        .with_extension(std::env::consts::EXE_EXTENSION);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A node that hosts every queue and stream (in memory), joined through
/// `bootstrap`.
pub async fn hosting_all(bootstrap: &Multiaddr) -> Node {
    Node::builder()
        .listen(loopback())
        .mdns(false)
        .failure_detection(fast_fd())
        .host_all()
        .bootstrap(bootstrap.clone())
        .start()
        .await
        .expect("host starts")
}
