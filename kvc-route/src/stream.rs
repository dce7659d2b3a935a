//! KV events over Redis Streams (or Valkey): [`Publisher`] on each engine, [`Subscriber`] on
//! each router.
//!
//! Keys, under a prefix (default `kvc`):
//!
//! - `{prefix}:engines`: a set of the engine ids that publish;
//! - `{prefix}:events:{engine}`: the engine's stream; each entry has one field `e`, one event
//!   frame (see [`crate::event`]); trimmed to about `max_len` entries (`XADD MAXLEN ~`);
//! - `{prefix}:snapshot:{engine}`: a string, the engine's latest snapshot frame, written every
//!   `snapshot_every` events. `max_len ≥ 2 × snapshot_every`, so the events after the latest
//!   snapshot are always still in the stream.
//!
//! A subscriber reads every engine's stream with `XREAD`. On a sequence gap (it fell behind
//! the trimming, joined late, or the engine was dropped and came back) it loads the engine's
//! snapshot and reads that stream again from its start, skipping what the snapshot covers.
//! A restarted publisher continues its engine's sequence and first publishes `Cleared`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use redis::{Connection, ConnectionLike, Value};
use thiserror::Error;

use crate::event::{
    ChainHash, EngineId, Event, EventBody, Scope, Snapshot, SnapshotGroup, Tier, decode_event,
    decode_snapshot, encode_event, encode_snapshot,
};
use crate::index::KvIndex;
use crate::ingest::{Ingest, IngestStats, Offer};

/// Why a publish or a poll failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The Redis server refused or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The server answered something this client does not understand.
    #[error("unexpected reply to {command}")]
    Reply {
        /// The command.
        command: &'static str,
    },
    /// A configuration value is impossible.
    #[error("bad stream configuration: {reason}")]
    Config {
        /// What is wrong.
        reason: &'static str,
    },
    /// The event would be refused by every subscriber (dropped as malformed, or refused by
    /// the index), leaving a gap in the engine's sequence that forces every router to resync
    /// from a snapshot. Nothing was published and no sequence number was used.
    #[error("event not published: {reason}")]
    BadEvent {
        /// What is wrong.
        reason: &'static str,
    },
    /// The connection was lost and the last attempt to connect again failed: the next one
    /// is made once `retry_in` has passed (`retry_after` of the configuration), so a server
    /// that stopped answering costs one timeout per `retry_after`, not one per call.
    #[error("the server was unreachable at the last attempt; next attempt in {retry_in:?}")]
    Unreachable {
        /// Time until the next attempt.
        retry_in: Duration,
    },
}

/// Checks that subscribers will apply `body` from a publisher of `block_size`-token blocks.
fn check_publishable(block_size: u32, body: &EventBody) -> Result<(), StreamError> {
    if let EventBody::Stored(s) = body {
        if s.block_size != block_size || block_size == 0 {
            return Err(StreamError::BadEvent {
                reason: "a stored event's block_size differs from the publisher's",
            });
        }
        if u64::from(s.token_count).div_ceil(u64::from(block_size)) != s.hashes.len() as u64 {
            return Err(StreamError::BadEvent {
                reason: "a stored event's token_count does not cover exactly its hashes",
            });
        }
    }
    Ok(())
}

/// Where and how an engine publishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublisherConfig {
    /// Key prefix.
    pub prefix: String,
    /// Tokens per block of the engine's hashes.
    pub block_size: u32,
    /// Approximate stream length kept.
    pub max_len: u64,
    /// Events between snapshots.
    pub snapshot_every: u64,
    /// Connect, read and write timeout of every call: a server that stops answering fails a
    /// publish after this long instead of stalling the engine.
    pub timeout: Duration,
    /// After a failed attempt to connect again, calls fail at once
    /// ([`StreamError::Unreachable`]) for this long before the next attempt (0: every call
    /// tries).
    pub retry_after: Duration,
}

