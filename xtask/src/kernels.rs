//! `cargo xtask kernels`: compiles every CUDA kernel of kvc-kernels with NVRTC for
//! `compute_90` and assembles it with `ptxas -arch=sm_90 -v`, printing registers, shared
//! memory and spills per kernel; fails on a compile error or on spills in the attention
//! (decode/prefill) kernels. No GPU is needed.
//!
//! The toolchain is looked up in `CUDA_HOME`/`CUDA_PATH`, then `/usr/local/cuda`, then the
//! cache `target/cuda-tools`; when none is found, the PyPI wheels `nvidia-cuda-nvrtc-cu12`,
//! `nvidia-cuda-runtime-cu12` and `nvidia-cuda-nvcc-cu12` are installed there with pip.
//! If that fails too, the step is skipped with a message, except under `CI=true`, where a
//! missing toolchain is a failure.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{cargo, root, run};

/// The CUDA 12.8 wheels, pinned (cudarc is built for the 12.8 API).
const WHEELS: [&str; 3] = [
    "nvidia-cuda-nvrtc-cu12==12.8.93",
    "nvidia-cuda-runtime-cu12==12.8.90",
    "nvidia-cuda-nvcc-cu12==12.8.93",
];

/// Where NVRTC and ptxas were found.
pub(crate) struct Toolchain {
    /// A folder holding `libnvrtc.so*`, for the library path.
    pub(crate) nvrtc_lib: PathBuf,
    /// The `ptxas` binary.
    pub(crate) ptxas: PathBuf,
}

impl Toolchain {
    /// `LD_LIBRARY_PATH` with the NVRTC folder in front.
    pub(crate) fn library_path(&self) -> String {
        match env::var("LD_LIBRARY_PATH") {
            Ok(old) if !old.is_empty() => format!("{}:{old}", self.nvrtc_lib.display()),
            _ => self.nvrtc_lib.display().to_string(),
        }
    }
}

fn has_nvrtc(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("libnvrtc.so"))
    })
}

fn in_folder(home: &Path) -> Option<Toolchain> {
    let ptxas = home.join("bin").join("ptxas");
    let lib = ["lib64", "lib"]
        .iter()
        .map(|l| home.join(l))
        .find(|d| has_nvrtc(d))?;
    ptxas.is_file().then_some(Toolchain {
        nvrtc_lib: lib,
        ptxas,
    })
}

fn cache_dir() -> PathBuf {
    root().join("target").join("cuda-tools")
}

fn in_cache() -> Option<Toolchain> {
    let nvidia = cache_dir().join("nvidia");
    let lib = nvidia.join("cuda_nvrtc").join("lib");
    let ptxas = nvidia.join("cuda_nvcc").join("bin").join("ptxas");
    (has_nvrtc(&lib) && ptxas.is_file()).then_some(Toolchain {
        nvrtc_lib: lib,
        ptxas,
    })
}

fn find() -> Option<Toolchain> {
    let homes = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|v| env::var_os(v).map(PathBuf::from))
        .chain([PathBuf::from("/usr/local/cuda")]);
    for home in homes {
        if let Some(t) = in_folder(&home) {
            return Some(t);
        }
    }
    in_cache()
}

fn install() -> Result<(), String> {
    let python = env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let mut cmd = Command::new(&python);
    cmd.args([
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-deps",
        "--target",
    ])
    .arg(cache_dir())
    .args(WHEELS);
    run(
        "pip install the CUDA 12.8 NVRTC, runtime headers and ptxas wheels",
        cmd,
    )
}

/// Finds the toolchain, installing the wheels when none is found. `Ok(None)` means "skip":
/// no toolchain and not under CI.
pub(crate) fn toolchain() -> Result<Option<Toolchain>, String> {
    if let Some(t) = find() {
        return Ok(Some(t));
    }
    let installed = install();
    if let Some(t) = in_cache() {
        return Ok(Some(t));
    }
    let why = installed.err().unwrap_or_else(|| {
        "the wheels installed but libnvrtc or ptxas is missing from them".into()
    });
    if env::var("CI").is_ok_and(|v| v == "true") {
        Err(format!("no CUDA toolchain (needed under CI=true): {why}"))
    } else {
        println!(
            "\n== xtask: kernels skipped: no CUDA toolchain found and the PyPI wheels could not \
             be installed ({why}); set CUDA_HOME or install them into target/cuda-tools"
        );
        Ok(None)
    }
}

/// One kernel's figures from `ptxas -v`.
#[derive(Default)]
struct Figures {
    name: String,
    registers: u32,
    smem: u64,
    spill_stores: u64,
    spill_loads: u64,
    stack: u64,
}

