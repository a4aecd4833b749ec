//! `mesh bench soak`: a few nodes as separate processes of this binary
//! run at a steady rate for a long time while some of them are SIGKILLed
//! (or SIGSTOPped) and restarted on a seeded schedule; at the end the
//! traffic is drained and checked, and the long-lived processes' memory
//! (resident, less shared-memory ring pages) and file descriptors are
//! compared with the end of the warm-up.
//!
//! Processes (all on 127.0.0.1, port 0, no mDNS):
//!
//! - `relay`: a plain node everyone bootstraps through; never killed.
//! - `host`: the durable host of the queue `soak.q` (a data dir); killed
//!   once during the warm-up and restarted on the same port (a durable
//!   host loses nothing confirmed).
//! - `producer-0`, `producer-1`: send numbered messages at a steady rate,
//!   each with its own dedup key, and print what the host confirmed.
//! - `consumer-0`, `consumer-1`: print each delivery, then ack it.
//! - `publisher`: publishes numbered messages on `soak.ps` at a steady
//!   rate (its own number sequence per run of the process).
//! - `sub-0` (paused, never killed) and `sub-1` (killed and paused):
//!   reliable subscribers of `soak.ps`, printing each message and each
//!   `Lagged` gap.
//!
//! What is checked:
//!
//! - queue: every message whose send the host confirmed was delivered to
//!   a consumer (and the host has nothing waiting or in flight at the
//!   end). Lost = confirmed and never delivered. Duplicates (a message
//!   delivered more than once: at least once) are counted.
//! - reliable pub/sub: what `Node::subscribe_reliable` promises, per run
//!   of a subscriber (a restarted subscriber is a new node with a fresh
//!   window) and per run of the publisher (a restarted publisher starts a
//!   new session): after the first message of a publisher run that a
//!   subscriber run gets, every later message of that publisher run is
//!   delivered once, in order, or counted in a `Delivery::Lagged` at the
//!   place of the gap; and after the drain every subscriber run alive at
//!   the end has every message up to the publisher's last. Lost = messages
//!   in such a span neither delivered nor reported lagged. Not owed (by
//!   the docs): what a killed subscriber would have got after its kill,
//!   what a subscriber got before its subscription reached the publisher,
//!   and what a killed publisher had in its window when it died (counted
//!   as `excused_publisher_crash`).

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use futures::StreamExt;
use tokio::{
    io::AsyncReadExt,
    process::{Child, ChildStdin, Command},
    sync::mpsc,
};

use mesh::{queue::SendOptions, Multiaddr, Node};

const QUEUE: &str = "soak.q";
const TOPIC: &str = "soak.ps";
/// Steady time after the warm-up needed to judge memory growth.
const JUDGE_AFTER: Duration = Duration::from_secs(180);
/// Longest wait for the drain at the end.
const DRAIN: Duration = Duration::from_secs(60);
/// Longest wait for a process to print its address or to exit.
const STEP: Duration = Duration::from_secs(30);

/// Parses `10m`, `30s`, `500ms`, `1h` or a plain number of seconds.
pub(super) fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n >= 0.0)
        .with_context(|| format!("bad duration {s:?}: use e.g. 10m, 30s, 500ms or 1h"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => bail!("bad duration {s:?}: the unit must be ms, s, m or h"),
    };
    if secs > 7.0 * 86400.0 {
        bail!("duration {s:?} is over a week");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The options of `mesh bench soak`.
#[derive(Debug, Clone)]
pub(super) struct Options {
    pub(super) duration: Duration,
    /// Messages per second, per pattern (queue: both producers together).
    pub(super) rate: u32,
    pub(super) warmup: Duration,
    pub(super) kill_every: Duration,
    pub(super) max_rss_growth: f64,
    pub(super) seed: Option<u64>,
    /// The publisher's reliable window (small, so that pauses cross it).
    pub(super) reliable_window: usize,
    pub(super) json: bool,
}

impl Options {
    pub(super) fn check(&self) -> anyhow::Result<()> {
        if self.duration < Duration::from_secs(5) {
            bail!("--duration must be at least 5s");
        }
        if self.warmup >= self.duration {
            bail!("--warmup must be shorter than --duration");
        }
        if self.kill_every < Duration::from_millis(500) {
            bail!("--kill-every must be at least 500ms");
        }
        if self.rate == 0 || self.rate > 100_000 {
            bail!("--rate must be between 1 and 100000 messages per second");
        }
        if !(self.max_rss_growth.is_finite() && self.max_rss_growth >= 0.0) {
            bail!("--max-rss-growth must be a percentage >= 0");
        }
        Ok(())
    }
}

/// splitmix64: small, seeded, the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// A duration in `[lo, hi)`.
    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_millis() as u64;
        lo + Duration::from_millis(self.below(span.max(1)))
    }
}

// ---------------------------------------------------------------------
// Workers: the child processes.
// ---------------------------------------------------------------------

/// What a worker is told by `mesh soak-worker`.
#[derive(Debug, Clone)]
pub(super) struct Worker {
    pub(super) role: String,
    pub(super) name: String,
    pub(super) listen: Multiaddr,
    pub(super) bootstrap: Vec<Multiaddr>,
    pub(super) data_dir: Option<PathBuf>,
    /// Producer: the first number to send. Publisher: its run.
    pub(super) start: u64,
    /// Messages per second (producer, publisher).
    pub(super) rate: u32,
    pub(super) reliable_window: usize,
}