impl PublisherConfig {
    /// Defaults: prefix `kvc`, 10,000 entries kept, a snapshot every 1,000 events, a
    /// one-second timeout, one second between attempts to connect again.
    #[must_use]
    pub fn new(block_size: u32) -> Self {
        Self {
            prefix: "kvc".into(),
            block_size,
            max_len: 10_000,
            snapshot_every: 1_000,
            timeout: DEFAULT_TIMEOUT,
            retry_after: DEFAULT_RETRY_AFTER,
        }
    }
}

/// The default connect, read and write timeout of publishers and subscribers.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// The default wait after a failed attempt to connect again.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// When the next attempt to connect again may be made: none after a success, `retry_after`
/// after a failure.
#[derive(Clone, Copy, Debug, Default)]
struct Backoff {
    next_try: Option<Instant>,
}

impl Backoff {
    /// [`StreamError::Unreachable`] while the wait after the last failure lasts.
    fn check(&self) -> Result<(), StreamError> {
        match self.next_try {
            Some(at) => match at.checked_duration_since(Instant::now()) {
                Some(retry_in) if !retry_in.is_zero() => Err(StreamError::Unreachable { retry_in }),
                _ => Ok(()),
            },
            None => Ok(()),
        }
    }

    /// The outcome of an attempt.
    fn record<T>(
        &mut self,
        attempt: Result<T, StreamError>,
        retry_after: Duration,
    ) -> Result<T, StreamError> {
        self.next_try = match &attempt {
            Ok(_) => None,
            Err(_) => Instant::now().checked_add(retry_after),
        };
        attempt
    }
}

/// Connects to `url` with `timeout` on the connect and on every read and write after it
/// (`read_extra` more on reads: a blocking `XREAD` waits that long by itself).
fn connect_with_timeout(
    url: &str,
    timeout: Duration,
    read_extra: Duration,
) -> Result<Connection, StreamError> {
    if timeout.is_zero() {
        return Err(StreamError::Config {
            reason: "timeout must be positive",
        });
    }
    let con = redis::Client::open(url)?.get_connection_with_timeout(timeout)?;
    con.set_read_timeout(Some(timeout.saturating_add(read_extra)))?;
    con.set_write_timeout(Some(timeout))?;
    Ok(con)
}

/// Whether a failed command may still have been carried out: the connection failed or timed
/// out after the command may have reached the server (a server's error reply says it was not).
fn outcome_unknown(e: &StreamError) -> bool {
    match e {
        StreamError::Redis(e) => e.is_io_error() || e.is_connection_dropped(),
        // Not sent, but counted as published all the same: the snapshot written once the
        // server is back carries it (see `Publisher::publish`).
        StreamError::Unreachable { .. } => true,
        _ => false,
    }
}

