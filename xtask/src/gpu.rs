//! `cargo xtask gpu`: on a machine with an NVIDIA GPU, builds kvc-kernels with
//! `--features cuda`, runs the GPU tests (each CUDA op against the CPU reference on the same
//! inputs) and the kernel benchmark, which prints one line per kernel with its bandwidth and
//! its ratio to a device-to-device copy measured in the same run.

use std::path::Path;

use crate::kernels::toolchain;
use crate::{cargo, run};

/// Whether this machine has an NVIDIA driver (its kernel module or `nvidia-smi`).
fn driver_present() -> bool {
    Path::new("/proc/driver/nvidia/version").exists()
        || std::process::Command::new("nvidia-smi")
            .arg("-L")
            .output()
            .is_ok_and(|o| o.status.success())
}

pub(crate) fn gpu(rest: &[String]) -> Result<(), String> {
    if !driver_present() {
        return Err(
            "no NVIDIA driver on this machine (no /proc/driver/nvidia, no nvidia-smi): \
             `cargo xtask gpu` needs a GPU; `cargo xtask kernels` checks the kernels without one"
                .into(),
        );
    }
    let Some(tc) = toolchain()? else {
        return Err("no NVRTC found or installable: the CUDA ops compile at run time".into());
    };
    let mut tests = cargo();
    tests
        .env("LD_LIBRARY_PATH", tc.library_path())
        .env("KVC_REQUIRE_GPU", "1")
        .args([
            "test",
            "--release",
            "-p",
            "kvc-kernels",
            "--features",
            "cuda",
            "--test",
            "gpu",
            "--",
            "--test-threads=1",
        ]);
    run("GPU tests: every CUDA op against the CPU reference", tests)?;

    let mut bench = cargo();
    bench
        .env("LD_LIBRARY_PATH", tc.library_path())
        .args([
            "run",
            "--release",
            "-p",
            "kvc-kernels",
            "--features",
            "cuda",
            "--example",
            "kvc-gpu-bench",
            "--",
        ])
        .args(rest);
    run("GPU kernel benchmark", bench)
}