fn out(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let stdout = std::io::stdout();
    let mut o = stdout.lock();
    // The parent reads until it is gone; a broken pipe ends us anyway.
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

/// Resolves when stdin reaches its end: the parent asks us to stop.
async fn stdin_closed() {
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    loop {
        match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Runs one worker until its stdin closes.
pub(super) async fn worker(w: Worker) -> anyhow::Result<()> {
    let mut b = Node::builder().listen(w.listen.clone()).mdns(false);
    for a in &w.bootstrap {
        b = b.bootstrap(a.clone());
    }
    b = match w.role.as_str() {
        "relay" => b.self_host(false),
        "host" => {
            let dir = w.data_dir.clone().context("the host needs --data-dir")?;
            b.data_dir(dir).host_queues([QUEUE])
        }
        "producer" | "consumer" | "subscriber" => b.self_host(false),
        "publisher" => b.self_host(false).reliable_window(w.reliable_window),
        other => bail!("unknown soak worker role {other:?}"),
    };
    let node = b.start().await?;
    let addr = super::wait_addrs(&node)
        .await
        .into_iter()
        .next()
        .context("no listen address")?;
    out(format_args!("ADDR {addr}/p2p/{}", node.peer_id()));
    let stop = stdin_closed();
    let result = match w.role.as_str() {
        "relay" => {
            stop.await;
            Ok(())
        }
        "host" => host(&node, stop).await,
        "producer" => producer(&node, &w, stop).await,
        "consumer" => consumer(&node, stop).await,
        "publisher" => publisher(&node, &w, stop).await,
        _ => subscriber(&node, stop).await,
    };
    node.shutdown().await;
    out(format_args!("END"));
    result
}

/// Prints the queue's counters every half second.
async fn host(node: &Node, stop: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let q = node.queue(QUEUE)?;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tick.tick() => {
                let s = q.host_stats().await?;
                out(format_args!(
                    "STATS {} {} {} {} {} {} {}",
                    s.waiting, s.in_flight, s.accepted, s.deduplicated, s.acked, s.redelivered,
                    s.dead_lettered
                ));
            }
        }
    }
}

/// Sends `NAME:N` from `w.start` on at `w.rate` per second, in batches,
/// each with dedup key `NAME:N`; prints `OK FIRST LAST` once the host
/// confirmed a batch. A failed batch is sent again (same keys).
async fn producer(
    node: &Node,
    w: &Worker,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    node.joined(STEP).await.ok();
    let q = node.queue(QUEUE)?;
    let started = Instant::now();
    let mut next = w.start;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tick.tick() => {}
        }
        let due = w.start + (started.elapsed().as_secs_f64() * f64::from(w.rate)) as u64;
        if due <= next {
            continue;
        }
        let last = due.min(next + 512) - 1;
        let batch = (next..=last).map(|n| {
            let id = format!("{}:{n}", w.name);
            let options = SendOptions {
                dedup_key: Some(id.clone()),
                ..Default::default()
            };
            (id, options)
        });
        let send = q.send_batch_with(batch);
        tokio::select! {
            // A batch in flight when asked to stop: wait for it (bounded).
            r = tokio::time::timeout(Duration::from_secs(10), send) => match r {
                Ok(Ok(_)) => {
                    out(format_args!("OK {next} {last}"));
                    next = last + 1;
                }
                Ok(Err(e)) => {
                    tracing::warn!("{}: send failed, sending again: {e}", w.name);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(_) => tracing::warn!("{}: send timed out, sending again", w.name),
            },
            _ = &mut stop => return Ok(()),
        }
    }
}

/// Prints `D PAYLOAD ATTEMPT` for each delivery, then acks it.
async fn consumer(node: &Node, stop: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    node.joined(STEP).await.ok();
    let options = mesh::queue::ConsumeOptions::default()
        .prefetch(32)
        .visibility_timeout(Duration::from_secs(10))
        .max_attempts(1000);
    let mut c = node.queue(QUEUE)?.consume(options);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            d = c.next() => {
                let Some(d) = d else { return Ok(()) };
                let payload = String::from_utf8_lossy(d.payload()).into_owned();
                out(format_args!("D {payload} {}", d.attempt()));
                d.ack();
            }
        }
    }
}

/// Publishes `RUN:N` (N from 1) at `w.rate` per second on the topic;
/// prints `P N` with the last number published after each round.
async fn publisher(
    node: &Node,
    w: &Worker,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    node.joined(STEP).await.ok();
    let p = node.publisher(TOPIC)?;
    let started = Instant::now();
    let mut next = 1u64;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tick.tick() => {}
        }
        let due = 1 + (started.elapsed().as_secs_f64() * f64::from(w.rate)) as u64;
        if due <= next {
            continue;
        }
        while next < due {
            p.publish(format!("{}:{next}", w.start)).await?;
            next += 1;
        }
        out(format_args!("P {}", next - 1));
    }
}

/// Prints `M RUN:N` per message and `LAG PEER MISSED` per gap.
async fn subscriber(
    node: &Node,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    node.joined(STEP).await.ok();
    let mut sub = node.subscribe_reliable(TOPIC).await?;
    out(format_args!("READY"));
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            d = sub.next() => match d {
                Some(mesh::Delivery::Message(m)) => {
                    out(format_args!("M {}", String::from_utf8_lossy(&m.payload)));
                }
                Some(mesh::Delivery::Lagged(l)) => {
                    out(format_args!("LAG {} {}", l.publisher, l.missed));
                }
                None => return Ok(()),
            },
        }
    }
}

// ---------------------------------------------------------------------
// The bench: spawns, kills, checks.
// ---------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Relay,
    Host,
    Producer,
    Consumer,
    Publisher,
    Subscriber,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Relay => "relay",
            Role::Host => "host",
            Role::Producer => "producer",
            Role::Consumer => "consumer",
            Role::Publisher => "publisher",
            Role::Subscriber => "subscriber",
        }
    }
}

/// One of the bench's processes (across its restarts).
#[derive(Debug)]
struct Proc {
    name: String,
    role: Role,
    /// Its run, counted from 0; a restart is a new run.
    run: u32,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    pid: Option<u32>,
    addr: Option<String>,
    /// Memory and fds are followed (never killed after the warm-up).
    long_lived: bool,
    /// Killed (or paused) by the schedule and not yet back.
    down: bool,
    paused: bool,
    /// Exited by itself since the last start (a failure unless asked).
    exited: bool,
    stopping: bool,
    ended: bool,
    /// (seconds since start, rss KiB less shared memory, fds)
    samples: Vec<(f64, u64, u64)>,
}