/// Publishes one engine's events.
pub struct Publisher {
    con: Connection,
    /// The server, for reconnecting after the connection was lost.
    url: String,
    engine: EngineId,
    cfg: PublisherConfig,
    seq: u64,
    mirror: HashMap<(Tier, Scope), HashSet<ChainHash>>,
    /// An event's publish failed with its outcome unknown: the snapshot is rewritten before
    /// the next event, so a router that never got that event resyncs past it.
    snapshot_due: bool,
    backoff: Backoff,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("engine", &self.engine)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

fn events_key(prefix: &str, engine: EngineId) -> String {
    format!("{prefix}:events:{}", engine.0)
}
fn snapshot_key(prefix: &str, engine: EngineId) -> String {
    format!("{prefix}:snapshot:{}", engine.0)
}
fn engines_key(prefix: &str) -> String {
    format!("{prefix}:engines")
}

fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// The elements of an array reply, or the key/value pairs of a map reply, flattened.
fn items(v: &Value) -> Option<Vec<&Value>> {
    match v {
        Value::Array(a) | Value::Set(a) => Some(a.iter().collect()),
        Value::Map(m) => Some(m.iter().flat_map(|(k, v)| [k, v]).collect()),
        _ => None,
    }
}

/// Registers `engine` in the set of publishing engines and returns the last sequence number it
/// published there (in its stream or its snapshot; 0 for none).
fn register(con: &mut Connection, prefix: &str, engine: EngineId) -> Result<u64, StreamError> {
    let last: Value = redis::cmd("XREVRANGE")
        .arg(events_key(prefix, engine))
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query(con)?;
    let mut seq = 0;
    if let Some(entries) = items(&last) {
        for entry in entries {
            if let Some(frame) = entry_frame(entry)
                && let Ok(e) = decode_event(frame)
            {
                seq = seq.max(e.seq);
            }
        }
    }
    let snap: Option<Vec<u8>> = redis::cmd("GET")
        .arg(snapshot_key(prefix, engine))
        .query(con)?;
    if let Some(s) = snap.and_then(|b| decode_snapshot(&b).ok()) {
        seq = seq.max(s.seq);
    }
    let _: Value = redis::cmd("SADD")
        .arg(engines_key(prefix))
        .arg(engine.0)
        .query(con)?;
    Ok(seq)
}

impl Publisher {
    /// Connects to `url` (`redis://host:port/`), registers the engine, continues its sequence
    /// after whatever an earlier incarnation published, and publishes `Cleared` (a new
    /// process starts with an empty cache) and an empty snapshot.
    ///
    /// # Errors
    /// A connection or server error, a timeout ([`PublisherConfig::timeout`]), or an
    /// impossible configuration.
    pub fn connect(url: &str, engine: EngineId, cfg: PublisherConfig) -> Result<Self, StreamError> {
        if cfg.snapshot_every == 0 || cfg.max_len < 2 * cfg.snapshot_every {
            return Err(StreamError::Config {
                reason: "max_len must be at least twice snapshot_every, which must be positive",
            });
        }
        if cfg.block_size == 0 {
            return Err(StreamError::Config {
                reason: "block_size must be positive",
            });
        }
        let mut con = connect_with_timeout(url, cfg.timeout, Duration::ZERO)?;
        let seq = register(&mut con, &cfg.prefix, engine)?;
        let mut p = Self {
            con,
            url: url.to_owned(),
            engine,
            cfg,
            seq,
            mirror: HashMap::new(),
            snapshot_due: false,
            backoff: Backoff::default(),
        };
        p.publish(EventBody::Cleared { tier: None }, 0)?;
        p.write_snapshot(0)?;
        Ok(p)
    }

    /// The engine.
    #[must_use]
    pub fn engine(&self) -> EngineId {
        self.engine
    }

    /// The sequence number of the last event published.
    #[must_use]
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Publishes one event; returns its sequence number. Every `snapshot_every` events the
    /// snapshot is rewritten.
    ///
    /// # Errors
    /// - [`StreamError::BadEvent`] for a [`Stored`](crate::Stored) event whose `block_size` is
    ///   not the publisher's or whose `token_count` does not match its hashes (subscribers
    ///   would drop it), [`StreamError::Reply`] or a server's error reply: nothing is
    ///   published and the sequence number is not used, so the next publish reuses it.
    /// - A connection failure, a server out of reach or a timeout
    ///   ([`PublisherConfig::timeout`]): the server may or may not have taken the event, so it
    ///   counts as published (its sequence number is
    ///   used, the publisher's view of the engine's holdings includes it) and the snapshot is
    ///   rewritten before the next event: a router that got it goes on, one that did not sees
    ///   a gap and resyncs from that snapshot. Reusing the number instead would make a router
    ///   that got the event skip the next one as a duplicate. Do not publish it again.
    /// - A failure writing the periodic snapshot after the event was added: the event is
    ///   published and counted; the snapshot is written again before the next event.
    ///
    /// A call that finds the connection dead (the server restarted, the network dropped it)
    /// fails; the next one connects again, registers the engine again, continues the
    /// sequence and rewrites the snapshot from everything the engine has published as held,
    /// so routers that missed events meanwhile resync from it. The engine never has to
    /// rebuild its publisher. When that attempt fails, calls fail at once with
    /// [`StreamError::Unreachable`] until [`PublisherConfig::retry_after`] has passed (their
    /// events count as published, as above), so a server that stopped answering costs the
    /// engine one timeout per `retry_after`, not one per event.
    pub fn publish(&mut self, body: EventBody, now_ms: u64) -> Result<u64, StreamError> {
        check_publishable(self.cfg.block_size, &body)?;
        let event = Event {
            engine: self.engine,
            seq: self.seq + 1,
            time_ms: now_ms,
            body,
        };
        if let Err(e) = self.send(&event, now_ms) {
            if outcome_unknown(&e) {
                self.seq = event.seq;
                self.mirror_apply(&event.body);
                self.snapshot_due = true;
            }
            return Err(e);
        }
        self.seq = event.seq;
        self.mirror_apply(&event.body);
        if self.seq.is_multiple_of(self.cfg.snapshot_every) {
            self.write_snapshot(now_ms)?;
        }
        Ok(self.seq)
    }

