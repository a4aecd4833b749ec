//! Crash tests of the SQLite outbox and inbox, with real processes: the
//! `outbox_orders` example's producer (or its consumer) is killed with
//! SIGKILL at least [`KILLS`] times, each time at a moment chosen by its
//! progress in its SQLite file, and started again. At the end, both files
//! must say that every committed order was processed exactly once.
//!
//! The moments come from a seeded RNG; each test prints its seed and the
//! command that replays it (`MESH_CRASH_SEED=SEED`). The queue's host is a
//! node in the test process, so it outlives every kill.

mod common;

use std::{
    collections::BTreeMap,
    fs::OpenOptions,
    io::Write as _,
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::ExitStatus,
    sync::OnceLock,
    time::Duration,
};

use mesh::{
    store::rusqlite::{self, Connection, OpenFlags, OptionalExtension as _},
    Node,
};
use tokio::process::{Child, Command};

/// Kills per test, at least.
const KILLS: u32 = 20;
/// Orders the producer is first asked for; more are asked for if it
/// finishes before the kills are done.
const ORDERS: i64 = 2000;
/// Most progress (orders, confirmed events, processed orders) awaited
/// before a kill.
const MAX_STEP: u64 = 200;
/// Longest wait for any one step (a kill point, a process finishing, the
/// consumer catching up).
const STEP: Duration = Duration::from_secs(30);

const ORDERS_SQL: &str = "SELECT count(*) FROM orders";
const SENT_SQL: &str = "SELECT value FROM mesh_outbox_state WHERE key = 'sent'";
const PROCESSED_SQL: &str = "SELECT count(*) FROM processed";
const DISTINCT_SQL: &str = "SELECT count(DISTINCT order_id) FROM processed";

/// The example, built once for both tests.
fn outbox_orders() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| common::example("outbox_orders"))
}

/// splitmix64: small, seeded, the same on every platform.
struct Rng(u64);

impl Rng {
    /// From `MESH_CRASH_SEED`, or from the clock; prints it with the
    /// command that replays the test.
    fn for_test(test: &str) -> (Rng, u64) {
        let seed = match std::env::var("MESH_CRASH_SEED") {
            Ok(s) => s
                .parse()
                .unwrap_or_else(|_| panic!("MESH_CRASH_SEED={s:?} is not a u64")),
            Err(_) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
        };
        println!("{test}: seed {seed} (replay: MESH_CRASH_SEED={seed} cargo test --test crash {test} -- --nocapture)");
        (Rng(seed), seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// How much progress to wait for before the next kill: 0 (kill at
    /// once, before the process has done anything) one time in eight,
    /// else 1 to [`MAX_STEP`].
    fn kill_point(&mut self) -> u64 {
        if self.below(8) == 0 {
            0
        } else {
            1 + self.below(MAX_STEP)
        }
    }
}

/// Opens `path` read-only (its writer may be running, or dead mid-write:
/// WAL lets a reader in at any time); `None` if it does not exist yet.
fn read_only(path: &Path) -> rusqlite::Result<Option<Connection>> {
    if !path.exists() {
        return Ok(None);
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(10))?;
    Ok(Some(conn))
}

/// One number from `path`; 0 while the file or its table does not exist.
fn try_metric(path: &Path, sql: &str) -> rusqlite::Result<u64> {
    let Some(conn) = read_only(path)? else {
        return Ok(0);
    };
    match conn.query_row(sql, [], |r| r.get::<_, i64>(0)).optional() {
        Ok(n) => Ok(n.unwrap_or(0) as u64),
        Err(rusqlite::Error::SqliteFailure(_, Some(m))) if m.starts_with("no such table") => Ok(0),
        Err(e) => Err(e),
    }
}

/// [`try_metric`], tried again a few times if the read fails (a reader
/// may meet a file whose writer was killed mid-write before the next
/// connection recovers it); fails the test if it keeps failing.
fn metric(path: &Path, sql: &str) -> u64 {
    let mut tries = 0;
    loop {
        match try_metric(path, sql) {
            Ok(n) => return n,
            Err(e) if tries < 50 => {
                tries += 1;
                eprintln!("{}: {sql}: {e} (reading again)", path.display());
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("{}: {sql}: {e}", path.display()),
        }
    }
}

/// Opens `path` read-only for the final check.
fn open_final(path: &Path) -> Connection {
    read_only(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .unwrap_or_else(|| panic!("{} does not exist", path.display()))
}

/// A child process (killed when dropped) and its log file.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

/// How a process ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Killed,
    /// Exited 0 by itself (before the kill reached it).
    Finished,
}

impl Proc {
    /// The last lines of its log, for a failure message.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(40);
        format!(
            "last lines of {}:\n{}",
            self.log.display(),
            lines[from..].join("\n")
        )
    }

    /// Has it exited? Fails the test if it exited with an error.
    fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.try_wait().expect("try_wait")?;
        assert!(
            status.success(),
            "{} failed: {status}\n{}",
            self.name,
            self.log_tail()
        );
        Some(status)
    }

    /// Waits for it to exit by itself, successfully.
    async fn finish(&mut self) {
        let status = tokio::time::timeout(STEP, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} did not finish within {STEP:?}\n{}",
                    self.name,
                    self.log_tail()
                )
            })
            .expect("wait");
        assert!(
            status.success(),
            "{} failed: {status}\n{}",
            self.name,
            self.log_tail()
        );
    }

    /// SIGKILL, and reap it.
    async fn kill(&mut self) -> End {
        // An error here means it had exited already; `wait` says how.
        let _ = self.child.start_kill();
        let status = tokio::time::timeout(STEP, self.child.wait())
            .await
            .expect("a killed process is reaped in time")
            .expect("wait");
        match status.signal() {
            // SIGKILL
            Some(9) => End::Killed,
            _ if status.success() => End::Finished,
            _ => panic!(
                "{} failed before the kill: {status}\n{}",
                self.name,
                self.log_tail()
            ),
        }
    }
}

