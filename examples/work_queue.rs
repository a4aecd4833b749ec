//! A work queue across processes: one producer, competing workers, a
//! poison job that ends in the dead-letter queue.
//!
//! ```text
//! cargo run --example work_queue
//! cargo run --example work_queue -- --workers 5 --jobs 100
//! ```
//!
//! Run without a role, this process hosts the queue `jobs` on a node of its
//! own (`host_all`, as `mesh node` does), starts itself `--workers` times as
//! `work_queue worker --bootstrap ADDR --name wN` and once as `work_queue
//! producer`, and reads what they print (one JSON line per event). The
//! producer sends `--jobs` jobs and exits once the host has accepted each;
//! one job is poison: workers fail it every time, so after three attempts
//! the host moves it to `jobs.dlq`. Workers take one job at a time
//! (prefetch 1); each holds its first job until every worker has one, so
//! that all of them are seen competing. Then this process checks that
//! every good job was done (exactly once, or with the duplicates that
//! at-least-once delivery allows listed), shows who did how many, finds
//! the poison job in `jobs.dlq` with its attempt count, and exits 0; or
//! non-zero, saying what it was waiting for. Every wait has a timeout, and
//! the children die with this process (their stdin closes, or they are
//! killed).

use std::{
    collections::BTreeMap,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use mesh::{
    queue::{ConsumeOptions, Delivery},
    Multiaddr, Node,
};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, ChildStdin, Command},
    sync::mpsc,
};

/// The queue the jobs go through.
const QUEUE: &str = "jobs";
/// Deliveries of a job before the host dead-letters it.
const MAX_ATTEMPTS: u32 = 3;
/// How long a failed job waits before it is tried again, per attempt.
const RETRY_BACKOFF: Duration = Duration::from_millis(20);
/// Loopback only, port chosen by the system.
const LOOPBACK: &str = "/ip4/127.0.0.1/udp/0/quic-v1";
/// Longest wait for any one step (a process starting, the jobs being done).
const STEP: Duration = Duration::from_secs(30);

#[derive(Parser)]
struct Args {
    /// Worker processes to start.
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Jobs the producer sends.
    #[arg(long, default_value_t = 30)]
    jobs: u32,
    /// Which job (1 to --jobs) is poison.
    #[arg(long, default_value_t = 13)]
    poison: u32,
    #[command(subcommand)]
    role: Option<Role>,
}

/// The roles this process starts itself in.
#[derive(Subcommand)]
enum Role {
    /// Consume jobs, reporting each on stdout, until stdin closes.
    Worker {
        /// The node to join through.
        #[arg(long)]
        bootstrap: Multiaddr,
        /// Name in reports.
        #[arg(long)]
        name: String,
        /// Milliseconds of (simulated) work per job.
        #[arg(long, default_value_t = 10)]
        work_ms: u64,
    },
    /// Send the jobs, reporting each once the host has accepted it.
    Producer {
        /// The node to join through.
        #[arg(long)]
        bootstrap: Multiaddr,
        /// Jobs to send.
        #[arg(long)]
        jobs: u32,
        /// Which of them is poison.
        #[arg(long)]
        poison: u32,
    },
}

/// What a child prints, one JSON object per line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Report {
    /// A worker is consuming.
    Ready { worker: String, peer: String },
    /// A worker has its first job and waits for `go` on stdin.
    Holding {
        worker: String,
        job: String,
        attempt: u32,
    },
    /// A worker did a job and acked it.
    Done {
        worker: String,
        job: String,
        attempt: u32,
    },
    /// A worker failed a job and nacked it.
    Failed {
        worker: String,
        job: String,
        attempt: u32,
    },
    /// A worker stopped (its stdin closed).
    Exit { worker: String, done: u32 },
    /// The queue's host accepted a job from the producer.
    Sent { job: String, id: String },
}

fn job_name(n: u32, poison: u32) -> String {
    if n == poison {
        format!("job-{n:02} (poison)")
    } else {
        format!("job-{n:02}")
    }
}

fn is_poison(job: &str) -> bool {
    job.ends_with("(poison)")
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
        None => parent(args.workers, args.jobs, args.poison).await,
        Some(Role::Worker {
            bootstrap,
            name,
            work_ms,
        }) => worker(bootstrap, name, Duration::from_millis(work_ms)).await,
        Some(Role::Producer {
            bootstrap,
            jobs,
            poison,
        }) => producer(bootstrap, jobs, poison).await,
    }
}

/// A node on loopback that has joined the mesh through `bootstrap`. It
/// hosts no queue (the parent does), so a child can exit at any time
/// without losing jobs.
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

