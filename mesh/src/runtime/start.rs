//! Starting a node: its identity, its store, its transport (or the
//! simulator's), and the node task with everything it owns.

use super::*;

/// Loads the identity from `dir/identity.key`, creating it (mode 0600) if
/// missing.
fn load_identity(dir: &std::path::Path) -> Result<Keypair, StartError> {
    let path = dir.join("identity.key");
    std::fs::create_dir_all(dir).map_err(|source| StartError::DataDir {
        path: dir.to_owned(),
        source,
    })?;
    match std::fs::read(&path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes).map_err(|e| StartError::Identity {
            path,
            reason: format!("not a valid key ({e}); move it away to generate a new identity"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .map_err(|e| StartError::Identity {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            write_private(&path, &bytes).map_err(|source| StartError::DataDir {
                path: path.clone(),
                source,
            })?;
            Ok(key)
        }
        Err(e) => Err(StartError::Identity {
            path,
            reason: e.to_string(),
        }),
    }
}

fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Opens the store of a durable host: one with a data dir that hosts
/// (one-shot tools, which host nothing, keep only their identity there).
/// A simulated node's data dir is its simulated disk.
fn open_durable(
    config: &Config,
) -> Result<(Option<durable::Durable>, Option<engine::durable::Loaded>), StartError> {
    let hosts = config.self_host
        || config.host_all
        || !config.host_queues.is_empty()
        || !config.host_streams.is_empty();
    let Some(dir) = config.data_dir.as_ref().filter(|_| config.durable && hosts) else {
        return Ok((None, None));
    };
    if let Some(env) = &config.env {
        let (backend, done, loaded) = env.open_store();
        return Ok((Some(durable::Durable::new(backend, done)), Some(loaded)));
    }
    open_sqlite(dir)
}

#[cfg(feature = "sqlite")]
fn open_sqlite(
    dir: &std::path::Path,
) -> Result<(Option<durable::Durable>, Option<engine::durable::Loaded>), StartError> {
    let (store, loaded) = crate::store::host::HostStore::open(dir)?;
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let backend = store.spawn(done_tx)?;
    Ok((Some(durable::Durable::new(backend, done_rx)), Some(loaded)))
}

#[cfg(not(feature = "sqlite"))]
fn open_sqlite(
    _: &std::path::Path,
) -> Result<(Option<durable::Durable>, Option<engine::durable::Loaded>), StartError> {
    tracing::warn!("built without the sqlite feature: hosted queues and streams stay in memory");
    Ok((None, None))
}

/// What a node runs on: its transport and the transport's events, how it
/// spawns tasks, its wall clock and its random numbers.
type Attached = (
    Box<dyn Transport>,
    mpsc::Receiver<quic::Event>,
    Spawner,
    WallClock,
    SmallRng,
);

/// Attaches to the configured environment (the simulator's), or starts
/// the QUIC transport.
async fn attach(config: &Config, keypair: Keypair) -> Result<Attached, StartError> {
    Ok(match &config.env {
        Some(env) => {
            let (transport, events) = env.attach(&config.bootstrap);
            (
                transport,
                events,
                Spawner::new(env.spawn()),
                env.wall_clock(),
                SmallRng::seed_from_u64(env.seed()),
            )
        }
        None => {
            let (handle, events) = quic::start(
                keypair,
                quic::Config {
                    listen: config.listen.clone(),
                    bootstrap: config.bootstrap.clone(),
                    mdns: config.mdns_enabled(),
                    // Kademlia and identify answer anyone who connects: a
                    // private mesh does without them.
                    discovery: !config.admission.is_private(),
                    ..quic::Config::default()
                },
            )
            .await?;
            (
                Box::new(handle) as Box<dyn Transport>,
                events,
                Spawner::default(),
                WallClock::System,
                SmallRng::from_entropy(),
            )
        }
    })
}

/// Starts the transport and the node task.
pub(crate) async fn start(config: Config) -> Result<Node, StartError> {
    let admission = Arc::new(config.admission.clone());
    let access = config.access.clone().map(crate::security::Access::new);
    let keypair = match (&config.keypair, &config.data_dir) {
        (Some(k), _) => k.clone(),
        (None, Some(dir)) => load_identity(dir)?,
        (None, None) => Keypair::generate_ed25519(),
    };
    let local = keypair.public().to_peer_id();
    let signer = crate::security::Signer::new(keypair.clone());
    let member_proofs = crate::security::MemberProofs::new(keypair.clone());
    let (transport, transport_events, spawner, clock, rng) = attach(&config, keypair).await?;

    let shm_host = if config.shm.enabled && !config.replayable() {
        // Rings of processes that died mid-handshake have nobody to unlink
        // them.
        shm::remove_stale(&config.shm.dir);
        shm::host_id()
    } else {
        Vec::new()
    };
    let (cmd_tx, cmd_rx) = mpsc::channel(256);
    let publishes = Arc::new(PublishQueue::new(PUBLISH_QUEUE));
    let work_bounded = Arc::new(queue::HandOff::new(PUBLISH_QUEUE));
    let work_control = Arc::new(queue::HandOff::new(usize::MAX));
    let (unsub_tx, unsub_rx) = mpsc::unbounded_channel();
    let (link_tx, link_rx) = mpsc::channel(64);
    let (control_tx, control_rx) = mpsc::channel(256);
    let now = now();
    let epoch = clock.unix_micros();
    let space = Arc::new(Notify::new());
    let config_for_work = config.clone();
    let (durable, loaded) = open_durable(&config)?;
    let task = NodeTask {
        engine: Engine::new(
            EngineConfig {
                link_buffer: config.link_buffer,
                reliable_window: config.reliable_window,
                gossip: config.gossip.clone(),
            },
            engine::Parts {
                local,
                membership: Membership::new(
                    local,
                    Vec::new(),
                    epoch,
                    config.membership.clone(),
                    now,
                )
                .with_proofs(Box::new(member_proofs)),
                epoch,
                access,
                signer,
                rng,
                work: engine::work::Work::new(&config_for_work),
                streams: engine::streams::Streams::new(&config_for_work, local),
                durable: durable.is_some(),
                now,
            },
        ),
        sub_queues: Default::default(),
        links: Default::default(),
        next_link: 0,
        link_events: link_tx,
        transport,
        listen_addrs: Vec::new(),
        connected: Default::default(),
        ready: config.bootstrap.is_empty(),
        ready_waiters: Vec::new(),
        synced: false,
        joined_waiters: Vec::new(),
        listening_waiters: Vec::new(),
        space,
        reader_counts: Default::default(),
        next_reconnect: now + RECONNECT_INTERVAL,
        clock,
        spawner: spawner.clone(),
        config,
        blocked_subs: Default::default(),
        stats: Stats::default(),
        shutting_down: false,
        shm_host,
        broken: Default::default(),
        lingering: Default::default(),
        admission,
        admitted: Default::default(),
        unadmitted_control: Default::default(),
        refused: Default::default(),
        last_drop_warning: None,
        control_inflight: Default::default(),
        publishes: publishes.clone(),
        control_out: Default::default(),
        control_tx,
        control_readers: Arc::new(tokio::sync::Semaphore::new(MAX_CONTROL_READERS)),
        work_bounded: work_bounded.clone(),
        work_control: work_control.clone(),
        work_scratch: Vec::new(),
        work_scratch_bounded: Vec::new(),
        durable,
    };
    let mut task = task;
    // Queue deliveries carry this run's start time: a restarted host
    // (durable or not) refuses settles of tags it handed out before.
    task.engine.work.epoch = epoch;
    // Request ids are keyed: random in a real node, of the node's id in
    // the simulator (so its runs repeat).
    if task.config.replayable() {
        use sha2::Digest;
        task.engine.work.request_key = sha2::Sha256::digest(task.engine.local.to_bytes()).into();
    } else {
        rand::thread_rng().fill_bytes(&mut task.engine.work.request_key);
    }
    if let Some(loaded) = loaded {
        task.restore_durable(loaded, epoch)?;
    }
    for p in task
        .engine
        .work
        .host_patterns()
        .into_iter()
        .chain(task.engine.streams.host_patterns())
    {
        task.engine.interest.subscribe(&p, false);
    }
    let max_payload = task.config.max_frame.saturating_sub(1024);
    spawner.spawn(task.run(cmd_rx, unsub_rx, link_rx, control_rx, transport_events));
    Ok(Node {
        inner: Arc::new(Inner {
            peer_id: local,
            cmd: cmd_tx,
            publishes,
            unsubscribe: unsub_tx,
            max_payload,
            work_bounded,
            work_control,
            next_id: Default::default(),
            metrics_server: Default::default(),
            clock,
        }),
    })
}