/// A line from a process, or its end.
#[derive(Debug)]
enum Event {
    Line(usize, u32, String),
    Eof(usize, u32),
}

/// Queue bookkeeping.
#[derive(Debug, Default)]
struct QueueCheck {
    /// Per producer: numbers confirmed (ranges are contiguous per run).
    confirmed: BTreeMap<String, Vec<(u64, u64)>>,
    /// Next number to send per producer.
    next: HashMap<String, u64>,
    /// Deliveries per message.
    delivered: HashMap<(String, u64), u32>,
    deliveries: u64,
    malformed: u64,
    /// Latest host counters.
    stats: Option<[u64; 7]>,
}

impl QueueCheck {
    fn confirmed_count(&self) -> u64 {
        self.confirmed
            .values()
            .flatten()
            .map(|(a, b)| b - a + 1)
            .sum()
    }

    fn lost(&self) -> Vec<(String, u64)> {
        let mut lost = Vec::new();
        for (p, ranges) in &self.confirmed {
            for &(a, b) in ranges {
                for n in a..=b {
                    if !self.delivered.contains_key(&(p.clone(), n)) {
                        lost.push((p.clone(), n));
                    }
                }
            }
        }
        lost
    }

    fn is_confirmed(&self, p: &str, n: u64) -> bool {
        self.confirmed
            .get(p)
            .is_some_and(|r| r.iter().any(|&(a, b)| a <= n && n <= b))
    }
}

/// What one run of a subscriber got of one run of the publisher.
#[derive(Debug, Default, Clone, Copy)]
struct Span {
    last: u64,
    /// Lagged reported since the last message.
    lag: u64,
}

/// Reliable pub/sub bookkeeping.
#[derive(Debug, Default)]
struct PubsubCheck {
    /// Per publisher run: last number published (publish returned).
    published: BTreeMap<u64, u64>,
    /// Publisher runs that were killed, with the subscriber runs alive
    /// (perhaps paused) at that moment.
    crashed: BTreeMap<u64, Vec<(String, u32)>>,
    /// Peer id of each publisher run.
    peer: HashMap<String, u64>,
    /// Per (subscriber name, its run): per publisher run.
    spans: BTreeMap<(String, u32), BTreeMap<u64, Span>>,
    /// Lagged reports not yet placed (their publisher run unknown).
    lag_unplaced: u64,
    delivered: u64,
    duplicates: u64,
    lagged: u64,
    /// Gaps with no Lagged report (lost).
    lost: u64,
    /// Lagged reports larger than their gap.
    overreported: u64,
    malformed: u64,
    lost_examples: Vec<String>,
}

impl PubsubCheck {
    fn message(&mut self, sub: (String, u32), prun: u64, n: u64) {
        self.delivered += 1;
        let spans = self.spans.entry(sub.clone()).or_default();
        let Some(s) = spans.get_mut(&prun) else {
            // Lagged before the first message of this run is a gap we
            // cannot place; count it as reported.
            spans.insert(prun, Span { last: n, lag: 0 });
            return;
        };
        if n <= s.last {
            self.duplicates += 1;
            return;
        }
        let gap = n - s.last - 1;
        self.lagged += s.lag.min(gap);
        if s.lag > gap {
            self.overreported += s.lag - gap;
        }
        if gap > s.lag {
            self.lost += gap - s.lag;
            if self.lost_examples.len() < 10 {
                self.lost_examples.push(format!(
                    "{} run {}: publisher run {prun}: {} missing between {} and {n}, {} reported lagged",
                    sub.0, sub.1, gap - s.lag, s.last, s.lag
                ));
            }
        }
        s.last = n;
        s.lag = 0;
    }

    fn lag(&mut self, sub: (String, u32), peer: &str, missed: u64) {
        let Some(&prun) = self.peer.get(peer) else {
            self.lag_unplaced += missed;
            return;
        };
        let spans = self.spans.entry(sub).or_default();
        match spans.get_mut(&prun) {
            Some(s) => s.lag += missed,
            None => self.lagged += missed,
        }
    }

    /// Messages the live subscriber runs still lack of the publisher's
    /// last run (0 once drained).
    fn behind(&self, live: &[(String, u32)], prun: u64) -> u64 {
        let last = self.published.get(&prun).copied().unwrap_or(0);
        live.iter()
            .map(|sub| {
                let got = self
                    .spans
                    .get(sub)
                    .and_then(|s| s.get(&prun))
                    .map_or(0, |s| s.last + s.lag);
                last.saturating_sub(got)
            })
            .sum()
    }
}

struct Bench {
    exe: PathBuf,
    dir: super::outbox::ScratchDir,
    procs: Vec<Proc>,
    events: mpsc::Sender<Event>,
    rx: mpsc::Receiver<Event>,
    seed: u64,
    queue: QueueCheck,
    pubsub: PubsubCheck,
    publisher_run: u64,
    started: Instant,
    rate: u32,
    reliable_window: usize,
    kills: u64,
    pauses: u64,
    restarts: u64,
    host_kills: u64,
    unexpected_exits: Vec<String>,
    json: bool,
}

impl Bench {
    fn say(&mut self, what: String) {
        let line = format!("[{:7.1}s] {what}", self.started.elapsed().as_secs_f64());
        // With --json stdout holds only the result; the log goes to stderr.
        if self.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }

    fn relay_addr(&self) -> Option<String> {
        self.procs[0].addr.clone()
    }

