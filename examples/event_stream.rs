//! An event stream across processes: sensors append readings to a stream,
//! an aggregator averages each sensor's readings per 1 s window of event
//! time.
//!
//! ```text
//! cargo run --example event_stream
//! cargo run --example event_stream -- --sensors 5 --readings 40
//! ```
//!
//! Run without a role, this process hosts the stream `sensors.readings` on
//! a node of its own (`host_all`, as `mesh node` does), starts itself once
//! as `event_stream aggregator` and `--sensors` times as `event_stream
//! sensor`, and reads what they print (one JSON line per event). Each
//! sensor appends `--readings` readings, keyed by its name (so they stay
//! in one partition, in order), with explicit event times 200 ms apart
//! from a start the parent chose; then it exits (its readings stay on the
//! host). The aggregator reads the stream from the earliest offset and
//! feeds a `mesh::window` tumbling window of 1 s: a window fires once every
//! sensor's readings are past it (the watermark is the least of the
//! sensors' latest event times, so no reading is ever late, whatever the
//! order in which the partitions arrive), and it exits once it has every
//! reading. This process then checks each (window, sensor) average against
//! the readings, prints them as a table, and exits 0; or non-zero, saying
//! what it was waiting for. Every wait has a timeout, and the children die
//! with this process.

use std::{
    collections::BTreeMap,
    path::Path,
    process::Stdio,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context as _};
use clap::{Parser, Subcommand};
use mesh::{
    stream::{AppendOptions, From},
    window::{Stats, Windowed, Windows},
    Multiaddr, Node,
};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::mpsc,
};

/// The stream the readings go to.
const STREAM: &str = "sensors.readings";
/// Event time between two readings of a sensor.
const EVERY_MS: u64 = 200;
/// The window size.
const WINDOW_MS: u64 = 1000;
/// Loopback only, port chosen by the system.
const LOOPBACK: &str = "/ip4/127.0.0.1/udp/0/quic-v1";
/// Longest wait for any one step (a process starting, the readings being
/// read).
const STEP: Duration = Duration::from_secs(30);

#[derive(Parser)]
struct Args {
    /// Sensor processes to start.
    #[arg(long, default_value_t = 3)]
    sensors: u32,
    /// Readings per sensor.
    #[arg(long, default_value_t = 15)]
    readings: u32,
    #[command(subcommand)]
    role: Option<Role>,
}

/// The roles this process starts itself in.
#[derive(Subcommand)]
enum Role {
    /// Append readings, then exit.
    Sensor {
        /// The node to join through.
        #[arg(long)]
        bootstrap: Multiaddr,
        /// Which sensor (1 to --sensors); its name is `sensor-N`.
        #[arg(long)]
        index: u32,
        /// Readings to append.
        #[arg(long)]
        readings: u32,
        /// Event time of the first reading, ms since the Unix epoch.
        #[arg(long)]
        start_ms: u64,
        /// Real milliseconds between appends (so the windows fire while
        /// the sensors run).
        #[arg(long, default_value_t = 10)]
        pace_ms: u64,
    },
    /// Average the readings per sensor and 1 s window; exit once every
    /// reading is in.
    Aggregator {
        /// The node to join through.
        #[arg(long)]
        bootstrap: Multiaddr,
        /// Sensors appending.
        #[arg(long)]
        sensors: u32,
        /// Readings per sensor.
        #[arg(long)]
        readings: u32,
    },
}

/// What a child prints, one JSON object per line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Report {
    /// The aggregator is reading the stream.
    Ready { peer: String },
    /// A sensor's readings are all stored, in this partition, at these
    /// offsets.
    Appended {
        sensor: String,
        partition: String,
        first: u64,
        last: u64,
    },
    /// A window fired for a sensor.
    Window {
        sensor: String,
        start_ms: u64,
        count: u64,
        mean: f64,
        min: f64,
        max: f64,
    },
    /// The aggregator has read every reading.
    Exit { records: u64, late: u64 },
}

fn sensor_name(index: u32) -> String {
    format!("sensor-{index}")
}

/// Reading `i` of sensor `index`: a sensor's own level and a wobble, in
/// tenths of a degree (the payload is its text).
fn reading(index: u32, i: u32) -> f64 {
    let tenths = 200 + 15 * index + (i * 7 + index * 3) % 10;
    f64::from(tenths) / 10.0
}

fn report(r: &Report) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(r)?)?;
    out.flush()?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.role {
        None => parent(args.sensors, args.readings).await,
        Some(Role::Sensor {
            bootstrap,
            index,
            readings,
            start_ms,
            pace_ms,
        }) => {
            sensor(
                bootstrap,
                index,
                readings,
                start_ms,
                Duration::from_millis(pace_ms),
            )
            .await
        }
        Some(Role::Aggregator {
            bootstrap,
            sensors,
            readings,
        }) => aggregator(bootstrap, sensors, readings).await,
    }
}

