//! Project automation for kvc, run as `cargo xtask <command>`.
//!
//! - `test`: every check: format, clippy of the workspace with `kvc-kernels/cuda` (no GPU
//!   needed: cudarc loads the driver at run time), the workspace tests, the build of
//!   kvc-kernels with `--features cuda` and its GPU tests (which skip without a driver), a
//!   smoke run of the benchmark report, the loom models, then the CUDA kernels' NVRTC and
//!   ptxas build (`kernels`). The tests and the smoke run get a throwaway `redis-server` on a
//!   free loopback port (`KVC_REDIS_URL`), started from PATH (installed with apt-get where
//!   missing and possible) and stopped at the end; a `KVC_REDIS_URL` already set is used
//!   instead.
//! - `loom`: the loom model checks, built with `--cfg kvc_loom` in `target/loom`.
//! - `bench`: the benchmark report (`kvc-bench report`: scenarios, hit rate against
//!   capacity, kernel bandwidth, quick micro-benchmarks) into `target/kvc-report/`;
//!   `bench --criterion` runs the criterion benchmarks of every crate instead.
//! - `kernels`: compiles every CUDA kernel with NVRTC for `compute_90` and assembles it with
//!   `ptxas -arch=sm_90 -v` (no GPU needed; installs the CUDA wheels when no toolkit is found).
//! - `gpu`: on a machine with an NVIDIA GPU, the CUDA op tests and the kernel benchmark.
#![allow(clippy::print_stdout, clippy::print_stderr)]
#![forbid(unsafe_code)]

mod gpu;
mod kernels;
#[cfg(test)]
mod layering;
mod redis;

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  test    every check: fmt, clippy (with CUDA), workspace tests (with a throwaway
          redis-server), CUDA build, report smoke run, loom, kernels
  loom    loom model checks of the concurrent code (release, --cfg kvc_loom)
  bench   benchmark report into target/kvc-report/index.md (+ SVG plots)
          [--quick | --full] [--trace PATH] [--out DIR]
          --criterion [criterion args]: the criterion benches of every crate instead
  kernels compile every CUDA kernel with NVRTC and ptxas for sm_90 (no GPU needed)
  gpu     on an NVIDIA GPU: CUDA op tests against the CPU and the kernel benchmark";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let Some(command) = args.first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let rest = &args[1..];
    let result = match command.as_str() {
        "test" => test(),
        "loom" => loom(),
        "bench" => bench(rest),
        "kernels" => kernels::kernels(),
        "gpu" => gpu::gpu(rest),
        "help" | "-h" | "--help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown command `{other}`\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("xtask: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (the parent of this crate's folder).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn cargo() -> Command {
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Runs a command, naming it on the way in and failing with its name on the way out.
fn run(step: &str, mut cmd: Command) -> Result<(), String> {
    println!("\n== xtask: {step}");
    let status = cmd
        .status()
        .map_err(|e| format!("{step}: could not start: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{step} failed ({status})"))
    }
}

fn test() -> Result<(), String> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--check"]);
    run("cargo fmt --check", fmt)?;

    // With the CUDA ops: cudarc loads the driver and NVRTC at run time, so this needs no GPU
    // and no CUDA toolkit, and the CUDA code is checked with everything else.
    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--features",
        "kvc-kernels/cuda",
        "--",
        "-D",
        "warnings",
    ]);
    run("cargo clippy (with kvc-kernels/cuda)", clippy)?;

    // The API docs are what adopters read: a broken or private link is an error.
    let mut doc = cargo();
    doc.args(["doc", "--workspace", "--no-deps"])
        .env("RUSTDOCFLAGS", "-D warnings");
    run("cargo doc (warnings are errors)", doc)?;

    // The shared-tier tests need a Redis server: one of the caller's, or a throwaway one
    // that lives until the end of this function.
    let (_server, redis_url) = match env::var(redis::URL_ENV) {
        Ok(url) if !url.is_empty() => {
            println!(
                "\n== xtask: using the redis server at {url} ({})",
                redis::URL_ENV
            );
            (None, url)
        }
        _ => {
            let server = redis::start()?;
            let url = server.url.clone();
            (Some(server), url)
        }
    };

    let mut tests = cargo();
    tests
        .args(["test", "--workspace"])
        .env(redis::URL_ENV, &redis_url);
    run("cargo test --workspace", tests)?;

    // The CUDA build of kvc-kernels: its GPU tests compile and, with no driver here, skip.
    let mut cuda = cargo();
    cuda.args([
        "test",
        "-p",
        "kvc-kernels",
        "--features",
        "cuda",
        "--test",
        "gpu",
    ]);
    run(
        "kvc-kernels --features cuda: build and GPU tests (skip without a driver)",
        cuda,
    )?;

    // The main job must keep working: a smoke run of the report, reusing the test build.
    let mut smoke = cargo();
    smoke
        .args([
            "run",
            "--profile",
            "test",
            "-p",
            "kvc-bench",
            "--",
            "report",
            "--quick",
            "--out",
        ])
        .arg(root().join("target").join("kvc-report-smoke"))
        .env(redis::URL_ENV, &redis_url);
    run("benchmark report smoke run (report --quick)", smoke)?;

    loom()?;
    kernels::kernels()
}