    /// Starts (or restarts) process `i`, waiting for its address.
    async fn start(&mut self, i: usize) -> anyhow::Result<()> {
        let (name, role) = (self.procs[i].name.clone(), self.procs[i].role);
        let run = if self.procs[i].child.is_some() || self.procs[i].addr.is_some() {
            self.procs[i].run + 1
        } else {
            0
        };
        let mut args: Vec<String> = vec![
            "soak-worker".into(),
            "--role".into(),
            role.name().into(),
            "--name".into(),
            name.clone(),
            "--rate".into(),
        ];
        let per_producer = self.rate.div_ceil(2);
        args.push(
            match role {
                Role::Producer => per_producer,
                _ => self.rate,
            }
            .to_string(),
        );
        args.extend(["--reliable-window".into(), self.reliable_window.to_string()]);
        // The host comes back on its port, so addresses others hold stay good.
        let listen = match (role, &self.procs[i].addr) {
            (Role::Host, Some(a)) => a.split("/p2p/").next().unwrap_or(a).to_owned(),
            _ => "/ip4/127.0.0.1/udp/0/quic-v1".to_owned(),
        };
        args.extend(["--listen".into(), listen]);
        if role != Role::Relay {
            let relay = self.relay_addr().context("the relay has no address")?;
            args.extend(["--bootstrap".into(), relay]);
        }
        match role {
            Role::Host => {
                args.extend([
                    "--data-dir".into(),
                    self.dir.path().join("host").display().to_string(),
                ]);
            }
            Role::Producer => {
                let next = self.queue.next.get(&name).copied().unwrap_or(1);
                args.extend(["--start".into(), next.to_string()]);
            }
            Role::Publisher => {
                self.publisher_run += 1;
                args.extend(["--start".into(), self.publisher_run.to_string()]);
            }
            _ => {}
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))?;
        let mut cmd = Command::new(&self.exe);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "error");
        }
        let mut child = cmd
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a soak worker")?;
        let stdin = child.stdin.take();
        let mut lines = super::lines_of(&mut child)?;
        let addr = super::read_until(&mut lines, "ADDR ", STEP)
            .await
            .with_context(|| {
                format!(
                    "{name} did not start (see its log in {:?})",
                    self.dir.path()
                )
            })?;
        let p = &mut self.procs[i];
        p.run = run;
        p.pid = child.id();
        p.child = Some(child);
        p.stdin = stdin;
        p.addr = Some(addr.clone());
        p.down = false;
        p.exited = false;
        p.stopping = false;
        p.ended = false;
        if role == Role::Publisher {
            if let Some(peer) = addr.split("/p2p/").nth(1) {
                self.pubsub.peer.insert(peer.to_owned(), self.publisher_run);
            }
        }
        let tx = self.events.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if tx.send(Event::Line(i, run, line)).await.is_err() {
                    return;
                }
            }
            let _ = tx.send(Event::Eof(i, run)).await;
        });
        Ok(())
    }

    /// SIGKILLs process `i` and reaps it.
    async fn kill(&mut self, i: usize) {
        let p = &mut self.procs[i];
        if let Some(mut child) = p.child.take() {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(STEP, child.wait()).await;
        }
        p.stdin = None;
        p.down = true;
        let run = p.run;
        // Everything it printed before it died counts (a restart reads it).
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(Event::Eof(j, r))) if j == i && r == run => break,
                Ok(Some(ev)) => self.handle(ev),
                Ok(None) | Err(_) => break,
            }
        }
        let role = self.procs[i].role;
        if role == Role::Publisher {
            let alive = self
                .procs
                .iter()
                .filter(|p| p.role == Role::Subscriber && p.child.is_some())
                .map(|p| (p.name.clone(), p.run))
                .collect();
            self.pubsub.crashed.insert(self.publisher_run, alive);
        }
        self.kills += 1;
        if role == Role::Host {
            self.host_kills += 1;
        }
        let name = self.procs[i].name.clone();
        self.say(format!("SIGKILL {name}"));
    }

    fn signal(&self, i: usize, sig: &str) -> anyhow::Result<()> {
        let pid = self.procs[i].pid.context("no pid")?;
        let status = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .context("cannot run kill(1)")?;
        if !status.success() {
            bail!("kill {sig} {pid} failed");
        }
        Ok(())
    }

    fn pause(&mut self, i: usize) -> anyhow::Result<()> {
        self.signal(i, "-STOP")?;
        self.procs[i].paused = true;
        self.procs[i].down = true;
        self.pauses += 1;
        let name = self.procs[i].name.clone();
        self.say(format!("SIGSTOP {name}"));
        Ok(())
    }

    /// Brings a killed or paused process back.
    async fn revive(&mut self, i: usize) -> anyhow::Result<()> {
        if !self.procs[i].down {
            return Ok(());
        }
        let name = self.procs[i].name.clone();
        if self.procs[i].paused {
            self.signal(i, "-CONT")?;
            self.procs[i].paused = false;
            self.procs[i].down = false;
            self.say(format!("SIGCONT {name}"));
        } else {
            self.start(i).await?;
            self.restarts += 1;
            let run = self.procs[i].run;
            self.say(format!("restarted {name} (run {run})"));
        }
        Ok(())
    }

    fn handle(&mut self, ev: Event) {
        let (i, run, line) = match ev {
            Event::Line(i, run, line) => (i, run, line),
            Event::Eof(i, run) => {
                let p = &mut self.procs[i];
                if p.run == run && p.child.is_some() && !p.stopping {
                    p.exited = true;
                    let msg = format!("{} (run {run}) exited by itself", p.name);
                    self.unexpected_exits.push(msg.clone());
                    self.say(msg);
                }
                return;
            }
        };
        let name = self.procs[i].name.clone();
        let mut words = line.split_whitespace();
        match (self.procs[i].role, words.next()) {
            (_, Some("END")) => self.procs[i].ended = true,
            (Role::Host, Some("STATS")) => {
                let v: Vec<u64> = words.filter_map(|w| w.parse().ok()).collect();
                if let Ok(a) = <[u64; 7]>::try_from(v) {
                    self.queue.stats = Some(a);
                }
            }
            (Role::Producer, Some("OK")) => {
                let v: Vec<u64> = words.filter_map(|w| w.parse().ok()).collect();
                if let [a, b] = v[..] {
                    let ranges = self.queue.confirmed.entry(name.clone()).or_default();
                    match ranges.last_mut() {
                        Some(r) if r.1 + 1 == a => r.1 = b,
                        _ => ranges.push((a, b)),
                    }
                    self.queue.next.insert(name, b + 1);
                }
            }
            (Role::Consumer, Some("D")) => {
                self.queue.deliveries += 1;
                match words.next().and_then(|p| p.rsplit_once(':')) {
                    Some((p, n)) if n.parse::<u64>().is_ok() => {
                        let n = n.parse().unwrap_or(0);
                        *self.queue.delivered.entry((p.to_owned(), n)).or_default() += 1;
                    }
                    _ => self.queue.malformed += 1,
                }
            }
            (Role::Publisher, Some("P")) => {
                if let Some(n) = words.next().and_then(|w| w.parse().ok()) {
                    // Publisher run = process run + 1 (see `start`).
                    self.pubsub.published.insert(u64::from(run) + 1, n);
                }
            }
            (Role::Subscriber, Some("M")) => {
                let parsed = words.next().and_then(|p| {
                    let (r, n) = p.split_once(':')?;
                    Some((r.parse().ok()?, n.parse().ok()?))
                });
                match parsed {
                    Some((r, n)) => self.pubsub.message((name, run), r, n),
                    None => self.pubsub.malformed += 1,
                }
            }
            (Role::Subscriber, Some("LAG")) => {
                let peer = words.next().unwrap_or_default().to_owned();
                let missed = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
                self.pubsub.lag((name, run), &peer, missed);
            }
            _ => {}
        }
    }

    /// Takes the events that are there now.
    fn take_events(&mut self) {
        while let Ok(ev) = self.rx.try_recv() {
            self.handle(ev);
        }
    }

    /// Takes events until `done` holds (true) or `within` has passed
    /// (false).
    async fn events_until(&mut self, within: Duration, done: impl Fn(&Self) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            self.take_events();
            if done(self) {
                return true;
            }
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(ev)) => self.handle(ev),
                Ok(None) | Err(_) => return false,
            }
        }
    }

    fn sample(&mut self) {
        let t = self.started.elapsed().as_secs_f64();
        for p in &mut self.procs {
            if !p.long_lived || p.child.is_none() {
                continue;
            }
            if let Some(pid) = p.pid {
                if let (Some(rss), Some(fds)) = (rss_kib(pid), fd_count(pid)) {
                    p.samples.push((t, rss, fds));
                }
            }
        }
    }

    /// Closes the stdin of process `i` (it shuts down and prints END).
    fn ask_stop(&mut self, i: usize) {
        self.procs[i].stopping = true;
        self.procs[i].stdin = None;
    }

    /// Waits until process `i` printed END (or gives up after `STEP`).
    async fn wait_end(&mut self, i: usize) -> bool {
        let deadline = tokio::time::Instant::now() + STEP;
        while !self.procs[i].ended && self.procs[i].child.is_some() {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(ev)) => self.handle(ev),
                Ok(None) | Err(_) => return false,
            }
        }
        true
    }
}

