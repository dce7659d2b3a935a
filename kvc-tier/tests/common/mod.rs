//! Helpers of the kvc-tier integration tests: namespaces, block payloads, temporary folders and
//! Redis servers.
#![allow(dead_code, clippy::print_stderr)]

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvc_core::{DType, KvLayout, StoreKey, StoreNamespace};

/// A namespace of 256-byte blocks for `model`.
pub fn ns(model: &str) -> StoreNamespace {
    StoreNamespace::new(model, KvLayout::new(2, 2, 4, 4, DType::F16).unwrap(), 0, 1).unwrap()
}

pub const BLOCK: usize = 256;

/// The payload of block `key`: a pattern only that key produces.
pub fn payload(key: u128) -> Vec<u8> {
    let mut x = (key as u64) ^ 0x9e37_79b9_7f4a_7c15;
    (0..BLOCK)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Keys and payloads of `keys`.
pub fn blocks(keys: impl IntoIterator<Item = u128>) -> (Vec<StoreKey>, Vec<u8>) {
    let keys: Vec<u128> = keys.into_iter().collect();
    (
        keys.iter().map(|&k| StoreKey(k)).collect(),
        keys.iter().flat_map(|&k| payload(k)).collect(),
    )
}

/// A fresh folder under the target directory, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("kvc-tier-{name}-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The Redis server of the test run (`KVC_REDIS_URL`). Unset: under `CI=true` the test
/// fails; otherwise it prints one skip line and the caller returns.
pub fn redis_url(test: &str) -> Option<String> {
    match std::env::var(kvc_tier::REDIS_URL_ENV) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                !ci(),
                "{test}: KVC_REDIS_URL is not set under CI=true; run the tests through `cargo xtask test`, which starts a redis-server"
            );
            eprintln!("{test}: skipped, KVC_REDIS_URL is not set (cargo xtask test sets it)");
            None
        }
    }
}

/// A redis-server this test starts, stops and restarts itself (for fault tests).
pub struct OwnRedis {
    pub port: u16,
    child: Option<Child>,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl OwnRedis {
    /// Starts one on a free loopback port; `None` (skip line, or failure under CI) when no
    /// `redis-server` is on PATH.
    pub fn start(test: &str) -> Option<Self> {
        let mut r = Self {
            port: free_port(),
            child: None,
        };
        if r.restart().is_err() {
            assert!(
                !ci(),
                "{test}: cannot start redis-server from PATH under CI=true"
            );
            eprintln!("{test}: skipped, no redis-server on PATH");
            return None;
        }
        Some(r)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// (Re)starts the server on the same port and waits until it accepts connections.
    pub fn restart(&mut self) -> Result<(), String> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err("redis-server did not start".into())
    }

    /// Kills the server (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