/// A node on loopback that has joined the mesh through `bootstrap`. It
/// hosts no stream (the parent does), so a child can exit at any time
/// without taking readings with it.
async fn join(bootstrap: Multiaddr) -> anyhow::Result<Node> {
    let node = Node::builder()
        .listen(LOOPBACK.parse()?)
        .mdns(false)
        .bootstrap(bootstrap)
        .self_host(false)
        .start()
        .await?;
    node.ready_timeout(STEP)
        .await
        .context("joining the mesh through the host")?;
    Ok(node)
}

async fn sensor(
    bootstrap: Multiaddr,
    index: u32,
    readings: u32,
    start_ms: u64,
    pace: Duration,
) -> anyhow::Result<()> {
    let node = join(bootstrap).await?;
    let stream = node.stream(STREAM)?;
    let name = sensor_name(index);
    let mut placed = Vec::new();
    for i in 0..readings {
        // The event time is the reading's own, not the clock's when it is
        // appended: the windows depend on the readings only.
        let at = UNIX_EPOCH + Duration::from_millis(start_ms + u64::from(i) * EVERY_MS);
        let options = AppendOptions {
            key: name.clone().into(),
            timestamp: Some(at),
            ..Default::default()
        };
        let value = format!("{:.1}", reading(index, i));
        let pos = tokio::time::timeout(STEP, stream.append_with(value, options))
            .await
            .with_context(|| {
                format!("the host did not store {name}'s reading within {STEP:?}")
            })??;
        placed.push(pos);
        tokio::time::sleep(pace).await;
    }
    let (Some(first), Some(last)) = (placed.first(), placed.last()) else {
        bail!("no readings to append");
    };
    ensure!(
        placed.iter().all(|p| p.partition == first.partition),
        "one key, one partition: {name}'s readings went to several"
    );
    report(&Report::Appended {
        sensor: name,
        partition: first.partition.to_string(),
        first: first.offset,
        last: last.offset,
    })?;
    // Its readings are on the host once `append` resolved: it can go.
    node.shutdown().await;
    Ok(())
}

async fn aggregator(bootstrap: Multiaddr, sensors: u32, readings: u32) -> anyhow::Result<()> {
    let node = join(bootstrap).await?;
    let mut records = node.stream(STREAM)?.consume(From::Earliest);
    report(&Report::Ready {
        peer: node.peer_id().to_string(),
    })?;
    // The watermark is moved here, not by the records' times (an endless
    // out-of-orderness): to the least of the sensors' latest event times.
    let mut windowed = Windowed::new(Windows::tumbling(Duration::from_millis(WINDOW_MS))?, Stats)
        .out_of_orderness(Duration::MAX);
    let mut latest: BTreeMap<String, u64> = BTreeMap::new();
    let total = u64::from(sensors) * u64::from(readings);
    let mut seen = 0;
    while seen < total {
        let r = tokio::time::timeout(STEP, records.recv())
            .await
            .with_context(|| format!("read {seen} of {total} readings; no more within {STEP:?}"))?
            .context("the node shut down")??;
        seen += 1;
        let sensor = String::from_utf8_lossy(r.key()).into_owned();
        let value: f64 = std::str::from_utf8(r.payload())
            .ok()
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("{sensor} sent a reading that is not a number"))?;
        latest.insert(sensor.clone(), r.timestamp_ms());
        let mut fired = windowed.push(sensor, r.timestamp_ms(), value);
        if latest.len() == sensors as usize {
            let watermark = latest.values().copied().min().unwrap_or(0);
            fired.extend(windowed.advance_watermark(watermark));
        }
        for w in fired {
            report_window(w)?;
        }
    }
    // Every reading is in: the last windows close.
    for w in windowed.flush() {
        report_window(w)?;
    }
    report(&Report::Exit {
        records: seen,
        late: windowed.late_dropped(),
    })?;
    drop(records);
    node.shutdown().await;
    Ok(())
}

fn report_window(
    w: mesh::window::WindowResult<String, mesh::window::Summary>,
) -> anyhow::Result<()> {
    report(&Report::Window {
        sensor: w.key,
        start_ms: w.start_ms,
        count: w.value.count,
        mean: w.value.mean,
        min: w.value.min,
        max: w.value.max,
    })
}

/// A child's stdout, parsed.
#[derive(Debug)]
enum Event {
    Report(Report),
    /// A line that is not a report.
    Garbage(String, String),
    /// The child's stdout closed.
    Closed(String),
}

/// A child process: killed when dropped.
struct Proc {
    name: String,
    child: Child,
}