fn loom() -> Result<(), String> {
    let mut cmd = cargo();
    let flags = match env::var("RUSTFLAGS") {
        Ok(existing) if !existing.is_empty() => format!("{existing} --cfg kvc_loom"),
        _ => "--cfg kvc_loom".to_string(),
    };
    cmd.env("RUSTFLAGS", flags)
        .env("CARGO_TARGET_DIR", root().join("target").join("loom"));
    if env::var_os("LOOM_MAX_PREEMPTIONS").is_none() {
        cmd.env("LOOM_MAX_PREEMPTIONS", "2");
    }
    cmd.args([
        "test",
        "--release",
        "-p",
        "kvc-alloc",
        "-p",
        "kvc-sched",
        "-p",
        "kvc-tier",
        "--test",
        "loom",
    ]);
    run("loom models (kvc-alloc, kvc-sched, kvc-tier)", cmd)
}

fn bench(rest: &[String]) -> Result<(), String> {
    if rest.first().is_some_and(|a| a == "--criterion") {
        let mut cmd = cargo();
        cmd.args(["bench", "--workspace"]);
        if rest.len() > 1 {
            cmd.arg("--").args(&rest[1..]);
        }
        return run("criterion benches", cmd);
    }
    // Paths are taken relative to where xtask was started; cargo runs from the root.
    let here = env::current_dir().map_err(|e| format!("bench: no working directory: {e}"))?;
    let mut out = root().join("target").join("kvc-report");
    let mut forwarded: Vec<String> = Vec::new();
    let mut shown = String::from("cargo xtask bench");
    let mut args = rest.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" | "--full" => {
                forwarded.push(arg.clone());
                shown.push_str(&format!(" {arg}"));
            }
            "--trace" | "--out" => {
                let value = args
                    .next()
                    .ok_or_else(|| format!("bench: {arg} needs a path\n{USAGE}"))?;
                let path = here.join(value);
                if arg == "--out" {
                    out = path;
                } else {
                    forwarded.push(arg.clone());
                    forwarded.push(path.display().to_string());
                }
                shown.push_str(&format!(" {arg} {value}"));
            }
            other => return Err(format!("bench: unknown argument `{other}`\n{USAGE}")),
        }
    }
    let mut cmd = cargo();
    cmd.args(["run", "--release", "-p", "kvc-bench", "--", "report"])
        .args(&forwarded)
        .arg("--out")
        .arg(&out)
        .arg("--command")
        .arg(&shown);
    run("benchmark report (kvc-bench report)", cmd)?;
    println!("\nreport: {}", out.join("index.md").display());
    Ok(())
}