/// The queue's host (in this process), the example, and the two files.
struct Harness {
    host: Node,
    addr: String,
    exe: &'static Path,
    pdb: PathBuf,
    cdb: PathBuf,
    runs: u32,
    started: std::time::Instant,
    /// The files and the processes' logs; kept if the test fails.
    dir: tempfile::TempDir,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!(
                "kept {} (producer.db, consumer.db and the processes' logs)",
                self.dir.path().display()
            );
        }
    }
}

impl Harness {
    async fn start() -> Harness {
        let exe = outbox_orders();
        let dir = tempfile::tempdir().unwrap();
        let host = Node::builder()
            .listen(common::loopback())
            .mdns(false)
            .host_all()
            .start()
            .await
            .expect("the host starts");
        let addr = common::addr(&host).await.to_string();
        Harness {
            pdb: dir.path().join("producer.db"),
            cdb: dir.path().join("consumer.db"),
            host,
            addr,
            exe,
            runs: 0,
            started: std::time::Instant::now(),
            dir,
        }
    }

    fn spawn(&mut self, name: &'static str, args: &[&str]) -> Proc {
        self.runs += 1;
        let log = self.dir.path().join(format!("{name}.log"));
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        writeln!(file, "--- run {}: {args:?}", self.runs).unwrap();
        let child = Command::new(self.exe)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("the example starts");
        Proc { name, child, log }
    }

    fn producer(&mut self, orders: i64, per_tx: u64) -> Proc {
        let (db, addr, n, per_tx) = (
            self.pdb.display().to_string(),
            self.addr.clone(),
            orders.to_string(),
            per_tx.to_string(),
        );
        self.spawn(
            "producer",
            &[
                "produce",
                "--db",
                &db,
                "--bootstrap",
                &addr,
                "--orders",
                &n,
                "--per-tx",
                &per_tx,
            ],
        )
    }

