//! Private meshes: who may join.
//!
//! A node given a [`MeshSecret`] (see [`crate::Builder::mesh_secret`])
//! admits only peers that prove they hold it. Right after the `Hello`
//! frames of a link, each side sends HMAC-SHA256 proofs keyed by its
//! secrets over a transcript of both peer ids and both sides' fresh random
//! nonces: the proof cannot be replayed on another link, nor by another
//! peer id (QUIC's TLS already authenticates the peer ids). Neither side
//! sends anything else, not even its view of the mesh or its topic names,
//! until it has checked the other's proof. A peer that fails is refused,
//! logged and counted, and its control traffic (membership) is ignored.
//!
//! An allow-list of peer ids ([`crate::Builder::allow_peers`]) works the
//! same way, alone or together with a secret (then a peer needs both).
//!
//! Rotation: a secret file may hold several secrets, one per line. A node
//! proves with each of them and accepts a proof by any of them, so a mesh
//! moves to a new secret by adding it to every node's file (in any order,
//! restarting nodes one by one), then removing the old one.

use std::{fmt, path::Path};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::core::NodeId;

/// Shortest secret accepted, in bytes: 128 bits.
pub const MIN_SECRET_LEN: usize = 16;
/// Most secrets one node holds at once (rotation needs two).
pub const MAX_SECRETS: usize = 4;
/// The environment variable the CLI reads a secret from.
pub const SECRET_ENV: &str = "MESH_SECRET";
/// The environment variable the CLI reads a secret file's path from.
pub const SECRET_FILE_ENV: &str = "MESH_SECRET_FILE";

/// Length of a link's handshake nonce and of a proof.
pub(crate) const NONCE_LEN: usize = 32;
pub(crate) type Nonce = [u8; NONCE_LEN];
pub(crate) type Proof = [u8; 32];

/// The shared secret(s) of a private mesh. Its `Debug` output shows how
/// many secrets it holds, never their bytes.
#[derive(Clone)]
pub struct MeshSecret {
    secrets: Vec<Vec<u8>>,
}

impl fmt::Debug for MeshSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MeshSecret({} secret(s), redacted)", self.secrets.len())
    }
}

/// Why a mesh secret was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file could not be read.
    #[error("mesh secret file {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file may be read by other users.
    #[error("mesh secret file {path} is readable by other users (mode {mode:o}); chmod 600 it")]
    Permissions {
        /// The file.
        path: std::path::PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// No secret in the file or variable.
    #[error("no mesh secret given ({0} is empty)")]
    Empty(String),
    /// A secret shorter than [`MIN_SECRET_LEN`].
    #[error("a mesh secret must be at least {MIN_SECRET_LEN} bytes (one is {0})")]
    TooShort(usize),
    /// More than [`MAX_SECRETS`] secrets.
    #[error("at most {MAX_SECRETS} mesh secrets at once ({0} given)")]
    TooMany(usize),
    /// The environment variable is not set or not Unicode.
    #[error("environment variable {0} is not set or not valid Unicode")]
    Env(String),
}

impl MeshSecret {
    /// One secret, at least [`MIN_SECRET_LEN`] bytes.
    pub fn new(secret: impl AsRef<[u8]>) -> Result<Self, SecretError> {
        Self::from_secrets([secret.as_ref().to_vec()])
    }

    /// Several secrets (for rotation): proofs are made with each, and a
    /// proof by any of them is accepted.
    pub fn from_secrets(
        secrets: impl IntoIterator<Item = impl Into<Vec<u8>>>,
    ) -> Result<Self, SecretError> {
        let secrets: Vec<Vec<u8>> = secrets.into_iter().map(Into::into).collect();
        if secrets.is_empty() {
            return Err(SecretError::Empty("the list".into()));
        }
        if secrets.len() > MAX_SECRETS {
            return Err(SecretError::TooMany(secrets.len()));
        }
        if let Some(short) = secrets.iter().find(|s| s.len() < MIN_SECRET_LEN) {
            return Err(SecretError::TooShort(short.len()));
        }
        Ok(Self { secrets })
    }