    /// Reconnects if the connection was lost, writes a snapshot that is due, then adds the
    /// event to the stream.
    fn send(&mut self, event: &Event, now_ms: u64) -> Result<(), StreamError> {
        self.reconnect_if_lost()?;
        if self.snapshot_due {
            self.write_snapshot(now_ms)?;
        }
        self.xadd(&encode_event(event))
    }

    /// Adds a raw frame to the engine's stream without taking a sequence number (for tests of
    /// subscribers against malformed input, and for relays).
    ///
    /// # Errors
    /// A server error.
    pub fn publish_raw(&mut self, frame: &[u8]) -> Result<(), StreamError> {
        self.xadd(frame)
    }

    fn xadd(&mut self, frame: &[u8]) -> Result<(), StreamError> {
        let _: Value = redis::cmd("XADD")
            .arg(events_key(&self.cfg.prefix, self.engine))
            .arg("MAXLEN")
            .arg("~")
            .arg(self.cfg.max_len)
            .arg("*")
            .arg("e")
            .arg(frame)
            .query(&mut self.con)?;
        Ok(())
    }

    /// Everything the engine has published as held, at the current sequence number.
    #[must_use]
    pub fn snapshot(&self, now_ms: u64) -> Snapshot {
        let mut groups: Vec<SnapshotGroup> = self
            .mirror
            .iter()
            .filter(|(_, set)| !set.is_empty())
            .map(|(&(tier, scope), set)| {
                let mut hashes: Vec<ChainHash> = set.iter().copied().collect();
                hashes.sort_unstable();
                SnapshotGroup {
                    tier,
                    scope,
                    hashes,
                }
            })
            .collect();
        groups.sort_by_key(|g| (g.tier, g.scope));
        Snapshot {
            engine: self.engine,
            seq: self.seq,
            time_ms: now_ms,
            block_size: self.cfg.block_size,
            groups,
        }
    }

    /// Writes the snapshot now.
    ///
    /// # Errors
    /// A server error.
    pub fn write_snapshot(&mut self, now_ms: u64) -> Result<(), StreamError> {
        self.reconnect_if_lost()?;
        let frame = encode_snapshot(&self.snapshot(now_ms));
        // Until one is written, the next publish writes it first.
        self.snapshot_due = true;
        let _: Value = redis::cmd("SET")
            .arg(snapshot_key(&self.cfg.prefix, self.engine))
            .arg(frame)
            .query(&mut self.con)?;
        self.snapshot_due = false;
        Ok(())
    }

    /// After a call found the connection dead (the server restarted or the network dropped
    /// it), connects again, registers the engine again (a restarted server lost the set),
    /// continues after the highest sequence number the server or this publisher knows, and
    /// has the snapshot rewritten before the next event: a router that missed events while
    /// the server was away resyncs from it, with everything the engine holds.
    fn reconnect_if_lost(&mut self) -> Result<(), StreamError> {
        if self.con.is_open() {
            return Ok(());
        }
        self.backoff.check()?;
        let attempt = connect_with_timeout(&self.url, self.cfg.timeout, Duration::ZERO).and_then(
            |mut con| register(&mut con, &self.cfg.prefix, self.engine).map(|s| (con, s)),
        );
        let (con, seq) = self.backoff.record(attempt, self.cfg.retry_after)?;
        self.con = con;
        self.seq = self.seq.max(seq);
        self.snapshot_due = true;
        Ok(())
    }