/// Resident memory of `pid` less its shared-memory pages (`VmRSS` minus
/// `RssShmem`): the rings are fixed-size mappings whose pages become
/// resident as they are first written, so over the first minutes they
/// grow `VmRSS` without any growth of the process's own memory.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some(field("VmRSS:")?.saturating_sub(field("RssShmem:").unwrap_or(0)))
}

fn fd_count(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// A kill or a pause at a time, and when the process comes back.
#[derive(Debug, Clone)]
struct Action {
    at: Duration,
    proc: usize,
    pause: bool,
    back_after: Duration,
}

/// The seeded schedule: the host is killed once early in the warm-up (if
/// there is time for it: at an eighth of it, at least 1.5 s in, so that
/// its bounded structures, the dedup window above all, refill before the
/// warm-up ends), then every `kill_every` (jittered by ±25%) one
/// of the killable processes is killed or paused.
fn schedule(rng: &mut Rng, o: &Options, procs: &[Proc]) -> Vec<Action> {
    let mut actions = Vec::new();
    let host = procs.iter().position(|p| p.role == Role::Host);
    if let Some(host) = host {
        if o.warmup >= Duration::from_secs(3) {
            actions.push(Action {
                at: (o.warmup / 8).max(Duration::from_millis(1500)),
                proc: host,
                pause: false,
                back_after: Duration::from_millis(200 + rng.below(800)),
            });
        }
    }
    // Victims: producers, consumers, the publisher, sub-1 (kills); sub-0
    // and sub-1 (pauses).
    let mut t = Duration::from_secs(2).max(o.kill_every / 2);
    while t + Duration::from_secs(1) < o.duration {
        let (name, pause) = match rng.below(9) {
            0 | 1 => ("producer-0", false),
            2 => ("producer-1", false),
            3 => ("consumer-0", false),
            4 => ("consumer-1", false),
            5 => ("sub-1", false),
            6 => ("sub-0", true),
            7 => ("sub-1", true),
            _ => ("publisher", false),
        };
        let proc = procs.iter().position(|p| p.name == name);
        let Some(proc) = proc else {
            t += o.kill_every;
            continue;
        };
        // Down for 10% to 80% of the interval: pauses long enough to break
        // links and overflow the publisher's window.
        let back_after = rng.between(o.kill_every / 10, o.kill_every * 4 / 5);
        // The host kill during the warm-up stays alone.
        let clash = actions.iter().any(|a: &Action| {
            Some(a.proc) == host && a.at <= t + back_after && t <= a.at + a.back_after
        });
        if !clash {
            actions.push(Action {
                at: t,
                proc,
                pause,
                back_after,
            });
        }
        let jitter = rng.between(o.kill_every * 3 / 4, o.kill_every * 5 / 4);
        t += jitter;
    }
    actions.sort_by_key(|a| a.at);
    actions
}

/// Per process: the memory and fds report.
#[derive(Debug, serde::Serialize)]
struct ProcReport {
    name: String,
    rss_kib_start: u64,
    rss_kib_end: u64,
    rss_growth_pct: f64,
    fds_start: u64,
    fds_end: u64,
    samples: Vec<(f64, u64, u64)>,
}

pub(super) async fn run(o: Options) -> anyhow::Result<()> {
    o.check()?;
    let seed = o.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let mut rng = Rng(seed);
    let (tx, rx) = mpsc::channel(65_536);
    let names: [(&str, Role, bool); 9] = [
        ("relay", Role::Relay, true),
        ("host", Role::Host, true),
        ("publisher", Role::Publisher, false),
        ("sub-0", Role::Subscriber, true),
        ("sub-1", Role::Subscriber, false),
        ("consumer-0", Role::Consumer, false),
        ("consumer-1", Role::Consumer, false),
        ("producer-0", Role::Producer, false),
        ("producer-1", Role::Producer, false),
    ];
    let procs = names
        .iter()
        .map(|&(name, role, long_lived)| Proc {
            name: name.to_owned(),
            role,
            run: 0,
            child: None,
            stdin: None,
            pid: None,
            addr: None,
            long_lived,
            down: false,
            paused: false,
            exited: false,
            stopping: false,
            ended: false,
            samples: Vec::new(),
        })
        .collect::<Vec<_>>();
    let mut b = Bench {
        exe: std::env::current_exe().context("cannot find the mesh executable")?,
        dir: super::outbox::ScratchDir::new(None, "mesh-soak")?,
        procs,
        events: tx,
        rx,
        seed,
        queue: QueueCheck::default(),
        pubsub: PubsubCheck::default(),
        publisher_run: 0,
        started: Instant::now(),
        rate: o.rate,
        reliable_window: o.reliable_window,
        kills: 0,
        pauses: 0,
        restarts: 0,
        host_kills: 0,
        unexpected_exits: Vec::new(),
        json: o.json,
    };
    let actions = schedule(&mut rng, &o, &b.procs);
    b.say(format!(
        "soak: seed {seed} (replay: mesh bench soak --seed {seed} ...), {} s, warm-up {} s, \
         {} msgs/s per pattern, {} kills/pauses scheduled; files in {}",
        o.duration.as_secs(),
        o.warmup.as_secs(),
        o.rate,
        actions.len(),
        b.dir.path().display()
    ));
    let result = soak(&mut b, &o, &actions).await;
    // Whatever happened: no process outlives the bench.
    for p in &mut b.procs {
        if p.paused {
            if let Some(pid) = p.pid {
                let _ = std::process::Command::new("kill")
                    .args(["-CONT", &pid.to_string()])
                    .status();
            }
        }
        if let Some(mut c) = p.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }
    let report = result?;
    let failed = !report["failures"].as_array().is_none_or(|f| f.is_empty());
    if o.json {
        println!("{report}");
    }
    if failed {
        let dir = b.dir.path().display().to_string();
        // Keep the logs and the host's data dir for the investigation.
        std::mem::forget(b.dir);
        bail!("soak failed: {}; logs kept in {dir}", report["failures"]);
    }
    Ok(())
}

async fn soak(b: &mut Bench, o: &Options, actions: &[Action]) -> anyhow::Result<serde_json::Value> {
    for i in 0..b.procs.len() {
        b.start(i).await?;
    }
    b.say("all processes started".into());
    let begin = tokio::time::Instant::now();
    b.started = Instant::now();
    let end = begin + o.duration;
    let warm = begin + o.warmup;
    let steady = o.duration - o.warmup;
    // The warm-up's end, 8 samples in between, the end.
    let sample_every = (steady / 9).max(Duration::from_secs(1));
    let mut next_sample = warm;
    let mut warm_sampled = false;
    let mut pending = actions.iter().peekable();
    // (when, process) of processes to bring back.
    let mut returns: Vec<(tokio::time::Instant, usize)> = Vec::new();
    loop {
        let now = tokio::time::Instant::now();
        if now >= end {
            break;
        }
        let mut wake = end.min(next_sample);
        if let Some(a) = pending.peek() {
            wake = wake.min(begin + a.at);
        }
        if let Some(&(t, _)) = returns.iter().min_by_key(|r| r.0) {
            wake = wake.min(t);
        }
        tokio::select! {
            ev = b.rx.recv() => {
                if let Some(ev) = ev {
                    b.handle(ev);
                }
                b.take_events();
            }
            _ = tokio::time::sleep_until(wake) => {}
        }
        let now = tokio::time::Instant::now();
        if now >= next_sample {
            if !warm_sampled {
                warm_sampled = true;
                b.say("warm-up over".into());
            }
            b.sample();
            next_sample += sample_every;
        }
        while let Some(a) = pending.next_if(|a| begin + a.at <= now) {
            if b.procs[a.proc].down {
                continue;
            }
            if a.pause {
                b.pause(a.proc)?;
            } else {
                b.kill(a.proc).await;
            }
            returns.push((now + a.back_after, a.proc));
        }
        let due: Vec<usize> = returns.iter().filter(|r| r.0 <= now).map(|r| r.1).collect();
        returns.retain(|r| r.0 > now);
        for i in due {
            b.revive(i).await?;
        }
    }
    b.take_events();
    b.sample();
    b.say("steady phase over: bringing everything back, stopping producers".into());
    for i in 0..b.procs.len() {
        b.revive(i).await?;
    }
    // Every subscriber is back in the publisher's stream before it stops:
    // pub/sub keeps no history, so one brought back just now that
    // subscribed after the last message could get nothing of it (and the
    // drain below would wait for it in vain).
    b.events_until(DRAIN, |b| {
        b.procs.iter().all(|p| {
            p.role != Role::Subscriber
                || b.pubsub
                    .spans
                    .get(&(p.name.clone(), p.run))
                    .is_some_and(|s| s.contains_key(&b.publisher_run))
        })
    })
    .await;
    // Producers and the publisher stop (finishing what they had in flight).
    let senders: Vec<usize> = (0..b.procs.len())
        .filter(|&i| matches!(b.procs[i].role, Role::Producer | Role::Publisher))
        .collect();
    for &i in &senders {
        b.ask_stop(i);
    }
    for &i in &senders {
        if !b.wait_end(i).await {
            let name = b.procs[i].name.clone();
            b.say(format!("{name} did not stop in time"));
        }
    }
    // Drain: every confirmed message delivered and the host idle; every
    // live subscriber has the publisher's last message.
    let live_subs: Vec<(String, u32)> = b
        .procs
        .iter()
        .filter(|p| p.role == Role::Subscriber)
        .map(|p| (p.name.clone(), p.run))
        .collect();
    let last_run = b.publisher_run;
    let drained = b
        .events_until(DRAIN, |b| {
            let queue_done =
                b.queue.lost().is_empty() && b.queue.stats.is_some_and(|s| s[0] == 0 && s[1] == 0);
            queue_done && b.pubsub.behind(&live_subs, last_run) == 0
        })
        .await;
    b.say(format!(
        "drain {}",
        if drained { "done" } else { "timed out" }
    ));
    // Stop everyone else.
    for i in 0..b.procs.len() {
        if !senders.contains(&i) {
            b.ask_stop(i);
        }
    }
    for i in 0..b.procs.len() {
        b.wait_end(i).await;
    }
    b.take_events();
    Ok(report(b, o, drained, &live_subs, last_run))
}

fn report(
    b: &mut Bench,
    o: &Options,
    drained: bool,
    live_subs: &[(String, u32)],
    last_run: u64,
) -> serde_json::Value {
    let mut failures: Vec<String> = Vec::new();
    // Queue.
    let lost = b.queue.lost();
    let confirmed = b.queue.confirmed_count();
    let distinct = b.queue.delivered.len() as u64;
    let duplicates: u64 = b
        .queue
        .delivered
        .values()
        .map(|&n| u64::from(n.saturating_sub(1)))
        .sum();
    let unconfirmed = b
        .queue
        .delivered
        .keys()
        .filter(|(p, n)| !b.queue.is_confirmed(p, *n))
        .count() as u64;
    if !lost.is_empty() {
        let first: Vec<String> = lost
            .iter()
            .take(10)
            .map(|(p, n)| format!("{p}:{n}"))
            .collect();
        failures.push(format!(
            "queue: {} confirmed messages never delivered (first: {})",
            lost.len(),
            first.join(", ")
        ));
    }
    if b.queue.malformed > 0 {
        failures.push(format!("queue: {} malformed deliveries", b.queue.malformed));
    }
    let stats = b.queue.stats.unwrap_or_default();
    if stats[0] + stats[1] > 0 {
        failures.push(format!(
            "queue: the host still holds {} waiting and {} in flight",
            stats[0], stats[1]
        ));
    }
    // Pub/sub: the tails at the end.
    let mut excused = 0u64;
    let published_total: u64 = b.pubsub.published.values().sum();
    let subs: Vec<((String, u32), BTreeMap<u64, Span>)> = b
        .pubsub
        .spans
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut tail_lost = 0u64;
    for (sub, spans) in &subs {
        let live = live_subs.contains(sub);
        for (prun, s) in spans {
            let last = b.pubsub.published.get(prun).copied().unwrap_or(0);
            let missing = last.saturating_sub(s.last);
            if let Some(alive) = b.pubsub.crashed.get(prun) {
                // What a subscriber that outlived the crash never got.
                if alive.contains(sub) {
                    excused += missing.saturating_sub(s.lag);
                }
            } else if live && *prun == last_run {
                let unreported = missing.saturating_sub(s.lag);
                b.pubsub.lagged += s.lag.min(missing);
                if unreported > 0 {
                    tail_lost += unreported;
                    b.pubsub.lost_examples.push(format!(
                        "{} run {}: the last {unreported} of publisher run {prun} never came",
                        sub.0, sub.1
                    ));
                }
            }
        }
    }
    for sub in live_subs {
        let got = b
            .pubsub
            .spans
            .get(sub)
            .is_some_and(|s| s.contains_key(&last_run));
        if !got && b.pubsub.published.get(&last_run).copied().unwrap_or(0) > 0 {
            failures.push(format!(
                "pub/sub: {} run {} got nothing of the publisher's last run",
                sub.0, sub.1
            ));
        }
    }
    let ps_lost = b.pubsub.lost + tail_lost;
    // Per subscriber run and publisher run: the last number it got.
    let sub_runs: Vec<serde_json::Value> = subs
        .iter()
        .flat_map(|(sub, spans)| {
            spans.iter().map(|(prun, s)| {
                serde_json::json!({
                    "subscriber": sub.0, "run": sub.1, "publisher_run": prun,
                    "last": s.last, "lag_pending": s.lag,
                    "published": b.pubsub.published.get(prun).copied().unwrap_or(0),
                })
            })
        })
        .collect();
    if ps_lost > 0 {
        failures.push(format!(
            "reliable pub/sub: {ps_lost} messages neither delivered nor reported lagged ({})",
            b.pubsub.lost_examples.join("; ")
        ));
    }
    if b.pubsub.malformed > 0 {
        failures.push(format!(
            "pub/sub: {} malformed messages",
            b.pubsub.malformed
        ));
    }
    if b.pubsub.duplicates > 0 {
        failures.push(format!(
            "reliable pub/sub: {} duplicate or out-of-order deliveries (exactly once, in order, is promised)",
            b.pubsub.duplicates
        ));
    }
    if !drained {
        failures.push("the drain did not finish within 60 s".into());
    }
    for e in &b.unexpected_exits {
        failures.push(e.clone());
    }
    // Memory and fds.
    let judged = o.duration.saturating_sub(o.warmup) >= JUDGE_AFTER;
    let mut procs = Vec::new();
    for p in &b.procs {
        if !p.long_lived {
            continue;
        }
        // Only samples from the warm-up's end on (the host may have been
        // restarted during the warm-up: its samples are of the last run).
        let (Some(first), Some(last)) = (p.samples.first(), p.samples.last()) else {
            continue;
        };
        let growth = if first.1 > 0 {
            (last.1 as f64 - first.1 as f64) * 100.0 / first.1 as f64
        } else {
            0.0
        };
        if judged && growth > o.max_rss_growth {
            failures.push(format!(
                "{}: resident memory grew {growth:.1}% after the warm-up ({} -> {} KiB), over --max-rss-growth {}",
                p.name, first.1, last.1, o.max_rss_growth
            ));
        }
        if judged && last.2 > first.2 + 16 && last.2 > first.2 * 3 / 2 {
            failures.push(format!(
                "{}: open file descriptors grew from {} to {}",
                p.name, first.2, last.2
            ));
        }
        procs.push(ProcReport {
            name: p.name.clone(),
            rss_kib_start: first.1,
            rss_kib_end: last.1,
            rss_growth_pct: (growth * 10.0).round() / 10.0,
            fds_start: first.2,
            fds_end: last.2,
            samples: p.samples.clone(),
        });
    }
    let summary = serde_json::json!({
        "seed": b.seed,
        "duration_s": o.duration.as_secs_f64(),
        "warmup_s": o.warmup.as_secs_f64(),
        "rate": o.rate,
        "kills": b.kills,
        "host_kills": b.host_kills,
        "pauses": b.pauses,
        "restarts": b.restarts,
        "queue": {
            "sent": confirmed,
            "delivered": distinct,
            "deliveries": b.queue.deliveries,
            "duplicates": duplicates,
            "unconfirmed_delivered": unconfirmed,
            "lost": lost.len(),
            "host": {
                "accepted": stats[2], "deduplicated": stats[3], "acked": stats[4],
                "redelivered": stats[5], "dead_lettered": stats[6],
            },
        },
        "pubsub": {
            "sent": published_total,
            "publisher_runs": b.publisher_run,
            "delivered": b.pubsub.delivered,
            "duplicates": b.pubsub.duplicates,
            "lagged": b.pubsub.lagged,
            "lagged_unplaced": b.pubsub.lag_unplaced,
            "lagged_overreported": b.pubsub.overreported,
            "excused_publisher_crash": excused,
            "lost": ps_lost,
            "runs": sub_runs,
        },
        "memory_judged": judged,
        "max_rss_growth_pct": o.max_rss_growth,
        "processes": procs,
        "failures": failures,
    });
    if !o.json {
        print_summary(&summary, judged);
    }
    summary
}

fn print_summary(s: &serde_json::Value, judged: bool) {
    let q = &s["queue"];
    let p = &s["pubsub"];
    println!();
    println!(
        "kills {}, of the host {}, pauses {}, restarts {}",
        s["kills"], s["host_kills"], s["pauses"], s["restarts"]
    );
    println!(
        "queue:  sent (confirmed) {}, delivered {} ({} deliveries), duplicates {}, delivered unconfirmed {}, lost {}",
        q["sent"], q["delivered"], q["deliveries"], q["duplicates"], q["unconfirmed_delivered"], q["lost"]
    );
    println!(
        "pubsub: published {} in {} publisher runs, delivered {}, reported lagged {}, excused (publisher crashed) {}, duplicates {}, lost {}",
        p["sent"], p["publisher_runs"], p["delivered"], p["lagged"], p["excused_publisher_crash"], p["duplicates"], p["lost"]
    );
    for pr in s["processes"].as_array().into_iter().flatten() {
        println!(
            "{:<8} rss {} -> {} KiB ({}%), fds {} -> {}",
            pr["name"].as_str().unwrap_or(""),
            pr["rss_kib_start"],
            pr["rss_kib_end"],
            pr["rss_growth_pct"],
            pr["fds_start"],
            pr["fds_end"]
        );
    }
    if !judged {
        println!(
            "memory: the run is too short to judge growth (needs {} s after the warm-up)",
            JUDGE_AFTER.as_secs()
        );
    }
    match s["failures"].as_array() {
        Some(f) if !f.is_empty() => {
            for f in f {
                println!("FAIL: {}", f.as_str().unwrap_or(""));
            }
        }
        _ => println!("ok"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("15").unwrap(), Duration::from_secs(15));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-3s").is_err());
        assert!(parse_duration("9999h").is_err());
    }

    #[test]
    fn the_schedule_kills_and_pauses_every_kind() {
        let o = Options {
            duration: Duration::from_secs(600),
            rate: 500,
            warmup: Duration::from_secs(60),
            kill_every: Duration::from_secs(15),
            max_rss_growth: 10.0,
            seed: None,
            reliable_window: 1024,
            json: false,
        };
        let names = [
            "relay",
            "host",
            "publisher",
            "sub-0",
            "sub-1",
            "consumer-0",
            "consumer-1",
            "producer-0",
            "producer-1",
        ];
        let procs: Vec<Proc> = names
            .iter()
            .map(|n| Proc {
                name: (*n).to_owned(),
                role: if *n == "host" {
                    Role::Host
                } else {
                    Role::Relay
                },
                run: 0,
                child: None,
                stdin: None,
                pid: None,
                addr: None,
                long_lived: false,
                down: false,
                paused: false,
                exited: false,
                stopping: false,
                ended: false,
                samples: Vec::new(),
            })
            .collect();
        let a = schedule(&mut Rng(8), &o, &procs);
        assert!(a.len() >= 30, "{} actions", a.len());
        for n in names.iter().skip(1) {
            let i = names.iter().position(|m| m == n).unwrap();
            assert!(a.iter().any(|a| a.proc == i), "{n} never acted on");
        }
        assert!(a.iter().filter(|a| a.pause).count() >= 4);
        assert!(a.windows(2).all(|w| w[0].at < w[1].at));
    }

    #[test]
    fn reliable_gaps_are_lagged_or_lost() {
        let mut c = PubsubCheck::default();
        c.peer.insert("P".into(), 1);
        let s = ("sub".to_string(), 0);
        c.message(s.clone(), 1, 5);
        c.message(s.clone(), 1, 6);
        c.lag(s.clone(), "P", 3);
        c.message(s.clone(), 1, 10);
        assert_eq!((c.lost, c.lagged, c.duplicates), (0, 3, 0));
        c.message(s.clone(), 1, 12);
        assert_eq!(c.lost, 1);
        c.message(s.clone(), 1, 12);
        assert_eq!(c.duplicates, 1);
        c.published.insert(1, 14);
        assert_eq!(c.behind(&[s], 1), 2);
    }
}