async fn producer(bootstrap: Multiaddr, jobs: u32, poison: u32) -> anyhow::Result<()> {
    // Its jobs are on the host once `send` resolves: it can exit then.
    let node = join(bootstrap).await?;
    let queue = node.queue(QUEUE)?;
    for n in 1..=jobs {
        let job = job_name(n, poison);
        let id = tokio::time::timeout(STEP, queue.send(job.clone()))
            .await
            .with_context(|| format!("the host did not accept {job} within {STEP:?}"))??;
        report(&Report::Sent {
            job,
            id: format!("{}/{}", id.publisher, id.seq),
        })?;
    }
    node.shutdown().await;
    Ok(())
}

/// Lines from the parent. A thread reads stdin, so that a pending read
/// never holds up the runtime's shutdown; the channel ends when stdin
/// closes, which is how the parent says stop (or dies).
fn parent_lines() -> mpsc::Receiver<String> {
    // The parent writes a single `go`.
    let (tx, rx) = mpsc::channel(4);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    rx
}

async fn worker(bootstrap: Multiaddr, name: String, work: Duration) -> anyhow::Result<()> {
    let node = join(bootstrap).await?;
    let mut jobs = node.queue(QUEUE)?.consume(
        ConsumeOptions::default()
            .prefetch(1)
            .max_attempts(MAX_ATTEMPTS)
            .visibility_timeout(Duration::from_secs(10)),
    );
    let mut parent = parent_lines();
    report(&Report::Ready {
        worker: name.clone(),
        peer: node.peer_id().to_string(),
    })?;
    // With prefetch 1 the host sends nothing more while this job is held:
    // it goes to the other workers.
    let mut held: Option<Delivery> = None;
    let mut go = false;
    let mut done = 0;
    let lifetime = tokio::time::sleep(Duration::from_secs(300));
    tokio::pin!(lifetime);
    loop {
        tokio::select! {
            d = jobs.next(), if go || held.is_none() => {
                let Some(d) = d else { break };
                if go {
                    done += process(&name, d, work).await?;
                } else {
                    report(&Report::Holding {
                        worker: name.clone(),
                        job: text(&d),
                        attempt: d.attempt(),
                    })?;
                    held = Some(d);
                }
            }
            line = parent.recv() => match line.as_deref() {
                Some("go") => {
                    go = true;
                    if let Some(d) = held.take() {
                        done += process(&name, d, work).await?;
                    }
                }
                Some(other) => bail!("unexpected line from the parent: {other:?}"),
                None => break,
            },
            _ = &mut lifetime => bail!("worker {name} ran for 5 minutes; giving up"),
        }
    }
    // Unsettled deliveries go back to the queue at once.
    drop(held);
    drop(jobs);
    node.shutdown().await;
    report(&Report::Exit { worker: name, done })
}

fn text(d: &Delivery) -> String {
    String::from_utf8_lossy(d.payload()).into_owned()
}

/// Does one job: acks it, or nacks it if it is poison. Returns 1 if done.
async fn process(worker: &str, d: Delivery, work: Duration) -> anyhow::Result<u32> {
    let job = text(&d);
    let attempt = d.attempt();
    if is_poison(&job) {
        // Back to the queue after a backoff, for any worker to try again;
        // after its last attempt the host moves it to `jobs.dlq`.
        d.nack(Some(RETRY_BACKOFF * attempt));
        report(&Report::Failed {
            worker: worker.to_owned(),
            job,
            attempt,
        })?;
        return Ok(0);
    }
    // The job itself (simulated): what makes the workers compete.
    tokio::time::sleep(work).await;
    d.ack();
    report(&Report::Done {
        worker: worker.to_owned(),
        job,
        attempt,
    })?;
    Ok(1)
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
    stdin: Option<ChildStdin>,
}

fn spawn(
    exe: &Path,
    name: &str,
    args: &[&str],
    events: &mpsc::Sender<Event>,
) -> anyhow::Result<Proc> {
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::piped())
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
        stdin: child.stdin.take(),
        child,
    })
}

impl Proc {
    async fn say(&mut self, line: &str) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("stdin already closed")?;
        stdin.write_all(format!("{line}\n").as_bytes()).await?;
        stdin.flush().await?;
        Ok(())
    }

    /// Waits for it to exit by itself; an error if it fails or takes too long.
    async fn exited(&mut self) -> anyhow::Result<()> {
        let status = tokio::time::timeout(STEP, self.child.wait())
            .await
            .with_context(|| format!("{} did not exit within {STEP:?}", self.name))??;
        ensure!(status.success(), "{} failed: {status}", self.name);
        Ok(())
    }
}