    fn consumer(&mut self) -> Proc {
        let (db, addr) = (self.cdb.display().to_string(), self.addr.clone());
        // A small prefetch: a kill finds deliveries in every state, from
        // received to committed and not acked.
        self.spawn(
            "consumer",
            &[
                "consume",
                "--db",
                &db,
                "--bootstrap",
                &addr,
                "--prefetch",
                "4",
            ],
        )
    }

    /// Waits for every committed order to be processed and the queue to
    /// settle, stops the consumer, and checks both files.
    async fn check(&self, test: &str, seed: u64, mut consumer: Proc, kills: u32, how: &str) {
        let committed: Vec<i64> = {
            let conn = open_final(&self.pdb);
            let mut stmt = conn.prepare("SELECT id FROM orders ORDER BY id").unwrap();
            let ids = stmt
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            ids
        };
        // Lost orders would keep this waiting: on a timeout the counts
        // below say which.
        let queue = self.host.queue("orders").unwrap();
        let deadline = tokio::time::Instant::now() + STEP;
        let settled = loop {
            assert!(
                consumer.exited().is_none(),
                "the consumer exited\n{}",
                consumer.log_tail()
            );
            let stats = queue.host_stats().await.unwrap();
            // All processed, and all acked (acks are batched): nothing can
            // be delivered again.
            if metric(&self.cdb, DISTINCT_SQL) >= committed.len() as u64
                && stats.waiting + stats.in_flight == 0
            {
                break true;
            }
            if tokio::time::Instant::now() >= deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(consumer.kill().await, End::Killed);
        let stats = queue.host_stats().await.unwrap();

        let conn = open_final(&self.cdb);
        let mut processed: BTreeMap<i64, u64> = BTreeMap::new();
        let mut stmt = conn.prepare("SELECT order_id FROM processed").unwrap();
        for id in stmt.query_map([], |r| r.get::<_, i64>(0)).unwrap() {
            *processed.entry(id.unwrap()).or_default() += 1;
        }
        let counter = |name: &str| -> u64 {
            conn.query_row("SELECT n FROM counters WHERE name = ?1", [name], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap() as u64
        };
        let (delivered, skipped, rejected) = (
            counter("delivered"),
            counter("skipped"),
            counter("rejected"),
        );
        let rows: u64 = processed.values().sum();
        let duplicates: Vec<(i64, u64)> = processed
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(id, n)| (*id, *n))
            .collect();
        let duplicated: u64 = duplicates.iter().map(|(_, n)| n - 1).sum();
        let lost: Vec<i64> = committed
            .iter()
            .filter(|id| !processed.contains_key(id))
            .copied()
            .collect();
        let unknown: Vec<i64> = processed
            .keys()
            .filter(|id| committed.binary_search(id).is_err())
            .copied()
            .collect();
        println!(
            "{test}: seed {seed}: committed {}, delivered {delivered}, processed {rows}, \
             skipped repeats {skipped}, duplicates {duplicated}, lost {}, kills {kills}{how} \
             (host: accepted {}, deduplicated {}, redelivered {}, dead-lettered {}, acked {}); \
             {} process runs, {:.1}s",
            committed.len(),
            lost.len(),
            stats.accepted,
            stats.deduplicated,
            stats.redelivered,
            stats.dead_lettered,
            stats.acked,
            self.runs,
            self.started.elapsed().as_secs_f64(),
        );
        let first = |v: &[i64]| -> String {
            v.iter()
                .take(20)
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        assert!(
            duplicates.is_empty(),
            "orders processed more than once (id, times), first 20: {:?}",
            &duplicates[..duplicates.len().min(20)]
        );
        assert!(
            lost.is_empty(),
            "{} committed orders never processed, first 20: {}",
            lost.len(),
            first(&lost)
        );
        assert!(
            unknown.is_empty(),
            "orders processed that were never committed: {}",
            first(&unknown)
        );
        assert!(settled, "the queue did not settle: {stats:?}");
        assert_eq!(rejected, 0, "deliveries that were not orders");
        // The relay's resends carry the row's id as dedup key: the host
        // takes each order once.
        assert_eq!(
            stats.accepted,
            committed.len() as u64,
            "the host accepted resends: {stats:?}"
        );
        assert_eq!(delivered, rows + skipped, "every delivery counted once");
        assert!(kills >= KILLS);
    }
}

/// The producer is killed at least [`KILLS`] times while it writes orders
/// and while its relay sends them; the consumer runs throughout. Every
/// committed order arrives once (the relay resends what was not
/// confirmed, the host drops the repeats by their dedup keys, and what
/// gets through would be skipped by the inbox).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_killed() {
    let (mut rng, seed) = Rng::for_test("producer_killed");
    let mut h = Harness::start().await;
    let consumer = h.consumer();
    let mut orders = ORDERS;
    let mut kills = 0;
    // When the kills landed: at start (before any progress), while it
    // was writing orders, or once all were written and its relay sent
    // the rest.
    let (mut at_start, mut writing, mut relaying) = (0, 0, 0);
    let mut finished = false;
    while kills < KILLS {
        let by = rng.kill_point();
        // Half the kills by orders committed, the others by events
        // confirmed by the host (the relay's deletes). It writes much
        // faster than its relay sends, so a kill while writing needs
        // orders left to write: it is asked for more.
        let sql = if finished || rng.below(2) == 0 {
            orders = orders.max((metric(&h.pdb, ORDERS_SQL) + by) as i64 + 300);
            ORDERS_SQL
        } else {
            SENT_SQL
        };
        // Transactions of 1 to 10 orders.
        let mut producer = h.producer(orders, 1 + rng.below(10));
        let want = metric(&h.pdb, sql) + by;
        let deadline = tokio::time::Instant::now() + STEP;
        let end = loop {
            if metric(&h.pdb, sql) >= want {
                break producer.kill().await;
            }
            if producer.exited().is_some() {
                break End::Finished;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the producer made no progress ({sql} < {want}) within {STEP:?}\n{}",
                producer.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        // Done before the kill point (fewer events left than `by`): the
        // next kill is while writing more.
        finished = end == End::Finished;
        if end == End::Killed {
            kills += 1;
            if by == 0 {
                at_start += 1;
            } else if metric(&h.pdb, ORDERS_SQL) < orders as u64 {
                writing += 1;
            } else {
                relaying += 1;
            }
        }
    }
    let mut producer = h.producer(orders, 5);
    producer.finish().await;
    let how = format!(" ({at_start} at start, {writing} while writing, {relaying} while relaying)");
    h.check("producer_killed", seed, consumer, kills, &how)
        .await;
}

/// The consumer is killed at least [`KILLS`] times while it processes;
/// the producer runs normally. Deliveries it had committed but not acked
/// come again and are skipped by the inbox; none is processed twice, none
/// is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_killed() {
    let (mut rng, seed) = Rng::for_test("consumer_killed");
    let mut h = Harness::start().await;
    let mut orders = ORDERS;
    let mut producer = h.producer(orders, 5);
    let (mut kills, mut at_start) = (0, 0);
    while kills < KILLS {
        let mut consumer = h.consumer();
        let by = rng.kill_point();
        if by == 0 {
            at_start += 1;
        }
        let want = metric(&h.cdb, PROCESSED_SQL) + by;
        let deadline = tokio::time::Instant::now() + STEP;
        while metric(&h.cdb, PROCESSED_SQL) < want {
            assert!(
                consumer.exited().is_none(),
                "the consumer exited\n{}",
                consumer.log_tail()
            );
            // Everything committed is processed: more orders.
            if producer.exited().is_some()
                && metric(&h.cdb, DISTINCT_SQL) >= metric(&h.pdb, ORDERS_SQL)
            {
                orders += 1000;
                producer = h.producer(orders, 5);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the consumer made no progress ({PROCESSED_SQL} < {want}) within {STEP:?}\n{}",
                consumer.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(consumer.kill().await, End::Killed);
        kills += 1;
    }
    let consumer = h.consumer();
    producer.finish().await;
    let how = format!(
        " ({at_start} at start, {} while processing)",
        kills - at_start
    );
    h.check("consumer_killed", seed, consumer, kills, &how)
        .await;
}