    fn mirror_apply(&mut self, body: &EventBody) {
        match body {
            EventBody::Stored(s) => {
                self.mirror
                    .entry((s.tier, s.scope))
                    .or_default()
                    .extend(s.hashes.iter().copied());
            }
            EventBody::Removed(r) => {
                if let Some(set) = self.mirror.get_mut(&(r.tier, r.scope)) {
                    for h in &r.hashes {
                        set.remove(h);
                    }
                }
            }
            EventBody::Cleared { tier } => {
                self.mirror
                    .retain(|(t, _), _| tier.is_some_and(|x| x != *t));
            }
            EventBody::Load(_) => {}
        }
    }
}

fn entry_frame(entry: &Value) -> Option<&[u8]> {
    // [id, [field, value, ...]]
    let parts = items(entry)?;
    let fields = items(parts.get(1)?)?;
    let mut it = fields.chunks_exact(2);
    it.find(|kv| bytes(kv[0]) == Some(b"e"))
        .and_then(|kv| bytes(kv[1]))
}

/// Where and how a router subscribes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriberConfig {
    /// Key prefix.
    pub prefix: String,
    /// Entries read per stream per poll.
    pub count: usize,
    /// How long one poll waits for new entries (0: not at all).
    pub block_ms: u64,
    /// Engines not heard from (events or load reports) for this long are dropped.
    pub engine_timeout_ms: u64,
    /// Connect, read and write timeout of every call (reads wait `block_ms` more): a server
    /// that stops answering fails a poll after this long instead of stalling the router.
    pub timeout: Duration,
    /// After a failed attempt to connect again, polls fail at once
    /// ([`StreamError::Unreachable`]) for this long before the next attempt (0: every poll
    /// tries).
    pub retry_after: Duration,
}

impl SubscriberConfig {
    /// Defaults: prefix `kvc`, 1,000 entries per poll, no waiting, engines dropped after 10 s,
    /// a one-second timeout, one second between attempts to connect again.
    #[must_use]
    pub fn new() -> Self {
        Self {
            prefix: "kvc".into(),
            count: 1_000,
            block_ms: 0,
            engine_timeout_ms: 10_000,
            timeout: DEFAULT_TIMEOUT,
            retry_after: DEFAULT_RETRY_AFTER,
        }
    }
}

impl Default for SubscriberConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// What one poll did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PollReport {
    /// Frames read.
    pub frames: usize,
    /// Engines dropped for silence.
    pub dropped: Vec<EngineId>,
    /// Engines still waiting for a usable snapshot.
    pub awaiting_snapshot: usize,
}

/// Reads every engine's stream into an index.
pub struct Subscriber {
    con: Connection,
    /// The server, for reconnecting after the connection was lost.
    url: String,
    cfg: SubscriberConfig,
    cursors: BTreeMap<EngineId, String>,
    ingest: Ingest,
    resync: BTreeSet<EngineId>,
    backoff: Backoff,
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber")
            .field("engines", &self.cursors.len())
            .field("stats", &self.ingest.stats())
            .finish_non_exhaustive()
    }
}

impl Subscriber {
    /// Connects to `url`.
    ///
    /// # Errors
    /// A connection error or timeout, or a zero `count` or `timeout`.
    pub fn connect(url: &str, cfg: SubscriberConfig) -> Result<Self, StreamError> {
        if cfg.count == 0 {
            return Err(StreamError::Config {
                reason: "count must be positive",
            });
        }
        let con = connect_with_timeout(url, cfg.timeout, Duration::from_millis(cfg.block_ms))?;
        Ok(Self {
            con,
            url: url.to_owned(),
            cfg,
            cursors: BTreeMap::new(),
            ingest: Ingest::new(),
            resync: BTreeSet::new(),
            backoff: Backoff::default(),
        })
    }

    /// The ingest counters (applied, duplicates, gaps, resyncs, malformed, refused).
    #[must_use]
    pub fn stats(&self) -> IngestStats {
        self.ingest.stats()
    }