/// What the parent has heard so far.
#[derive(Debug, Default)]
struct Seen {
    ready: BTreeMap<String, String>,
    holding: BTreeMap<String, String>,
    /// Jobs the host accepted, in order.
    sent: Vec<String>,
    producer_closed: bool,
    /// Good job -> the workers that did it (more than one: a duplicate).
    done: BTreeMap<String, Vec<String>>,
    /// The poison job's deliveries: (attempt, worker).
    poison: Vec<(u32, String)>,
    exited: BTreeMap<String, u32>,
}

impl Seen {
    fn handle(&mut self, event: Event, jobs: u32) -> anyhow::Result<()> {
        match event {
            Event::Report(Report::Ready { worker, peer }) => {
                println!("  {worker} ready: {peer}");
                self.ready.insert(worker, peer);
            }
            Event::Report(Report::Holding {
                worker,
                job,
                attempt,
            }) => {
                println!("  {worker} holds {job} (attempt {attempt}) until every worker has one");
                self.holding.insert(worker, job);
            }
            Event::Report(Report::Done {
                worker,
                job,
                attempt,
            }) => {
                let again = if attempt > 1 { " (redelivered)" } else { "" };
                println!("  {worker} did {job}, attempt {attempt}{again}");
                self.done.entry(job).or_default().push(worker);
            }
            Event::Report(Report::Failed {
                worker,
                job,
                attempt,
            }) => {
                let then = if attempt >= MAX_ATTEMPTS {
                    "its last attempt: to jobs.dlq"
                } else {
                    "back to the queue after a backoff"
                };
                println!("  {worker} failed {job}, attempt {attempt}: nacked, {then}");
                ensure!(is_poison(&job), "{worker} failed a good job: {job}");
                self.poison.push((attempt, worker));
            }
            Event::Report(Report::Exit { worker, done }) => {
                self.exited.insert(worker, done);
            }
            Event::Report(Report::Sent { job, .. }) => self.sent.push(job),
            Event::Garbage(who, line) => bail!("{who} printed an unexpected line: {line:?}"),
            Event::Closed(who) if who == "producer" => {
                self.producer_closed = true;
                let n = self.sent.len();
                ensure!(
                    n == jobs as usize,
                    "the producer stopped after {n} of {jobs} jobs"
                );
                println!("  producer: the host accepted all {n} jobs");
            }
            Event::Closed(who) => {
                ensure!(
                    self.exited.contains_key(&who),
                    "{who} exited unexpectedly (see its stderr above)"
                );
            }
        }
        Ok(())
    }

    fn good_jobs(&self) -> impl Iterator<Item = &String> {
        self.sent.iter().filter(|j| !is_poison(j))
    }

    /// Every good job done, and the poison job failed on every attempt.
    fn all_settled(&self) -> bool {
        self.producer_closed
            && self.good_jobs().all(|j| self.done.contains_key(j))
            && self.poison.len() >= MAX_ATTEMPTS as usize
    }

    /// What it has heard, for a timeout message.
    fn progress(&self) -> String {
        let left: Vec<&str> = self
            .good_jobs()
            .filter(|j| !self.done.contains_key(*j))
            .map(String::as_str)
            .collect();
        let not_yet = if left.is_empty() {
            String::new()
        } else {
            format!(" (not yet: {})", left.join(", "))
        };
        format!(
            "{} worker(s) ready, {} holding a job; {} job(s) accepted by the host{}; \
             {} good job(s) done{not_yet}; the poison job failed {} of {MAX_ATTEMPTS} times; \
             {} worker(s) stopped",
            self.ready.len(),
            self.holding.len(),
            self.sent.len(),
            if self.producer_closed { " (all)" } else { "" },
            self.done.len(),
            self.poison.len(),
            self.exited.len(),
        )
    }
}