fn spawn(
    exe: &Path,
    name: &str,
    args: &[&str],
    events: &mpsc::Sender<Event>,
) -> anyhow::Result<Proc> {
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    let stdout = child.stdout.take().context("stdout is piped")?;
    let (who, tx) = (name.to_owned(), events.clone());
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let event = match serde_json::from_str(&line) {
                Ok(r) => Event::Report(r),
                Err(_) => Event::Garbage(who.clone(), line),
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Event::Closed(who)).await;
    });
    Ok(Proc {
        name: name.to_owned(),
        child,
    })
}

impl Proc {
    /// Waits for it to exit by itself; an error if it fails or takes too long.
    async fn exited(&mut self) -> anyhow::Result<()> {
        let status = tokio::time::timeout(STEP, self.child.wait())
            .await
            .with_context(|| format!("{} did not exit within {STEP:?}", self.name))??;
        ensure!(status.success(), "{} failed: {status}", self.name);
        Ok(())
    }
}

/// One fired window of one sensor, as reported.
#[derive(Debug, Clone, Copy)]
struct Fired {
    count: u64,
    mean: f64,
    min: f64,
    max: f64,
}

/// What the parent has heard so far.
#[derive(Debug, Default)]
struct Seen {
    ready: bool,
    /// Sensor -> (partition, first offset, last offset).
    appended: BTreeMap<String, (String, u64, u64)>,
    /// (window start, sensor) -> its result; a repeat is an error.
    windows: BTreeMap<(u64, String), Fired>,
    /// The aggregator's last word: records read, late ones dropped.
    exit: Option<(u64, u64)>,
}

impl Seen {
    fn handle(&mut self, event: Event, start_ms: u64) -> anyhow::Result<()> {
        match event {
            Event::Report(Report::Ready { peer }) => {
                println!("  aggregator reading {STREAM} from the earliest offset: {peer}");
                self.ready = true;
            }
            Event::Report(Report::Appended {
                sensor,
                partition,
                first,
                last,
            }) => {
                println!(
                    "  {sensor} appended its readings: partition {partition}, offsets {first}..={last}"
                );
                self.appended.insert(sensor, (partition, first, last));
            }
            Event::Report(Report::Window {
                sensor,
                start_ms: at,
                count,
                mean,
                min,
                max,
            }) => {
                let from = at.saturating_sub(start_ms) / 1000;
                println!(
                    "  window {from}-{} s  {sensor}: average {mean:.2} over {count} readings (min {min:.1}, max {max:.1})",
                    from + 1
                );
                let fired = Fired {
                    count,
                    mean,
                    min,
                    max,
                };
                if self.windows.insert((at, sensor.clone()), fired).is_some() {
                    bail!("window {from} of {sensor} fired twice");
                }
            }
            Event::Report(Report::Exit { records, late }) => {
                self.exit = Some((records, late));
            }
            Event::Garbage(who, line) => bail!("{who} printed an unexpected line: {line:?}"),
            Event::Closed(who) if who == "aggregator" => {
                ensure!(
                    self.exit.is_some(),
                    "the aggregator exited unexpectedly (see its stderr above)"
                );
            }
            Event::Closed(who) => {
                ensure!(
                    self.appended.contains_key(&who),
                    "{who} exited unexpectedly (see its stderr above)"
                );
            }
        }
        Ok(())
    }

    fn progress(&self) -> String {
        format!(
            "aggregator {}; {} sensor(s) done appending; {} (window, sensor) averages; aggregator {}",
            if self.ready { "reading" } else { "not ready" },
            self.appended.len(),
            self.windows.len(),
            match self.exit {
                Some((n, _)) => format!("done after {n} readings"),
                None => "still reading".into(),
            }
        )
    }
}

/// Handles events until `done(seen)` holds; fails after [`STEP`].
async fn until(
    events: &mut mpsc::Receiver<Event>,
    seen: &mut Seen,
    start_ms: u64,
    what: &str,
    done: impl Fn(&Seen) -> bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + STEP;
    while !done(seen) {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "timed out after {STEP:?} waiting for {what}; so far: {}",
                    seen.progress()
                )
            })?
            .context("every child's output closed")?;
        seen.handle(event, start_ms)?;
    }
    Ok(())
}

