//! A terminal chat between peers found by mDNS on a LAN, or by --bootstrap.
//!
//! ```text
//! cargo run --example chat -- --name alice
//! cargo run --example chat -- --name bob --bootstrap /ip4/127.0.0.1/udp/PORT/quic-v1/p2p/PEERID
//! ```
//! Type a line and press enter to send it to the room; `/peers` lists peers.

use clap::Parser;
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Parser)]
struct Args {
    /// Your name in the room.
    #[arg(long, default_value = "anon")]
    name: String,
    /// The room (a topic segment).
    #[arg(long, default_value = "lobby")]
    room: String,
    /// Listen address.
    #[arg(long, default_value = "/ip4/0.0.0.0/udp/0/quic-v1")]
    listen: mesh::Multiaddr,
    /// Peer to join through (otherwise mDNS finds peers on the LAN).
    #[arg(long)]
    bootstrap: Vec<mesh::Multiaddr>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Line {
    from: String,
    text: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut builder = mesh::Node::builder().listen(args.listen);
    for b in args.bootstrap {
        builder = builder.bootstrap(b);
    }
    let node = builder.start().await?;
    let topic = format!("chat.{}", args.room);
    mesh::Topic::new(&topic)?;
    let mut room = node.subscribe(&topic).await?;
    for addr in node.listen_addrs().await {
        println!("* listening on {addr}");
    }
    println!(
        "* you are {} in #{}; type to talk, /peers to list peers, ctrl-d to quit",
        args.name, args.room
    );

    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = stdin.next_line() => {
                let Some(text) = line? else { break };
                if text.trim() == "/peers" {
                    for p in node.peers().await {
                        println!("* {} {:?}", p.id, p.state);
                    }
                    continue;
                }
                node.publish_value(&topic, &Line { from: args.name.clone(), text }).await?;
            }
            Some(msg) = room.next() => {
                if msg.publisher == node.peer_id() {
                    continue;
                }
                match postcard::from_bytes::<Line>(&msg.payload) {
                    Ok(line) => println!("<{}> {}", line.from, line.text),
                    Err(_) => println!("* (unreadable message from {})", msg.publisher),
                }
            }
        }
    }
    node.shutdown().await;
    Ok(())
}