    /// Reads secrets from a file, one per line (surrounding whitespace
    /// trimmed; empty lines and lines starting with `#` skipped). The file
    /// must not be readable by group or others.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, SecretError> {
        let path = path.as_ref();
        let io = |source| SecretError::Io {
            path: path.to_owned(),
            source,
        };
        let text = std::fs::read_to_string(path).map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(SecretError::Permissions {
                    path: path.to_owned(),
                    mode: mode & 0o777,
                });
            }
        }
        let secrets: Vec<Vec<u8>> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| l.as_bytes().to_vec())
            .collect();
        if secrets.is_empty() {
            return Err(SecretError::Empty(path.display().to_string()));
        }
        Self::from_secrets(secrets)
    }

    /// Reads secrets from an environment variable (several separated by
    /// commas).
    pub fn from_env(var: &str) -> Result<Self, SecretError> {
        let value = std::env::var(var).map_err(|_| SecretError::Env(var.to_owned()))?;
        let secrets: Vec<Vec<u8>> = value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.as_bytes().to_vec())
            .collect();
        if secrets.is_empty() {
            return Err(SecretError::Empty(var.to_owned()));
        }
        Self::from_secrets(secrets)
    }

    /// The proofs `prover` sends `verifier`, one per secret.
    pub(crate) fn proofs(
        &self,
        prover: &NodeId,
        verifier: &NodeId,
        prover_nonce: &Nonce,
        verifier_nonce: &Nonce,
    ) -> Vec<Proof> {
        self.secrets
            .iter()
            .map(|s| {
                transcript(s, prover, verifier, prover_nonce, verifier_nonce)
                    .finalize()
                    .into_bytes()
                    .into()
            })
            .collect()
    }

    /// Whether one of `proofs` is by one of our secrets (compared in
    /// constant time).
    pub(crate) fn verify(
        &self,
        proofs: &[Proof],
        prover: &NodeId,
        verifier: &NodeId,
        prover_nonce: &Nonce,
        verifier_nonce: &Nonce,
    ) -> bool {
        self.secrets.iter().any(|s| {
            proofs.iter().any(|p| {
                transcript(s, prover, verifier, prover_nonce, verifier_nonce)
                    .verify_slice(p)
                    .is_ok()
            })
        })
    }
}

/// The MAC over everything a proof binds: a label, both peer ids (who
/// proves to whom) and both nonces, each length-prefixed.
fn transcript(
    secret: &[u8],
    prover: &NodeId,
    verifier: &NodeId,
    prover_nonce: &Nonce,
    verifier_nonce: &Nonce,
) -> Hmac<Sha256> {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(b"mesh private-mesh proof v1");
    for part in [
        prover.to_bytes().as_slice(),
        verifier.to_bytes().as_slice(),
        prover_nonce,
        verifier_nonce,
    ] {
        mac.update(&(part.len() as u32).to_be_bytes());
        mac.update(part);
    }
    mac
}

/// Who a node admits: every peer (the default), or those holding the
/// secret and/or on the allow-list.
#[derive(Debug, Clone, Default)]
pub(crate) struct Admission {
    pub(crate) secret: Option<MeshSecret>,
    pub(crate) allow: Option<std::collections::HashSet<NodeId>>,
}

impl Admission {
    /// Whether the node admits only some peers.
    pub(crate) fn is_private(&self) -> bool {
        self.secret.is_some() || self.allow.is_some()
    }

    /// Whether `peer` may connect at all (the allow-list; the secret is
    /// checked in the handshake).
    pub(crate) fn allows(&self, peer: &NodeId) -> bool {
        self.allow.as_ref().is_none_or(|a| a.contains(peer))
    }
}