/// Polls `f` until it returns `Some`, failing after [`STEP`].
async fn eventually<T, Fut>(what: &str, mut f: impl FnMut() -> Fut) -> anyhow::Result<T>
where
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn parent(sensors: u32, readings: u32) -> anyhow::Result<()> {
    ensure!(sensors >= 1, "--sensors must be at least 1");
    ensure!(readings >= 1, "--readings must be at least 1");
    let started = Instant::now();
    println!(
        "event_stream: this process hosts stream {STREAM:?}; {sensors} sensor processes append to it and an aggregator process averages it, on 127.0.0.1\n"
    );
    let host = Node::builder()
        .listen(LOOPBACK.parse()?)
        .mdns(false)
        .host_all()
        .start()
        .await?;
    let addr = eventually("a listen address", || async {
        Ok(host.listen_addrs().await.into_iter().next())
    })
    .await?
    .to_string();
    println!("  host {} at {addr}", host.peer_id());
    // The readings' event times start at a whole second, so that the
    // windows start with them.
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_millis() as u64;
    let start_ms = now_ms / WINDOW_MS * WINDOW_MS;

    let exe = std::env::current_exe().context("cannot find this executable")?;
    let (tx, mut events) = mpsc::channel(256);
    let mut seen = Seen::default();

    // 1. The aggregator, reading from the earliest offset (so it would
    // miss nothing even if it started last).
    let (sensors_arg, readings_arg) = (sensors.to_string(), readings.to_string());
    let mut aggregator = spawn(
        &exe,
        "aggregator",
        &[
            "aggregator",
            "--bootstrap",
            &addr,
            "--sensors",
            &sensors_arg,
            "--readings",
            &readings_arg,
        ],
        &tx,
    )?;
    until(
        &mut events,
        &mut seen,
        start_ms,
        "the aggregator to start",
        |s| s.ready,
    )
    .await?;

    // 2. The sensors, all at once.
    let start_arg = start_ms.to_string();
    let mut procs = Vec::new();
    for i in 1..=sensors {
        let index = i.to_string();
        let args = [
            "sensor",
            "--bootstrap",
            &addr,
            "--index",
            &index,
            "--readings",
            &readings_arg,
            "--start-ms",
            &start_arg,
        ];
        procs.push(spawn(&exe, &sensor_name(i), &args, &tx)?);
    }
    drop(tx);

    // 3. Until every sensor is done and the aggregator has read it all.
    until(
        &mut events,
        &mut seen,
        start_ms,
        "the readings to be appended and averaged",
        |s| s.appended.len() == sensors as usize && s.exit.is_some(),
    )
    .await?;
    for p in &mut procs {
        p.exited().await?;
    }
    aggregator.exited().await?;
    let info = host.stream(STREAM)?.info().await?;
    host.shutdown().await;

    // 4. Check every (window, sensor) against the readings.
    let total = u64::from(sensors) * u64::from(readings);
    let (records, late) = seen.exit.unwrap_or_default();
    ensure!(
        records == total,
        "the aggregator read {records} of {total} readings"
    );
    ensure!(late == 0, "{late} readings were late for their window");
    let stored: u64 = info.partitions.iter().map(|p| p.records()).sum();
    ensure!(
        stored == total,
        "the host holds {stored} readings, not {total}"
    );
    let mut expected: BTreeMap<(u64, String), Vec<f64>> = BTreeMap::new();
    for index in 1..=sensors {
        for i in 0..readings {
            let at = start_ms + u64::from(i) * EVERY_MS;
            expected
                .entry((at / WINDOW_MS * WINDOW_MS, sensor_name(index)))
                .or_default()
                .push(reading(index, i));
        }
    }
    ensure!(
        seen.windows.len() == expected.len(),
        "{} (window, sensor) averages, not {}",
        seen.windows.len(),
        expected.len()
    );
    for (key, values) in &expected {
        let got = seen
            .windows
            .get(key)
            .with_context(|| format!("no average for {} in window {}", key.1, key.0))?;
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        ensure!(
            got.count == values.len() as u64
                && (got.mean - mean).abs() < 1e-9
                && got.min == min
                && got.max == max,
            "{} in window {}: got {got:?}, expected {} readings averaging {mean}",
            key.1,
            key.0,
            values.len()
        );
    }

    // 5. The summary: a row per window, a column per sensor.
    let names: Vec<String> = (1..=sensors).map(sensor_name).collect();
    println!("\nsummary: average per sensor and 1 s window of event time");
    let header: String = names.iter().map(|n| format!("{n:>10}")).collect();
    println!("  {:<10}{header}", "window");
    let starts: std::collections::BTreeSet<u64> = expected.keys().map(|(s, _)| *s).collect();
    for start in starts {
        let row: String = names
            .iter()
            .map(|n| match seen.windows.get(&(start, n.clone())) {
                Some(f) => format!("{:>10.2}", f.mean),
                None => format!("{:>10}", "-"),
            })
            .collect();
        let from = (start - start_ms) / 1000;
        println!("  {:<10}{row}", format!("{from}-{} s", from + 1));
    }
    println!(
        "ok: {sensors} sensors x {readings} readings, {} window averages, each as computed from the readings; none late; took {:.1}s",
        expected.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