/// The first number after `key` in `line`.
fn number_after(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The number before `unit` in `line` (as in `24 bytes spill stores`).
fn number_before(line: &str, unit: &str) -> Option<u64> {
    let head = &line[..line.find(unit)?];
    head.split(|c: char| !c.is_ascii_digit())
        .rfind(|s| !s.is_empty())?
        .parse()
        .ok()
}

fn parse(log: &str) -> Vec<Figures> {
    let mut out: Vec<Figures> = Vec::new();
    for line in log.lines() {
        if let Some(i) = line.find("Compiling entry function '") {
            let rest = &line[i + "Compiling entry function '".len()..];
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            out.push(Figures {
                name,
                ..Figures::default()
            });
            continue;
        }
        let Some(k) = out.last_mut() else { continue };
        if line.contains("spill stores") {
            k.stack = number_before(line, "bytes stack frame").unwrap_or(0);
            k.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
            k.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
        }
        if line.contains("Used") && line.contains("registers") {
            k.registers = number_after(line, "Used").unwrap_or(0) as u32;
            if line.contains("bytes smem") {
                k.smem = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

/// Dynamic shared memory an attention kernel asks for at most: the cross-warp reduction
/// (4 warps × group × head_dim floats, plus m and l) and up to 2,048 staged pages.
fn dynamic_smem(name: &str) -> Option<u64> {
    let mut d = None;
    let mut g = None;
    for part in name.split('_') {
        if let Some(v) = part.strip_prefix('d').and_then(|v| v.parse::<u64>().ok()) {
            d = Some(v);
        }
        if let Some(v) = part.strip_prefix('g').and_then(|v| v.parse::<u64>().ok()) {
            g = Some(v);
        }
    }
    let (d, g) = (d?, g?);
    Some((4 * g * d + 8 * g) * 4 + 2048 * 4)
}

pub(crate) fn kernels() -> Result<(), String> {
    let Some(tc) = toolchain()? else {
        return Ok(());
    };
    let out = root().join("target").join("kernels");
    let mut nvrtc = cargo();
    nvrtc
        .env("LD_LIBRARY_PATH", tc.library_path())
        .args([
            "run",
            "--quiet",
            "-p",
            "kvc-kernels",
            "--features",
            "cuda",
            "--example",
            "kvc-nvrtc",
            "--",
        ])
        .arg(&out)
        .arg("compute_90");
    run("NVRTC: compile every kernel for compute_90", nvrtc)?;

    let ptx = out.join("kvc_kernels.ptx");
    println!("\n== xtask: ptxas -arch=sm_90 -v ({})", tc.ptxas.display());
    let result = Command::new(&tc.ptxas)
        .args(["-arch=sm_90", "-v"])
        .arg(&ptx)
        .arg("-o")
        .arg(out.join("kvc_kernels.cubin"))
        .output()
        .map_err(|e| format!("ptxas: could not start {}: {e}", tc.ptxas.display()))?;
    let log = String::from_utf8_lossy(&result.stderr).into_owned()
        + &String::from_utf8_lossy(&result.stdout);
    if !result.status.success() {
        return Err(format!("ptxas failed ({}):\n{log}", result.status));
    }
    let _ = std::fs::write(out.join("ptxas.log"), &log);
    let mut figures = parse(&log);
    figures.sort_by(|a, b| a.name.cmp(&b.name));
    let expected = std::fs::read_to_string(out.join("kernels.txt"))
        .map_err(|e| format!("cannot read the kernel list: {e}"))?;
    let missing: Vec<&str> = expected
        .lines()
        .filter(|n| !figures.iter().any(|f| f.name == *n))
        .collect();
    if !missing.is_empty() {
        return Err(format!("ptxas did not assemble: {}", missing.join(", ")));
    }
    println!(
        "{:<24} {:>5} {:>11} {:>11} {:>13} {:>12}",
        "kernel", "regs", "smem static", "smem dyn ≤", "spill st/ld", "stack bytes"
    );
    for f in &figures {
        let dynamic = dynamic_smem(&f.name).map_or_else(|| "-".into(), |b| b.to_string());
        println!(
            "{:<24} {:>5} {:>11} {:>11} {:>13} {:>12}",
            f.name,
            f.registers,
            f.smem,
            dynamic,
            format!("{}/{}", f.spill_stores, f.spill_loads),
            f.stack
        );
    }
    let spilling: Vec<&str> = figures
        .iter()
        .filter(|f| f.name.starts_with("attend_") && f.spill_stores + f.spill_loads > 0)
        .map(|f| f.name.as_str())
        .collect();
    if !spilling.is_empty() {
        return Err(format!(
            "the attention (decode) kernels spill registers: {}",
            spilling.join(", ")
        ));
    }
    // The CUBIN NVRTC built directly (what the run-time path loads) must hold every kernel.
    let cubin = std::fs::read(out.join("kvc_kernels.nvrtc.cubin"))
        .map_err(|e| format!("cannot read the NVRTC CUBIN: {e}"))?;
    if !cubin.starts_with(b"\x7fELF") {
        return Err("the NVRTC CUBIN is not an ELF image".into());
    }
    let absent: Vec<&str> = expected
        .lines()
        .filter(|n| !cubin.windows(n.len()).any(|w| w == n.as_bytes()))
        .collect();
    if !absent.is_empty() {
        return Err(format!("the NVRTC CUBIN lacks: {}", absent.join(", ")));
    }
    println!(
        "kernels: {} kernels assembled for sm_90, no spills in the attention kernels; the \
         run-time CUBIN ({} KiB) holds every kernel",
        figures.len(),
        cubin.len() / 1024
    );
    Ok(())
}