/// What a peer asks to do with a name (a topic, queue, stream or request
/// subject).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Op {
    /// Publish to a topic, send to a queue, append to a stream, send a
    /// request to a subject.
    Publish,
    /// Receive a topic, peek at a queue, read a stream or ask for its
    /// offsets (`info`). Grants [`Op::Consume`] too.
    Read,
    /// Consume a queue (take and settle its messages) and join a stream's
    /// consumer groups (declare membership, commit offsets); implied by
    /// [`Op::Read`].
    Consume,
    /// Answer requests on a subject (declare a responder for it).
    Serve,
    /// Host a queue (with its dead-letter queue) or a stream: declare
    /// itself its host, so that sends, appends and consumers go to it.
    Host,
}

/// Who a rule of an [`AccessPolicy`] is for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Who {
    Anyone,
    Peer(NodeId),
    Role(String),
}

#[derive(Debug, Clone)]
struct Rule {
    who: Who,
    op: Op,
    patterns: Vec<crate::Pattern>,
}

/// Access control: which peers (by id, or by named role) may publish to
/// and read which names. Enforced by the node that holds or forwards the
/// data: a queue or stream host refuses a send, append or read from a peer
/// without the right (the peer gets a typed refusal); a subscriber's node
/// drops messages from a publisher without it; a publisher's node sends a
/// topic only to subscribers allowed to read it. Denials are logged (once
/// per peer, name and operation) and counted. The node's own application
/// is never checked. With a policy, what no rule allows is denied.
///
/// Roles in the mesh are rights too: a peer's declaration that it serves
/// a subject (`serve`), hosts a queue or stream (`host`) or belongs to a
/// stream's consumer group (`consume`) is ignored by every node whose
/// policy does not grant it, so no request, send, append or group
/// partition is routed to it. A declared pattern counts as the name it
/// spells: `allow X serve svc.>` covers a responder on `svc.*`, but
/// `allow X serve svc.a` does not. `read` grants `consume`.
///
/// The text form, one rule per line (`#` starts a comment):
///
/// ```text
/// role billing 12D3KooW...A 12D3KooW...B
/// allow role:billing publish invoices.> orders.*.paid
/// allow role:billing read orders.>
/// allow role:billing serve billing.>
/// allow 12D3KooW...A host invoices
/// allow 12D3KooW...C read >
/// allow 12D3KooW...D consume jobs
/// allow * read public.>
/// ```
///
/// Patterns are those of subscriptions (`*` one segment, `>` the rest) and
/// match every kind of name.
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    roles: std::collections::HashMap<String, std::collections::HashSet<NodeId>>,
    rules: Vec<Rule>,
}