    /// Reads what is new on every engine's stream into `index`, resynchronises engines with
    /// gaps from their snapshots, and drops silent engines.
    ///
    /// # Errors
    /// A server error, a timeout ([`SubscriberConfig::timeout`]) or a reply of the wrong
    /// shape; what was applied before it stays applied, and the next poll goes on from there
    /// (connecting again first when the connection was found dead; after a failed attempt,
    /// [`StreamError::Unreachable`] until [`SubscriberConfig::retry_after`] has passed).
    pub fn poll(&mut self, index: &mut KvIndex, now_ms: u64) -> Result<PollReport, StreamError> {
        if !self.con.is_open() {
            // The last call found the connection dead: connect again, keeping every cursor
            // (a restarted server's new entries sort after them).
            self.backoff.check()?;
            let attempt = connect_with_timeout(
                &self.url,
                self.cfg.timeout,
                Duration::from_millis(self.cfg.block_ms),
            );
            self.con = self.backoff.record(attempt, self.cfg.retry_after)?;
        }
        let mut report = PollReport::default();
        let members: Value = redis::cmd("SMEMBERS")
            .arg(engines_key(&self.cfg.prefix))
            .query(&mut self.con)?;
        for m in items(&members).ok_or(StreamError::Reply {
            command: "SMEMBERS",
        })? {
            let id = bytes(m)
                .and_then(|b| std::str::from_utf8(b).ok())
                .and_then(|s| s.parse::<u32>().ok());
            if let Some(id) = id {
                self.cursors
                    .entry(EngineId(id))
                    .or_insert_with(|| "0".into());
            }
        }
        self.resync_pending(index, now_ms)?;
        if !self.cursors.is_empty() {
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT").arg(self.cfg.count);
            if self.cfg.block_ms > 0 {
                cmd.arg("BLOCK").arg(self.cfg.block_ms);
            }
            cmd.arg("STREAMS");
            for &e in self.cursors.keys() {
                cmd.arg(events_key(&self.cfg.prefix, e));
            }
            for c in self.cursors.values() {
                cmd.arg(c);
            }
            let reply: Value = cmd.query(&mut self.con)?;
            if reply != Value::Nil {
                self.apply_reply(&reply, index, now_ms, &mut report)?;
            }
        }
        self.resync_pending(index, now_ms)?;
        index.expire(now_ms, self.cfg.engine_timeout_ms, &mut report.dropped);
        for &e in &report.dropped {
            self.ingest.forget(e);
        }
        report.awaiting_snapshot = self.resync.len();
        Ok(report)
    }

    fn apply_reply(
        &mut self,
        reply: &Value,
        index: &mut KvIndex,
        now_ms: u64,
        report: &mut PollReport,
    ) -> Result<(), StreamError> {
        let bad = StreamError::Reply { command: "XREAD" };
        let streams = items(reply).ok_or(StreamError::Reply { command: "XREAD" })?;
        // RESP2: [[key, entries], ...]; RESP3: {key: entries} (flattened to key, entries).
        let pairs: Vec<(&Value, &Value)> = if matches!(reply, Value::Map(_)) {
            streams.chunks_exact(2).map(|kv| (kv[0], kv[1])).collect()
        } else {
            let mut v = Vec::new();
            for s in streams {
                let kv = items(s).ok_or(StreamError::Reply { command: "XREAD" })?;
                if kv.len() != 2 {
                    return Err(bad);
                }
                v.push((kv[0], kv[1]));
            }
            v
        };
        for (key, entries) in pairs {
            let engine = bytes(key)
                .and_then(|k| std::str::from_utf8(k).ok())
                .and_then(|k| k.rsplit(':').next())
                .and_then(|id| id.parse::<u32>().ok())
                .map(EngineId)
                .ok_or(StreamError::Reply { command: "XREAD" })?;
            for entry in items(entries).ok_or(StreamError::Reply { command: "XREAD" })? {
                let id = items(entry)
                    .and_then(|p| p.first().and_then(|v| bytes(v)))
                    .and_then(|b| std::str::from_utf8(b).ok())
                    .ok_or(StreamError::Reply { command: "XREAD" })?
                    .to_owned();
                report.frames += 1;
                let offer = match entry_frame(entry) {
                    Some(frame) => self.ingest.offer(index, frame, now_ms),
                    None => self.ingest.offer(index, &[], now_ms),
                };
                if let Offer::Gap { .. } = offer {
                    // Leave the cursor before the gap; the snapshot decides where to go on.
                    self.resync.insert(engine);
                    break;
                }
                self.cursors.insert(engine, id);
            }
        }
        Ok(())
    }

