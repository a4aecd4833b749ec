//! Testing your own service under network partitions with `mesh::sim`.
//!
//! ```text
//! cargo run --example partition_test
//! ```
//!
//! The service here is a small inventory: a `shop` node publishes orders,
//! a `warehouse` node keeps stock counts from them. Both are ordinary async
//! functions over a [`mesh::Node`]; in production they run on nodes over
//! QUIC, here on simulated nodes in virtual time, where we cut the network
//! between them for a minute and check what the warehouse ends up with.
//!
//! Run it with another seed (`MESH_SIM_SEED=7 cargo run --example
//! partition_test`): every seed is a different, reproducible run.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use mesh::{sim::Sim, Delivery, Node};

/// The shop: publishes `count` orders for `item`, one every 100 ms.
async fn shop(node: Node, item: &'static str, count: u32) {
    for n in 0..count {
        let order = format!("{item}:{n}");
        node.publish(&format!("orders.{item}"), order)
            .await
            .expect("node running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the warehouse knows.
#[derive(Debug, Default)]
struct Stock {
    shipped: BTreeMap<String, u32>,
    /// Orders it knows it missed (the shop's window was exceeded).
    missed: u64,
}

/// The warehouse: counts every order it receives. It subscribes reliably,
/// so orders published while it is cut off are fetched after the heal.
async fn warehouse(node: Node, stock: Arc<Mutex<Stock>>) {
    let mut orders = node
        .subscribe_reliable("orders.>")
        .await
        .expect("subscribe");
    while let Some(d) = orders.next().await {
        let mut stock = stock.lock().unwrap();
        match d {
            Delivery::Message(m) => {
                let item = m.topic.as_str().trim_start_matches("orders.").to_owned();
                *stock.shipped.entry(item).or_default() += 1;
            }
            Delivery::Lagged(l) => stock.missed += l.missed,
        }
    }
}

pub fn main() {
    let seed = std::env::var("MESH_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    // A network with 1 to 20 ms of latency and 1% packet loss.
    let mut sim = Sim::builder()
        .seed(seed)
        .latency(Duration::from_millis(1)..Duration::from_millis(20))
        .loss(0.01)
        .build();
    let shop_node = sim.node("shop");
    let warehouse_node = sim.node("warehouse");
    let _other = sim.node("office");
    sim.run_until(|s| s.converged(), Duration::from_secs(30))
        .expect("the mesh forms");

    // Start the services on their nodes (a crash of a node kills its tasks).
    let stock = Arc::new(Mutex::new(Stock::default()));
    sim.spawn_on("warehouse", warehouse(warehouse_node, stock.clone()));
    sim.run_until(
        |s| s.routed("shop", "orders.apples"),
        Duration::from_secs(5),
    )
    .expect("the shop learns of the warehouse");
    sim.spawn_on("shop", shop(shop_node, "apples", 1200));

    // Ten seconds of trading, then a one-minute partition.
    sim.run_for(Duration::from_secs(10));
    sim.partition(&[&["shop", "office"], &["warehouse"]]);
    sim.run_for(Duration::from_secs(60));
    let during = stock
        .lock()
        .unwrap()
        .shipped
        .get("apples")
        .copied()
        .unwrap_or(0);
    println!("after 70 s, 60 of them partitioned: the warehouse counted {during} orders");
    assert!(during < 200, "the partition held orders back");

    sim.heal();
    let took = sim
        .run_until(|s| s.converged(), Duration::from_secs(60))
        .expect("the mesh heals");
    println!("healed; the mesh converged {took:?} later");

    // The shop goes on to its 1200th order (120 s in all); then check.
    sim.run_for(Duration::from_secs(60));
    let stock = stock.lock().unwrap();
    println!(
        "virtual time {:?}: warehouse counted {:?}, knows it missed {}",
        sim.now(),
        stock.shipped,
        stock.missed
    );
    assert_eq!(stock.missed, 0, "a minute of orders fits the shop's window");
    assert_eq!(
        stock.shipped.get("apples"),
        Some(&1200),
        "every order counted exactly once (seed {seed})"
    );
    println!(
        "ok: every order arrived once, trace hash {:#x}",
        sim.trace_hash()
    );
}