/// A policy that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("access policy {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A line that is not a rule.
    #[error("access policy line {line}: {reason}")]
    Syntax {
        /// Its number, from 1.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

impl AccessPolicy {
    /// A policy that allows nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Names a role held by `peers` (more calls add to it).
    pub fn role(mut self, name: &str, peers: impl IntoIterator<Item = NodeId>) -> Self {
        self.roles.entry(name.to_owned()).or_default().extend(peers);
        self
    }

    /// Allows `who` (`*`, `role:NAME` or a peer id) to do `op` on names
    /// matching each of `patterns`.
    pub fn allow(mut self, who: &str, op: Op, patterns: &[&str]) -> Result<Self, String> {
        let who = parse_who(who)?;
        let patterns = patterns
            .iter()
            .map(|p| crate::Pattern::new(p).map_err(|e| format!("pattern {p:?}: {e}")))
            .collect::<Result<_, _>>()?;
        self.rules.push(Rule { who, op, patterns });
        Ok(self)
    }

    /// Parses the text form (see the type's docs).
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let mut policy = Self::new();
        for (i, line) in text.lines().enumerate() {
            let syntax = |reason: String| PolicyError::Syntax {
                line: i + 1,
                reason,
            };
            let line = line.split('#').next().unwrap_or("").trim();
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                [] => {}
                ["role", name, peers @ ..] if !peers.is_empty() => {
                    let peers = peers
                        .iter()
                        .map(|p| {
                            p.parse::<NodeId>()
                                .map_err(|e| syntax(format!("peer id {p:?}: {e}")))
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    policy = policy.role(name, peers);
                }
                ["allow", who, op, patterns @ ..] if !patterns.is_empty() => {
                    let op = match *op {
                        "publish" => Op::Publish,
                        "read" => Op::Read,
                        "consume" => Op::Consume,
                        "serve" => Op::Serve,
                        "host" => Op::Host,
                        other => {
                            return Err(syntax(format!(
                                "{other:?} is not publish, read, consume, serve or host"
                            )))
                        }
                    };
                    policy = policy.allow(who, op, patterns).map_err(syntax)?;
                }
                _ => {
                    return Err(syntax(
                        "expected `role NAME PEER...` or `allow WHO publish|read|consume|serve|host PATTERN...`"
                            .into(),
                    ))
                }
            }
        }
        Ok(policy)
    }

    /// Reads the text form from a file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, PolicyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Whether `peer` may do `op` on `name`.
    pub fn permits(&self, peer: &NodeId, op: Op, name: &str) -> bool {
        self.rules.iter().any(|r| {
            (r.op == op || (op == Op::Consume && r.op == Op::Read))
                && match &r.who {
                    Who::Anyone => true,
                    Who::Peer(p) => p == peer,
                    Who::Role(role) => self.roles.get(role).is_some_and(|m| m.contains(peer)),
                }
                && r.patterns.iter().any(|p| p.matches(name))
        })
    }
}

fn parse_who(who: &str) -> Result<Who, String> {
    if who == "*" {
        return Ok(Who::Anyone);
    }
    if let Some(role) = who.strip_prefix("role:") {
        return Ok(Who::Role(role.to_owned()));
    }
    who.parse::<NodeId>()
        .map(Who::Peer)
        .map_err(|e| format!("{who:?} is not *, role:NAME or a peer id ({e})"))
}

/// The node's view of its policy: answers cached per peer, operation and
/// name (bounded: past its limit the cache starts over), and which denials
/// were logged.
#[derive(Debug)]
pub(crate) struct Access {
    policy: AccessPolicy,
    /// Per peer and operation, per name (looked up by `&str`, so a hit
    /// allocates nothing); `cached` entries in all.
    cache: std::collections::HashMap<(NodeId, Op), std::collections::HashMap<Box<str>, bool>>,
    cached: usize,
    pub(crate) denied: u64,
}

impl Access {
    const MAX_CACHED: usize = 16 * 1024;

    pub(crate) fn new(policy: AccessPolicy) -> Self {
        Self {
            policy,
            cache: Default::default(),
            cached: 0,
            denied: 0,
        }
    }

    /// Whether `peer` may do `op` on `name`; a denial is counted, and
    /// logged the first time.
    pub(crate) fn check(&mut self, peer: &NodeId, op: Op, name: &str) -> bool {
        if let Some(&ok) = self.cache.get(&(*peer, op)).and_then(|m| m.get(name)) {
            if !ok {
                self.denied += 1;
            }
            return ok;
        }
        let ok = self.policy.permits(peer, op, name);
        if !ok {
            self.denied += 1;
            tracing::warn!(%peer, ?op, name, "access denied by the policy");
        }
        if self.cached >= Self::MAX_CACHED {
            self.cache.clear();
            self.cached = 0;
        }
        self.cache
            .entry((*peer, op))
            .or_default()
            .insert(name.into(), ok);
        self.cached += 1;
        ok
    }

    /// Like [`check`](Self::check) without counting: for filtering
    /// routes, where nothing was asked.
    pub(crate) fn permits(&self, peer: &NodeId, op: Op, name: &str) -> bool {
        self.policy.permits(peer, op, name)
    }
}

/// Signs this node's gossip messages with its identity key and checks
/// those of others against the key in their peer id (Ed25519 ids embed
/// it). The signature covers a SHA-256 digest of origin, sequence number,
/// timestamp, topic and payload.
pub(crate) struct Signer {
    key: libp2p::identity::Keypair,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

/// Checks gossip signatures (one per link reader, so that the checks run
/// beside the node task, not in it).
#[derive(Debug, Default)]
pub(crate) struct Verifier {
    /// Public keys decoded from peer ids (bounded: starts over when full).
    keys: std::collections::HashMap<NodeId, libp2p::identity::PublicKey>,
}

impl Signer {
    pub(crate) fn new(key: libp2p::identity::Keypair) -> Self {
        Self { key }
    }

    fn digest(origin: NodeId, seq: u64, timestamp: u64, topic: &str, payload: &[u8]) -> [u8; 32] {
        use sha2::Digest;
        let mut h = Sha256::new();
        h.update(b"mesh gossip message v1");
        let origin = origin.to_bytes();
        for part in [origin.as_slice(), topic.as_bytes(), payload] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        h.update(seq.to_be_bytes());
        h.update(timestamp.to_be_bytes());
        h.finalize().into()
    }

    /// What a declaration's signature covers: its node, version and
    /// patterns (each length-prefixed), under a label of its own.
    fn declaration_digest(d: &crate::core::interest::Declaration) -> [u8; 32] {
        use sha2::Digest;
        let mut h = Sha256::new();
        h.update(b"mesh declaration v1");
        let node = d.node.to_bytes();
        h.update((node.len() as u64).to_be_bytes());
        h.update(&node);
        h.update(d.version.epoch.to_be_bytes());
        h.update(d.version.seq.to_be_bytes());
        for list in [&d.patterns, &d.reliable] {
            h.update((list.len() as u64).to_be_bytes());
            for p in list.iter() {
                h.update((p.as_str().len() as u64).to_be_bytes());
                h.update(p.as_str().as_bytes());
            }
        }
        h.finalize().into()
    }

    /// What a membership record's signature covers: node, incarnation
    /// and addrs (each length-prefixed), under a label of its own. Only
    /// Alive records are signed (by the member about itself).
    fn member_digest(u: &crate::core::membership::Update) -> [u8; 32] {
        use sha2::Digest;
        let mut h = Sha256::new();
        h.update(b"mesh member alive v1");
        let node = u.node.to_bytes();
        h.update((node.len() as u64).to_be_bytes());
        h.update(&node);
        h.update(u.incarnation.to_be_bytes());
        h.update((u.addrs.len() as u64).to_be_bytes());
        for a in &u.addrs {
            h.update((a.len() as u64).to_be_bytes());
            h.update(a);
        }
        h.finalize().into()
    }

    /// Our signature of our own declaration.
    pub(crate) fn sign_declaration(
        &self,
        d: &crate::core::interest::Declaration,
    ) -> std::sync::Arc<[u8]> {
        self.key
            .sign(&Self::declaration_digest(d))
            .unwrap_or_default()
            .into()
    }

    /// Our signature of a message we publish.
    pub(crate) fn sign(
        &self,
        origin: NodeId,
        seq: u64,
        timestamp: u64,
        topic: &str,
        payload: &[u8],
    ) -> bytes::Bytes {
        let digest = Self::digest(origin, seq, timestamp, topic, payload);
        // Ed25519 signing cannot fail; an empty signature would be refused
        // by every receiver, never accepted.
        self.key.sign(&digest).unwrap_or_default().into()
    }
}

/// Signs our membership records and checks others' (the core's
/// [`crate::core::membership::Proofs`]).
#[derive(Debug)]
pub(crate) struct MemberProofs {
    signer: Signer,
    verifier: Verifier,
}

impl MemberProofs {
    pub(crate) fn new(key: libp2p::identity::Keypair) -> Self {
        Self {
            signer: Signer::new(key),
            verifier: Verifier::default(),
        }
    }
}

impl crate::core::membership::Proofs for MemberProofs {
    fn sign(&self, update: &crate::core::membership::Update) -> std::sync::Arc<[u8]> {
        // Ed25519 signing cannot fail; an empty signature is refused.
        self.signer
            .key
            .sign(&Signer::member_digest(update))
            .unwrap_or_default()
            .into()
    }

    fn verify(&mut self, update: &crate::core::membership::Update) -> bool {
        let Some(signature) = update.signature.as_deref() else {
            return false;
        };
        let Some(key) = self.verifier.key_of(update.node) else {
            return false;
        };
        key.verify(&Signer::member_digest(update), signature)
    }
}

impl Verifier {
    const MAX_KEYS: usize = 4096;

    /// Whether `d` carries its node's signature (patterns sorted as the
    /// node sent them).
    pub(crate) fn verify_declaration(&mut self, d: &crate::core::interest::Declaration) -> bool {
        let Some(signature) = d.signature.as_deref() else {
            return false;
        };
        let Some(key) = self.key_of(d.node) else {
            return false;
        };
        key.verify(&Signer::declaration_digest(d), signature)
    }

    /// The public key inside `origin` (Ed25519 peer ids are the key).
    fn key_of(&mut self, origin: NodeId) -> Option<&libp2p::identity::PublicKey> {
        if !self.keys.contains_key(&origin) {
            let k = libp2p::identity::PublicKey::try_decode_protobuf(origin.as_ref().digest())
                .ok()
                .filter(|k| k.to_peer_id() == origin)?;
            if self.keys.len() >= Self::MAX_KEYS {
                self.keys.clear();
            }
            self.keys.insert(origin, k);
        }
        self.keys.get(&origin)
    }

    /// Whether `signature` is `origin`'s over this message.
    pub(crate) fn verify(
        &mut self,
        origin: NodeId,
        seq: u64,
        timestamp: u64,
        topic: &str,
        payload: &[u8],
        signature: &[u8],
    ) -> bool {
        if signature.is_empty() {
            return false;
        }
        let key = match self.keys.get(&origin) {
            Some(k) => k,
            None => {
                // Ed25519 peer ids are the key itself (identity multihash).
                let Ok(k) =
                    libp2p::identity::PublicKey::try_decode_protobuf(origin.as_ref().digest())
                else {
                    return false;
                };
                if k.to_peer_id() != origin {
                    return false;
                }
                if self.keys.len() >= Self::MAX_KEYS {
                    self.keys.clear();
                }
                self.keys.entry(origin).or_insert(k)
            }
        };
        key.verify(
            &Signer::digest(origin, seq, timestamp, topic, payload),
            signature,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (NodeId, NodeId) {
        (NodeId::random(), NodeId::random())
    }

    #[test]
    fn a_proof_checks_only_for_the_same_secret_peers_and_nonces() {
        let (a, b) = ids();
        let s = MeshSecret::new("correct horse battery staple").unwrap();
        let (na, nb) = ([1u8; 32], [2u8; 32]);
        let p = s.proofs(&a, &b, &na, &nb);
        assert!(s.verify(&p, &a, &b, &na, &nb));
        // Another secret, direction, peer or nonce: refused.
        let other = MeshSecret::new("another secret of enough bytes").unwrap();
        assert!(!other.verify(&p, &a, &b, &na, &nb));
        assert!(!s.verify(&p, &b, &a, &nb, &na));
        assert!(!s.verify(&p, &a, &NodeId::random(), &na, &nb));
        assert!(!s.verify(&p, &a, &b, &na, &[3u8; 32]));
        assert!(!s.verify(&[], &a, &b, &na, &nb));
    }

    #[test]
    fn rotation_accepts_either_secret() {
        let (a, b) = ids();
        let (na, nb) = ([7u8; 32], [9u8; 32]);
        let old = MeshSecret::new("the old secret, 16+ bytes").unwrap();
        let both =
            MeshSecret::from_secrets(["the new secret, 16+ bytes", "the old secret, 16+ bytes"])
                .unwrap();
        let new = MeshSecret::new("the new secret, 16+ bytes").unwrap();
        assert!(old.verify(&both.proofs(&b, &a, &nb, &na), &b, &a, &nb, &na));
        assert!(both.verify(&old.proofs(&a, &b, &na, &nb), &a, &b, &na, &nb));
        assert!(new.verify(&both.proofs(&b, &a, &nb, &na), &b, &a, &nb, &na));
        assert!(!new.verify(&old.proofs(&a, &b, &na, &nb), &a, &b, &na, &nb));
    }

    #[test]
    fn bad_secrets_are_refused_and_never_shown() {
        assert!(matches!(
            MeshSecret::new("short"),
            Err(SecretError::TooShort(5))
        ));
        assert!(matches!(
            MeshSecret::from_secrets(Vec::<Vec<u8>>::new()),
            Err(SecretError::Empty(_))
        ));
        assert!(matches!(
            MeshSecret::from_secrets(vec![vec![b'x'; 16]; 5]),
            Err(SecretError::TooMany(5))
        ));
        let s = MeshSecret::new("do not print me please").unwrap();
        assert!(!format!("{s:?}").contains("print"));
    }

    #[test]
    fn secret_files_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(
            &path,
            "# rotated 2026-12\nnew secret of the mesh\n\nold secret of the mesh\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            MeshSecret::from_file(&path),
            Err(SecretError::Permissions { mode: 0o644, .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let s = MeshSecret::from_file(&path).unwrap();
        assert_eq!(s.secrets.len(), 2);
        std::fs::write(&path, "# nothing\n\n").unwrap();
        assert!(matches!(
            MeshSecret::from_file(&path),
            Err(SecretError::Empty(_))
        ));
    }

    #[test]
    fn policies_allow_by_peer_role_and_anyone_and_deny_the_rest() {
        let (a, b) = ids();
        let c = NodeId::random();
        let text = format!(
            "# billing\nrole billing {a} {b}\nallow role:billing publish invoices.> orders.*.paid\n\
             allow {c} read >  # an auditor\nallow * read public.>\n"
        );
        let p = AccessPolicy::parse(&text).unwrap();
        assert!(p.permits(&a, Op::Publish, "invoices.eu.1"));
        assert!(p.permits(&b, Op::Publish, "orders.eu.paid"));
        assert!(!p.permits(&b, Op::Publish, "orders.eu.created"));
        assert!(!p.permits(&a, Op::Read, "invoices.eu.1"));
        assert!(p.permits(&c, Op::Read, "anything.at.all"));
        assert!(!p.permits(&c, Op::Publish, "public.news"));
        assert!(p.permits(&NodeId::random(), Op::Read, "public.news"));
        assert!(!p.permits(&NodeId::random(), Op::Read, "private.news"));
        for bad in [
            "allow",
            "allow * write x",
            "allow nobody read x",
            "allow * read bad..pattern",
            "role billing not-a-peer",
            "deny * read x",
        ] {
            assert!(
                matches!(
                    AccessPolicy::parse(bad),
                    Err(PolicyError::Syntax { line: 1, .. })
                ),
                "{bad}"
            );
        }
        let mut access = Access::new(p);
        assert!(!access.check(&a, Op::Read, "invoices.x"));
        assert!(!access.check(&a, Op::Read, "invoices.x"));
        assert!(access.check(&a, Op::Publish, "invoices.x"));
        assert_eq!(access.denied, 2);
    }

    #[test]
    fn gossip_signatures_bind_origin_and_content() {
        let key = libp2p::identity::Keypair::generate_ed25519();
        let origin = key.public().to_peer_id();
        let signer = Signer::new(key);
        let sig = signer.sign(origin, 7, 1000, "a.b", b"payload");
        let mut signer = Verifier::default();
        assert!(signer.verify(origin, 7, 1000, "a.b", b"payload", &sig));
        assert!(!signer.verify(origin, 7, 1000, "a.b", b"altered", &sig));
        assert!(!signer.verify(origin, 8, 1000, "a.b", b"payload", &sig));
        assert!(!signer.verify(origin, 7, 1000, "a.c", b"payload", &sig));
        // Another origin claiming it, or no signature.
        let other = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        assert!(!signer.verify(other, 7, 1000, "a.b", b"payload", &sig));
        assert!(!signer.verify(origin, 7, 1000, "a.b", b"payload", &[]));
    }
}