    /// Loads the snapshot of every engine with a gap; on success its stream is read again
    /// from the start, the events the snapshot covers being skipped as duplicates.
    fn resync_pending(&mut self, index: &mut KvIndex, now_ms: u64) -> Result<(), StreamError> {
        let pending: Vec<EngineId> = self.resync.iter().copied().collect();
        for engine in pending {
            let frame: Option<Vec<u8>> = redis::cmd("GET")
                .arg(snapshot_key(&self.cfg.prefix, engine))
                .query(&mut self.con)?;
            let Some(snap) = frame.and_then(|f| decode_snapshot(&f).ok()) else {
                continue;
            };
            if snap.engine != engine {
                continue;
            }
            // An older snapshot than what is applied leaves the engine waiting for the next.
            if let Ok(true) = self.ingest.resync(index, &snap, now_ms) {
                self.resync.remove(&engine);
                self.cursors.insert(engine, "0".into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Stored;

    fn stored(block_size: u32, token_count: u32, blocks: u128) -> EventBody {
        EventBody::Stored(Stored {
            tier: Tier::Device,
            scope: Scope::default(),
            parent: None,
            block_size,
            token_count,
            hashes: (0..blocks).map(ChainHash).collect(),
        })
    }

    /// A server that accepts connections and never answers (a hung or stopped Redis).
    fn silent_server() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("redis://{}/", listener.local_addr().expect("address"));
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for c in listener.incoming() {
                held.push(c);
            }
        });
        url
    }

    #[test]
    fn a_server_that_stops_answering_fails_calls_instead_of_stalling_them() {
        let url = silent_server();
        let mut cfg = PublisherConfig::new(16);
        cfg.timeout = Duration::from_millis(50);
        let err = Publisher::connect(&url, EngineId(1), cfg.clone()).expect_err("no answer");
        assert!(
            matches!(&err, StreamError::Redis(e) if e.is_timeout()),
            "{err}"
        );
        cfg.timeout = Duration::ZERO;
        assert!(matches!(
            Publisher::connect(&url, EngineId(1), cfg),
            Err(StreamError::Config { .. })
        ));
        let mut cfg = SubscriberConfig::new();
        cfg.timeout = Duration::from_millis(50);
        cfg.block_ms = 10;
        let mut index = KvIndex::new(16);
        // Connecting sends nothing; the first poll waits for an answer that never comes.
        if let Ok(mut sub) = Subscriber::connect(&url, cfg) {
            let err = sub.poll(&mut index, 0).expect_err("no answer");
            assert!(
                matches!(&err, StreamError::Redis(e) if e.is_timeout()),
                "{err}"
            );
        }
        assert!(index.is_empty());
    }

    #[test]
    fn events_subscribers_would_drop_are_not_publishable() {
        assert!(check_publishable(16, &stored(16, 40, 3)).is_ok());
        assert!(check_publishable(16, &stored(16, 0, 0)).is_ok());
        assert!(check_publishable(16, &EventBody::Cleared { tier: None }).is_ok());
        assert!(matches!(
            check_publishable(16, &stored(32, 32, 1)),
            Err(StreamError::BadEvent { .. })
        ));
        assert!(matches!(
            check_publishable(16, &stored(16, 9_999, 0)),
            Err(StreamError::BadEvent { .. })
        ));
        assert!(matches!(
            check_publishable(16, &stored(16, 16, 2)),
            Err(StreamError::BadEvent { .. })
        ));
        assert!(matches!(
            check_publishable(0, &stored(0, 0, 0)),
            Err(StreamError::BadEvent { .. })
        ));
        // Every event that passes decodes on the subscriber's side.
        let event = Event {
            engine: EngineId(1),
            seq: 1,
            time_ms: 0,
            body: stored(16, 40, 3),
        };
        assert_eq!(decode_event(&encode_event(&event)), Ok(event));
    }
}
