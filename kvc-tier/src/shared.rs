//! The shared tier: KV blocks on a Redis or Valkey server, shared by every engine that reaches
//! it, through the blocking `redis` client.
//!
//! - **One value per block** holds a header (namespace encoding, key, length, XXH3-64 checksum)
//!   and the payload together, written by one `SET`, so a half-written block can never be read;
//!   a value whose header or checksum does not match is a miss.
//! - **Soft retention**: values are written with `SET … NX PX ttl`; the server drops them when
//!   the expiry passes or when its `maxmemory` policy needs room (run it with
//!   `maxmemory-policy allkeys-lru` or `volatile-lru`).
//! - **Leases**: before uploading a block a writer takes `SET lease:… token NX PX lease`; a
//!   writer that finds the lease taken skips the block (another engine is uploading it), so two
//!   engines do not push the same bytes at once. Leases are left to expire.
//! - **Pipelined batches**: every batch is one or two round trips, whatever its size.
//! - **Timeouts and failures**: every call has a connect, read and write timeout. A call that
//!   fails (server gone, timeout, reset) drops the connection and makes the tier answer misses
//!   without trying again for `retry_after`; then the next call reconnects. The caller never
//!   sees an error for a lost server, never hangs past the timeout, and serving goes on.
//!
//! Keys are `{prefix}:{namespace fingerprint}:{block hash}` (lease keys add `lease:`), so
//! blocks of other namespaces have other keys, and a fingerprint collision is still caught by
//! the header. With **Redis Cluster**, point one `SharedTier` per node group at a cluster-aware
//! proxy, or shard by key on the client side: keys hash to slots by their full name, so blocks
//! spread over the cluster, and a pipeline must then be split per node (`docs/tiers.md`).

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvc_core::{
    BlockStore, PutOutcome, StoreError, StoreKey, StoreNamespace, StoreUsage, check_buffer,
};
use redis::{Client, Connection, RedisError, Value};
use thiserror::Error;

use crate::codec::{decode_block, encode_block};

/// How to reach the shared server and how long blocks live there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedConfig {
    /// Server URL, for example `redis://127.0.0.1:6379/`.
    pub url: String,
    /// Prefix of every key, to share a server with other data.
    pub prefix: String,
    /// Expiry of stored blocks (soft retention).
    pub ttl: Duration,
    /// Expiry of an upload lease.
    pub lease: Duration,
    /// Connect, read and write timeout of every call.
    pub timeout: Duration,
    /// How long to answer misses after a failed call before reconnecting.
    pub retry_after: Duration,
}

impl SharedConfig {
    /// The server at `url` with key prefix `kvc`, a one-hour expiry, two-second leases, a
    /// 200 ms timeout and one second between reconnection attempts.
    #[must_use]
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: "kvc".into(),
            ttl: Duration::from_secs(3600),
            lease: Duration::from_secs(2),
            timeout: Duration::from_millis(200),
            retry_after: Duration::from_secs(1),
        }
    }
}

/// Why a [`SharedTier`] could not be built. (It does not connect when built: an engine starts
/// even while the server is down.)
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SharedConfigError {
    /// The URL is not a Redis URL.
    #[error("shared tier: bad server URL `{url}`: {source}")]
    Url {
        /// The URL.
        url: String,
        /// The client's complaint.
        #[source]
        source: RedisError,
    },
    /// A duration that must be positive was zero (or under a millisecond).
    #[error("shared tier: {what} must be at least 1 ms")]
    ZeroDuration {
        /// Which one.
        what: &'static str,
    },
}

/// Counters of a [`SharedTier`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SharedStats {
    /// Blocks found by `get`.
    pub hits: u64,
    /// Blocks asked of `get` and not found (including unreachable and corrupt).
    pub misses: u64,
    /// Blocks uploaded.
    pub stored: u64,
    /// Blocks not uploaded because another writer held their lease.
    pub leased_elsewhere: u64,
    /// Values that failed their header or checksum check.
    pub corrupt_values: u64,
    /// Calls answered as misses because the server was out of reach.
    pub unavailable_calls: u64,
    /// Connections opened.
    pub connects: u64,
}

struct Conn {
    con: Option<Connection>,
    down_until: Option<Instant>,
    stats: SharedStats,
}

/// A shared tier on Redis or Valkey: see the [module docs](self).
pub struct SharedTier {
    ns: StoreNamespace,
    ns_bytes: Vec<u8>,
    key_prefix: String,
    lease_prefix: String,
    token: String,
    client: Client,
    cfg: SharedConfig,
    conn: Mutex<Conn>,
}

impl std::fmt::Debug for SharedTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTier")
            .field("url", &self.cfg.url)
            .field("key_prefix", &self.key_prefix)
            .finish_non_exhaustive()
    }
}

