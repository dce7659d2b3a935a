//! Compiles every CUDA kernel of kvc-kernels with NVRTC (the same sources and options as the
//! run-time path) and writes the PTX, for `cargo xtask kernels` to assemble with ptxas, and the
//! CUBIN the run-time path would load (`kvc_kernels.nvrtc.cubin`).
//!
//! Usage: `kvc-nvrtc OUT_DIR [ARCH]` (ARCH defaults to `compute_90`). Needs libnvrtc on the
//! library path; no GPU or driver.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;
use std::process::ExitCode;

use kvc_kernels::cuda::{
    MEMORY_KERNELS, all_instances, attend_kernel_name, compile, compile_cubin, program_source,
};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(out) = args.next().map(PathBuf::from) else {
        eprintln!("usage: kvc-nvrtc OUT_DIR [ARCH]");
        return ExitCode::from(2);
    };
    let arch = args.next().unwrap_or_else(|| "compute_90".into());
    let instances = all_instances();
    let src = program_source(&instances);
    let ptx = match compile(&src, &arch, "every kvc kernel") {
        Ok(ptx) => ptx,
        Err(e) => {
            eprintln!("kvc-nvrtc: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The run-time path compiles to a CUBIN for the device's real architecture; build that
    // too, from the same source, so it is exercised without a GPU.
    let real = arch.replace("compute_", "sm_");
    let cubin = match compile_cubin(&src, &real, "every kvc kernel") {
        Ok(cubin) => cubin,
        Err(e) => {
            eprintln!("kvc-nvrtc: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = std::fs::create_dir_all(&out)
        .and_then(|()| std::fs::write(out.join("kvc_kernels.nvrtc.cubin"), &cubin))
        .and_then(|()| std::fs::write(out.join("kvc_kernels.ptx"), &ptx))
        .and_then(|()| std::fs::write(out.join("kvc_kernels.cu"), &src))
    {
        eprintln!("kvc-nvrtc: cannot write to {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    // The kernel list, one per line, for the caller to check every kernel was assembled.
    let mut names: Vec<String> = MEMORY_KERNELS.iter().map(|s| (*s).to_string()).collect();
    names.extend(
        instances
            .iter()
            .map(|&(dt, d, g)| attend_kernel_name(dt, d, g)),
    );
    if let Err(e) = std::fs::write(out.join("kernels.txt"), names.join("\n") + "\n") {
        eprintln!("kvc-nvrtc: cannot write the kernel list: {e}");
        return ExitCode::FAILURE;
    }
    println!(
        "kvc-nvrtc: {} kernels compiled to PTX for {arch} ({}) and to a {} KiB CUBIN for {real}",
        names.len(),
        out.join("kvc_kernels.ptx").display(),
        cubin.len() / 1024
    );
    ExitCode::SUCCESS
}