/// Handles events until `done(seen)` holds; fails after [`STEP`].
async fn until(
    events: &mut mpsc::Receiver<Event>,
    seen: &mut Seen,
    jobs: u32,
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
        seen.handle(event, jobs)?;
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

async fn parent(workers: usize, jobs: u32, poison: u32) -> anyhow::Result<()> {
    ensure!(workers >= 1, "--workers must be at least 1");
    ensure!(
        jobs as usize >= workers,
        "--jobs must be at least --workers (each worker first holds one)"
    );
    ensure!(
        (1..=jobs).contains(&poison),
        "--poison must be between 1 and --jobs"
    );
    let started = Instant::now();
    println!(
        "work_queue: this process hosts queue {QUEUE:?}; {workers} worker processes and a producer process join it on 127.0.0.1\n"
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

    let exe = std::env::current_exe().context("cannot find this executable")?;
    let (tx, mut events) = mpsc::channel(256);
    let mut seen = Seen::default();

    // 1. The workers, each consuming once it has joined.
    let mut procs = Vec::new();
    for i in 1..=workers {
        let name = format!("w{i}");
        let args = ["worker", "--bootstrap", &addr, "--name", &name];
        procs.push(spawn(&exe, &name, &args, &tx)?);
    }
    until(&mut events, &mut seen, jobs, "the workers to start", |s| {
        s.ready.len() == workers
    })
    .await?;

    // 2. The producer. Each worker takes a job and holds it; with prefetch 1
    // it gets no other, so the host hands the next ones to the others.
    let (jobs_arg, poison_arg) = (jobs.to_string(), poison.to_string());
    let producer_args = [
        "producer",
        "--bootstrap",
        &addr,
        "--jobs",
        &jobs_arg,
        "--poison",
        &poison_arg,
    ];
    let mut producer = spawn(&exe, "producer", &producer_args, &tx)?;
    drop(tx);
    until(
        &mut events,
        &mut seen,
        jobs,
        "every worker to hold a job",
        |s| s.holding.len() == workers,
    )
    .await?;
    println!("  every worker holds a job: go");
    for p in &mut procs {
        p.say("go").await?;
    }

    // 3. The workers compete for the rest.
    until(
        &mut events,
        &mut seen,
        jobs,
        "the jobs to be done",
        Seen::all_settled,
    )
    .await?;
    producer.exited().await?;

    // 4. The poison job is in the dead-letter queue (the last nack may still
    // be on its way here), and nothing is left in the queue (acks are
    // batched).
    let queue = host.queue(QUEUE)?;
    let dead = eventually("the poison job in jobs.dlq", || async {
        let dead = queue.dead_letters().peek(10).await?;
        Ok((!dead.is_empty()).then_some(dead))
    })
    .await?;
    eventually("the queue to empty", || async {
        Ok(queue.peek(1).await?.is_empty().then_some(()))
    })
    .await?;

    // 5. Stop the workers: their stdin closes.
    for p in &mut procs {
        p.stdin = None;
    }
    until(&mut events, &mut seen, jobs, "the workers to stop", |s| {
        s.exited.len() == workers
    })
    .await?;
    for p in &mut procs {
        p.exited().await?;
    }
    host.shutdown().await;

    // 6. The summary.
    let poison_job = job_name(poison, poison);
    let good = seen.good_jobs().count();
    let duplicates: Vec<_> = seen.done.iter().filter(|(_, w)| w.len() > 1).collect();
    let extra: usize = duplicates.iter().map(|(_, w)| w.len() - 1).sum();
    let mut per_worker: BTreeMap<&str, usize> =
        seen.ready.keys().map(|w| (w.as_str(), 0)).collect();
    for w in seen.done.values().flatten() {
        *per_worker.entry(w.as_str()).or_default() += 1;
    }
    println!("\nsummary:");
    if duplicates.is_empty() {
        println!("  {good} good jobs, each done by exactly one worker");
    } else {
        println!(
            "  {good} good jobs done, {extra} of them more than once (delivery is at least once):"
        );
        for (job, by) in &duplicates {
            println!("      {job} by {}", by.join(", "));
        }
    }
    let counts: Vec<_> = per_worker.iter().map(|(w, n)| format!("{w} {n}")).collect();
    println!(
        "  jobs per worker (competing consumers): {}",
        counts.join(", ")
    );
    for (w, n) in &per_worker {
        let reported = seen.exited.get(*w).copied().unwrap_or(0) as usize;
        ensure!(
            reported == *n,
            "{w} says it did {reported} jobs; its reports say {n}"
        );
    }
    let tries: Vec<_> = seen
        .poison
        .iter()
        .map(|(a, w)| format!("{a} by {w}"))
        .collect();
    println!("  {poison_job} failed on attempt {}", tries.join(", "));
    ensure!(
        dead.len() == 1 && dead[0].payload == poison_job.as_bytes(),
        "jobs.dlq should hold only {poison_job}, holds {} message(s)",
        dead.len()
    );
    let (attempts, why) = dead[0]
        .dead
        .clone()
        .unwrap_or((dead[0].attempts, String::new()));
    println!("  jobs.dlq (peek): {poison_job}, {attempts} attempts, {why:?}");
    ensure!(
        attempts == MAX_ATTEMPTS,
        "the poison job died after {attempts} attempts, not {MAX_ATTEMPTS}"
    );
    let once = if extra == 0 {
        "each exactly once".to_owned()
    } else {
        format!("{extra} duplicate(s)")
    };
    println!(
        "ok: {good} jobs done by {workers} competing workers ({once}); the poison job is in jobs.dlq after {attempts} attempts; took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