fn millis(d: Duration, what: &'static str) -> Result<u64, SharedConfigError> {
    match u64::try_from(d.as_millis()) {
        Ok(0) => Err(SharedConfigError::ZeroDuration { what }),
        Ok(ms) => Ok(ms),
        Err(_) => Ok(u64::MAX),
    }
}

impl SharedTier {
    /// A shared tier for `ns` on the server of `cfg`; connects on first use.
    pub fn new(ns: StoreNamespace, cfg: SharedConfig) -> Result<Self, SharedConfigError> {
        millis(cfg.ttl, "ttl")?;
        millis(cfg.lease, "lease")?;
        millis(cfg.timeout, "timeout")?;
        let client = Client::open(cfg.url.as_str()).map_err(|source| SharedConfigError::Url {
            url: cfg.url.clone(),
            source,
        })?;
        let fp = ns.fingerprint();
        // Unique per tier instance: which engine holds a lease (for debugging; leases expire).
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let token = format!("{}-{nanos:x}", std::process::id());
        Ok(Self {
            ns_bytes: ns.encode(),
            key_prefix: format!("{}:{fp:016x}:", cfg.prefix),
            lease_prefix: format!("{}:lease:{fp:016x}:", cfg.prefix),
            ns,
            token,
            client,
            cfg,
            conn: Mutex::new(Conn {
                con: None,
                down_until: None,
                stats: SharedStats::default(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The counters so far.
    #[must_use]
    pub fn stats(&self) -> SharedStats {
        self.lock().stats
    }

    /// The server key of block `key`.
    #[must_use]
    pub fn server_key(&self, key: StoreKey) -> String {
        format!("{}{key}", self.key_prefix)
    }

    fn lease_key(&self, key: StoreKey) -> String {
        format!("{}{key}", self.lease_prefix)
    }

    /// Runs `f` on a live connection; `None` (counted) when the server is out of reach or the
    /// call failed. A connection that fails at once when reused (the server restarted since
    /// its last call) is replaced and the call tried once more on the new one; so a call waits
    /// at most one connect and two read timeouts.
    fn call<T>(
        &self,
        c: &mut Conn,
        mut f: impl FnMut(&mut Connection) -> redis::RedisResult<T>,
    ) -> Option<T> {
        let reused = c.con.is_some();
        match self.try_call(c, &mut f) {
            Ok(v) => Some(v),
            Err(true) if reused => {
                c.down_until = None;
                self.try_call(c, &mut f).ok()
            }
            Err(_) => None,
        }
    }

    /// One attempt: `Err(true)` when the connection was lost (and dropped), `Err(false)` for
    /// any other failure.
    fn try_call<T>(
        &self,
        c: &mut Conn,
        f: &mut impl FnMut(&mut Connection) -> redis::RedisResult<T>,
    ) -> Result<T, bool> {
        let now = Instant::now();
        if c.con.is_none() {
            if c.down_until.is_some_and(|t| now < t) {
                c.stats.unavailable_calls += 1;
                return Err(false);
            }
            let opened = self
                .client
                .get_connection_with_timeout(self.cfg.timeout)
                .and_then(|con| {
                    con.set_read_timeout(Some(self.cfg.timeout))?;
                    con.set_write_timeout(Some(self.cfg.timeout))?;
                    Ok(con)
                });
            match opened {
                Ok(con) => {
                    c.con = Some(con);
                    c.down_until = None;
                    c.stats.connects += 1;
                }
                Err(_) => {
                    c.down_until = Some(now + self.cfg.retry_after);
                    c.stats.unavailable_calls += 1;
                    return Err(false);
                }
            }
        }
        let Some(con) = c.con.as_mut() else {
            return Err(false);
        };
        match f(con) {
            Ok(v) => Ok(v),
            Err(e) => {
                // A server error reply leaves the connection usable; anything else may have
                // left a reply unread or the socket dead: drop it and back off.
                let lost = e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_unrecoverable_error();
                c.stats.unavailable_calls += 1;
                if lost {
                    c.con = None;
                    // A timeout means the server is slow or gone: do not try again at once.
                    c.down_until = Some(Instant::now() + self.cfg.retry_after);
                    Err(!e.is_timeout())
                } else {
                    Err(false)
                }
            }
        }
    }

    fn ms(d: Duration) -> u64 {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
    }
}

impl BlockStore for SharedTier {
    fn namespace(&self) -> &StoreNamespace {
        &self.ns
    }

    fn contains(&self, keys: &[StoreKey], found: &mut Vec<bool>) -> Result<usize, StoreError> {
        found.clear();
        found.resize(keys.len(), false);
        if keys.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for &k in keys {
            pipe.cmd("EXISTS").arg(self.server_key(k));
        }
        let mut c = self.lock();
        if let Some(counts) = self.call(&mut c, |con| pipe.query::<Vec<i64>>(con)) {
            for (f, n) in found.iter_mut().zip(counts) {
                *f = n > 0;
            }
        }
        Ok(found.iter().filter(|&&f| f).count())
    }

    fn get(
        &self,
        keys: &[StoreKey],
        dst: &mut [u8],
        found: &mut Vec<bool>,
    ) -> Result<usize, StoreError> {
        let bb = self.block_bytes();
        check_buffer(keys.len(), bb, dst.len())?;
        found.clear();
        found.resize(keys.len(), false);
        if keys.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for &k in keys {
            pipe.cmd("GET").arg(self.server_key(k));
        }
        let mut c = self.lock();
        let values = self
            .call(&mut c, |con| pipe.query::<Vec<Option<Vec<u8>>>>(con))
            .unwrap_or_default();
        let bbu = bb as usize;
        let mut hits = 0;
        for (i, v) in values.iter().enumerate() {
            let Some(v) = v else { continue };
            match decode_block(v, &self.ns_bytes, keys[i], bb) {
                Some(payload) => {
                    dst[i * bbu..(i + 1) * bbu].copy_from_slice(payload);
                    found[i] = true;
                    hits += 1;
                }
                None => c.stats.corrupt_values += 1,
            }
        }
        c.stats.hits += hits as u64;
        c.stats.misses += (keys.len() - hits) as u64;
        Ok(hits)
    }

    fn put(&self, keys: &[StoreKey], src: &[u8], _priority: u8) -> Result<PutOutcome, StoreError> {
        let bb = self.block_bytes();
        check_buffer(keys.len(), bb, src.len())?;
        let mut out = PutOutcome::default();
        if keys.is_empty() {
            return Ok(out);
        }
        // Round trip 1: take each block's lease and ask whether it is there already.
        let lease_ms = Self::ms(self.cfg.lease);
        let mut pipe = redis::pipe();
        for &k in keys {
            pipe.cmd("SET")
                .arg(self.lease_key(k))
                .arg(&self.token)
                .arg("NX")
                .arg("PX")
                .arg(lease_ms);
            pipe.cmd("EXISTS").arg(self.server_key(k));
        }
        let mut c = self.lock();
        let Some(replies) = self.call(&mut c, |con| pipe.query::<Vec<Value>>(con)) else {
            out.unavailable = keys.len();
            return Ok(out);
        };
        let bbu = bb as usize;
        let ttl_ms = Self::ms(self.cfg.ttl);
        let mut upload = redis::pipe();
        let mut uploading = 0;
        let mut value = Vec::new();
        for (i, pair) in replies.chunks(2).enumerate() {
            let leased = matches!(pair.first(), Some(Value::Okay));
            let exists = matches!(pair.get(1), Some(Value::Int(n)) if *n > 0);
            if exists {
                out.present += 1;
            } else if !leased {
                out.skipped += 1;
                c.stats.leased_elsewhere += 1;
            } else {
                encode_block(
                    &self.ns_bytes,
                    keys[i],
                    &src[i * bbu..(i + 1) * bbu],
                    &mut value,
                );
                upload
                    .cmd("SET")
                    .arg(self.server_key(keys[i]))
                    .arg(&value[..])
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms);
                uploading += 1;
            }
        }
        if uploading == 0 {
            return Ok(out);
        }
        // Round trip 2: the values, each whole in one SET.
        match self.call(&mut c, |con| upload.query::<Vec<Value>>(con)) {
            Some(replies) => {
                for r in replies {
                    if matches!(r, Value::Okay) {
                        out.stored += 1;
                    } else {
                        out.present += 1;
                    }
                }
                c.stats.stored += out.stored as u64;
            }
            None => out.unavailable += uploading,
        }
        Ok(out)
    }

    fn remove(&self, keys: &[StoreKey]) -> Result<usize, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for &k in keys {
            pipe.cmd("DEL").arg(self.server_key(k));
        }
        let mut c = self.lock();
        let removed = self
            .call(&mut c, |con| pipe.query::<Vec<i64>>(con))
            .map_or(0, |v| v.into_iter().filter(|&n| n > 0).count());
        Ok(removed)
    }

    /// What this tier uploaded so far; the server's memory and budget are its own
    /// (`INFO memory`), so the capacity is unknown here.
    fn usage(&self) -> StoreUsage {
        let stored = self.lock().stats.stored;
        StoreUsage {
            blocks: stored,
            bytes: stored * self.block_bytes(),
            capacity_bytes: None,
        }
    }
}
