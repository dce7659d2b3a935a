//! A throwaway `redis-server` for the test run: started on a free loopback port with no
//! persistence, handed to the tests through `KVC_REDIS_URL`, killed when dropped.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The variable the shared-tier tests read.
pub const URL_ENV: &str = "KVC_REDIS_URL";

const HOW_TO_INSTALL: &str = "redis-server not found on PATH: install it (Debian/Ubuntu: \
     `apt-get install redis-server`, Fedora: `dnf install redis`, macOS: `brew install redis`) \
     or point KVC_REDIS_URL at a server";

/// A running server, stopped on drop.
pub struct Redis {
    child: Child,
    /// Its URL.
    pub url: String,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        println!("== xtask: stopped redis-server ({})", self.url);
    }
}

fn on_path() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Installs Debian's package where that is possible (Linux, root, apt-get).
fn install() -> Result<(), String> {
    let apt = Command::new("apt-get")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !(cfg!(target_os = "linux") && apt && is_root()) {
        return Err(HOW_TO_INSTALL.to_string());
    }
    println!("== xtask: redis-server not found; installing Debian's redis-server package");
    for args in [
        &["update", "-qq"][..],
        &["install", "-y", "-qq", "redis-server"][..],
    ] {
        let ok = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err(format!(
                "`apt-get {}` failed; {HOW_TO_INSTALL}",
                args.join(" ")
            ));
        }
    }
    if on_path() {
        Ok(())
    } else {
        Err(HOW_TO_INSTALL.to_string())
    }
}

/// Starts a server for the test run (installing it first where possible).
pub fn start() -> Result<Redis, String> {
    if !on_path() {
        install()?;
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free loopback port for redis-server: {e}"))?
        .port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start redis-server: {e}"))?;
    let redis = Redis {
        child,
        url: format!("redis://127.0.0.1:{port}/"),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            println!("== xtask: started redis-server at {}", redis.url);
            return Ok(redis);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "redis-server on port {port} did not accept connections within 10 s"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throwaway_server_answers_and_is_gone_after_drop() {
        if !on_path() {
            assert!(
                std::env::var("CI").map_or(true, |v| v != "true"),
                "redis-server must be on PATH under CI=true"
            );
            eprintln!("skipped: no redis-server on PATH");
            return;
        }
        let server = start().unwrap();
        let port: u16 = server
            .url
            .trim_end_matches('/')
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
        drop(server);
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    }
}
