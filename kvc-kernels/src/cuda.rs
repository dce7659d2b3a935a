//! The CUDA ops (feature `cuda`): the `.cu` sources in `kernels/`, compiled at run time with
//! NVRTC to a CUBIN for the device's architecture and launched through cudarc.
//!
//! cudarc loads `libcuda` and `libnvrtc` when first used (`dynamic-loading`), so this module
//! builds with no CUDA installed; [`CudaKernels::new`] probes for both libraries and a device
//! first and returns [`CudaError::NoDriver`] / [`CudaError::NoNvrtc`] instead of panicking.
//!
//! Shapes and tables are validated on the host exactly as on the CPU path (the same
//! [`ShapeError`]s), before anything is launched. Outputs are f32, as on the CPU.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtrMut, DeviceRepr,
    DriverError, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::{CompileOptions, Ptx};
use kvc_core::{BlockCopy, DType, PageTable, PagedLayout, SlotMapping};
use thiserror::Error;

use crate::attention::{AttnParams, DecodeArgs};
use crate::copy::BlockSwap;
use crate::elem::KvElem;
use crate::error::{ShapeError, check_cache, check_len};

/// The shared definitions, the attention kernels and the memory kernels, in that order.
const SOURCES: [(&str, &str); 3] = [
    ("common.cuh", include_str!("../kernels/common.cuh")),
    ("attention.cu", include_str!("../kernels/attention.cu")),
    ("memory.cu", include_str!("../kernels/memory.cu")),
];

/// Head sizes the attention kernel is instantiated for.
pub const HEAD_DIMS: [u32; 5] = [64, 80, 96, 128, 256];
/// Query heads per KV head the attention kernel is instantiated for (a group of 3 runs in
/// the instance for 4).
pub const GROUPS: [u32; 4] = [1, 2, 4, 8];
/// Threads of an attention CTA (4 warps; must match `KVC_WARPS` in `attention.cu`).
const ATTEND_THREADS: u32 = 128;
/// Most pages one attention CTA stages in shared memory; longer splits are cut.
const MAX_PAGES: u32 = 2048;
/// The shortest split the automatic planner makes, in tokens.
const MIN_SPLIT_TOKENS: u32 = 256;

/// Why a CUDA op could not run.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CudaError {
    /// No CUDA driver library (`libcuda`) could be loaded: no NVIDIA driver on this machine.
    #[error("no CUDA driver: libcuda could not be loaded")]
    NoDriver,
    /// No NVRTC library could be loaded (install `nvidia-cuda-nvrtc-cu12` or a toolkit and
    /// put its `lib` folder on the library path).
    #[error("no NVRTC: libnvrtc could not be loaded")]
    NoNvrtc,
    /// The driver reported an error (no device, out of memory, launch failure, ...).
    #[error("CUDA driver error in {context}: {message}")]
    Driver {
        /// What was being done.
        context: &'static str,
        /// The driver's message.
        message: String,
    },
    /// NVRTC rejected a kernel source.
    #[error("NVRTC could not compile {kernels}: {log}")]
    Compile {
        /// The kernels of the program.
        kernels: String,
        /// The compiler's log.
        log: String,
    },
    /// The arguments were rejected before launch.
    #[error(transparent)]
    Shape(#[from] ShapeError),
    /// No attention kernel is instantiated for this head size.
    #[error("no CUDA attention kernel for head size {head_dim} (have {HEAD_DIMS:?})")]
    UnsupportedHeadDim {
        /// The head size asked for.
        head_dim: u32,
    },
    /// More query heads per KV head than the largest instantiated group.
    #[error("{group} query heads per KV head; the CUDA kernels serve at most 8")]
    GroupTooLarge {
        /// Query heads per KV head.
        group: u32,
    },
    /// 16-byte vector loads need every head row to start on a 16-byte boundary.
    #[error("the layout's strides do not keep head rows 16-byte aligned")]
    Unaligned,
    /// The element type has no CUDA kernels.
    #[error("no CUDA kernels for {dtype:?}")]
    UnsupportedDType {
        /// The element type.
        dtype: DType,
    },
}

fn driver(context: &'static str) -> impl FnOnce(DriverError) -> CudaError {
    move |e| CudaError::Driver {
        context,
        message: e.to_string(),
    }
}

/// Whether a CUDA driver library can be loaded on this machine (no device is touched).
#[must_use]
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the library by its usual names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether an NVRTC library can be loaded on this machine.
#[must_use]
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to open the library by its usual names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

fn dtype_code(dtype: DType) -> Result<u32, CudaError> {
    match dtype {
        DType::F32 => Ok(0),
        DType::F16 => Ok(1),
        DType::BF16 => Ok(2),
        other => Err(CudaError::UnsupportedDType { dtype: other }),
    }
}

fn dtype_name(code: u32) -> &'static str {
    ["f32", "f16", "bf16"][code as usize]
}

/// The name of the attention kernel for storage type `dtype` (0 = f32, 1 = f16, 2 = bf16),
/// head size `head_dim` and group bound `group`.
#[must_use]
pub fn attend_kernel_name(dtype: u32, head_dim: u32, group: u32) -> String {
    format!("attend_{}_d{head_dim}_g{group}", dtype_name(dtype))
}

/// The kernels of the memory program.
pub const MEMORY_KERNELS: [&str; 4] = ["write_kv", "copy_blocks", "merge_splits", "merge_states"];

/// The full CUDA source with the given attention instances `(dtype, head_dim, group)`.
#[must_use]
pub fn program_source(instances: &[(u32, u32, u32)]) -> String {
    let mut src = String::new();
    for (name, text) in SOURCES {
        src.push_str(&format!("// ---- {name}\n{text}\n"));
    }
    for &(dt, d, g) in instances {
        let name = attend_kernel_name(dt, d, g);
        src.push_str(&format!("KVC_ATTEND({name}, {dt}, {d}, {g})\n"));
    }
    src
}

/// Every attention instance: 3 storage types × [`HEAD_DIMS`] × [`GROUPS`].
#[must_use]
pub fn all_instances() -> Vec<(u32, u32, u32)> {
    let mut v = Vec::new();
    for dt in 0..3 {
        for d in HEAD_DIMS {
            for g in GROUPS {
                v.push((dt, d, g));
            }
        }
    }
    v
}

fn nvrtc_options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "-default-device".into(),
    ]
}

/// Compiles `src` with NVRTC for the virtual architecture `arch` (e.g. `compute_90`) and
/// returns the PTX text (what `cargo xtask kernels` assembles with ptxas). `kernels` names the
/// program in errors.
pub fn compile(src: &str, arch: &str, kernels: &str) -> Result<String, CudaError> {
    if !nvrtc_present() {
        return Err(CudaError::NoNvrtc);
    }
    let opts = CompileOptions {
        options: nvrtc_options(arch),
        ..CompileOptions::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(src, opts)
        .map(|ptx| ptx.to_src())
        .map_err(|e| CudaError::Compile {
            kernels: kernels.into(),
            log: match e {
                cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                    log.to_string_lossy().into_owned()
                }
                other => format!("{other:?}"),
            },
        })
}

fn c_text(chars: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles `src` with NVRTC straight to a CUBIN for the real architecture `arch` (e.g.
/// `sm_90`). The run-time path loads CUBINs rather than PTX: a driver JIT-compiles only PTX no
/// newer than itself, while a CUBIN from a newer CUDA 12 NVRTC loads on an older CUDA 12
/// driver (CUDA minor-version compatibility).
pub fn compile_cubin(src: &str, arch: &str, kernels: &str) -> Result<Vec<u8>, CudaError> {
    use cudarc::nvrtc::{result, sys};
    if !nvrtc_present() {
        return Err(CudaError::NoNvrtc);
    }
    let fail = |log: String| CudaError::Compile {
        kernels: kernels.into(),
        log,
    };
    let csrc =
        std::ffi::CString::new(src).map_err(|_| fail("the source contains a NUL byte".into()))?;
    let prog = result::create_program(&csrc, None).map_err(|e| fail(format!("{e:?}")))?;
    // SAFETY: `prog` was created just above from `csrc`, which outlives it; it is destroyed
    // exactly once, at the end; the CUBIN buffer is sized by nvrtcGetCUBINSize first.
    let out = unsafe {
        match result::compile_program(prog, &nvrtc_options(arch)) {
            Err(e) => Err(fail(match result::get_program_log(prog) {
                Ok(log) => c_text(&log),
                Err(_) => format!("{e:?}"),
            })),
            Ok(()) => {
                let mut size = 0usize;
                match sys::nvrtcGetCUBINSize(prog, &mut size).result() {
                    Err(e) => Err(fail(format!("nvrtcGetCUBINSize: {e:?}"))),
                    Ok(()) => {
                        let mut cubin = vec![0u8; size];
                        sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast())
                            .result()
                            .map(|()| cubin)
                            .map_err(|e| fail(format!("nvrtcGetCUBIN: {e:?}")))
                    }
                }
            }
        }
    };
    // SAFETY: `prog` is live and destroyed only here.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

/// A device pool layer's worth of arguments: strides and sizes as the kernels take them.
struct Geometry {
    strides: [u64; 4],
    kv_heads: u32,
    head_dim: u32,
    block_size: u32,
}

impl Geometry {
    fn of(layout: &PagedLayout) -> Self {
        Self {
            strides: layout.strides(),
            kv_heads: layout.kv_heads(),
            head_dim: layout.head_dim(),
            block_size: layout.block_size(),
        }
    }
    /// Whether every head row starts 16-byte aligned (buffers from the driver are).
    fn aligned16(&self, esize: u64) -> bool {
        self.strides.iter().all(|s| (s * esize).is_multiple_of(16))
            && (u64::from(self.head_dim) * esize).is_multiple_of(16)
    }
}

/// A [`PageTable`] uploaded to the device.
pub struct DevicePageTable {
    qo_indptr: CudaSlice<u32>,
    kv_indptr: CudaSlice<u32>,
    kv_indices: CudaSlice<u32>,
    seq_lens: CudaSlice<u32>,
    host: PageTable,
    max_len: u32,
}

impl DevicePageTable {
    /// The host table this was uploaded from.
    #[must_use]
    pub fn host(&self) -> &PageTable {
        &self.host
    }
}

/// The kernels of one device: a context, a stream and the compiled modules (attention
/// instances compiled on first use).
pub struct CudaKernels {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: String,
    sm_count: u32,
    memory: Arc<CudaModule>,
    attend: Mutex<HashMap<(u32, u32, u32), CudaFunction>>,
}

impl CudaKernels {
    /// Opens device `ordinal` and compiles the memory kernels for its architecture.
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        if !driver_present() {
            return Err(CudaError::NoDriver);
        }
        if !nvrtc_present() {
            return Err(CudaError::NoNvrtc);
        }
        let ctx = CudaContext::new(ordinal).map_err(driver("opening the device"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver("reading the compute capability"))?;
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(driver("reading the SM count"))?;
        let arch = format!("sm_{major}{minor}");
        let cubin = compile_cubin(&program_source(&[]), &arch, "memory kernels")?;
        let memory = ctx
            .load_module(Ptx::from_binary(cubin))
            .map_err(driver("loading the memory kernels"))?;
        let stream = ctx.default_stream();
        Ok(Self {
            ctx,
            stream,
            arch,
            sm_count: sm_count.max(1) as u32,
            memory,
            attend: Mutex::new(HashMap::new()),
        })
    }

    /// The stream every op is queued on.
    #[must_use]
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The context of the device.
    #[must_use]
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Waits for every queued op.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize().map_err(driver("synchronising"))
    }

    fn memory_fn(&self, name: &str) -> Result<CudaFunction, CudaError> {
        self.memory
            .load_function(name)
            .map_err(driver("loading a memory kernel"))
    }

    fn attend_fn(&self, dt: u32, d: u32, g: u32) -> Result<CudaFunction, CudaError> {
        let mut cache = self.attend.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = cache.get(&(dt, d, g)) {
            return Ok(f.clone());
        }
        let name = attend_kernel_name(dt, d, g);
        let cubin = compile_cubin(&program_source(&[(dt, d, g)]), &self.arch, &name)?;
        let module = self
            .ctx
            .load_module(Ptx::from_binary(cubin))
            .map_err(driver("loading an attention kernel"))?;
        let f = module
            .load_function(&name)
            .map_err(driver("loading an attention kernel"))?;
        cache.insert((dt, d, g), f.clone());
        Ok(f)
    }

    /// Uploads a page table.
    pub fn upload_table(&self, table: &PageTable) -> Result<DevicePageTable, CudaError> {
        let (qo, kvp, idx, lens) = table.raw();
        let idx: Vec<u32> = idx.iter().map(|b| b.get()).collect();
        let up = |v: &[u32]| {
            self.stream
                .clone_htod(v)
                .map_err(driver("uploading a page table"))
        };
        Ok(DevicePageTable {
            qo_indptr: up(qo)?,
            kv_indptr: up(kvp)?,
            kv_indices: up(&idx)?,
            seq_lens: up(lens)?,
            host: table.clone(),
            max_len: lens.iter().copied().max().unwrap_or(0),
        })
    }

    /// [`write_kv`](crate::write_kv) on the device. `slots` is uploaded for the call.
    pub fn write_kv<T: KvElem + DeviceRepr>(
        &self,
        layout: &PagedLayout,
        cache: &mut CudaSlice<T>,
        slots: &SlotMapping,
        key: &CudaSlice<T>,
        value: &CudaSlice<T>,
    ) -> Result<(), CudaError> {
        check_cache("cache", cache.len(), layout.len())?;
        if slots.block_size() != layout.block_size() {
            return Err(ShapeError::SlotMismatch {
                mapping: slots.block_size(),
                layout: layout.block_size(),
            }
            .into());
        }
        let total = u64::from(layout.num_blocks()) * u64::from(layout.block_size());
        if let Some(token) = slots
            .raw()
            .iter()
            .position(|&s| s >= 0 && s as u64 >= total)
        {
            return Err(ShapeError::SlotOutOfPool {
                token,
                slot: slots.raw()[token],
                slots: total,
            }
            .into());
        }
        let per_token = u64::from(layout.kv_heads()) * u64::from(layout.head_dim());
        check_len("key", key.len(), slots.len() as u64 * per_token)?;
        check_len("value", value.len(), slots.len() as u64 * per_token)?;
        if slots.is_empty() {
            return Ok(());
        }
        let esize = T::DTYPE.size_bytes();
        let g = Geometry::of(layout);
        let vec16 = i32::from(g.aligned16(esize));
        let dslots = self
            .stream
            .clone_htod(slots.raw())
            .map_err(driver("uploading slots"))?;
        let f = self.memory_fn("write_kv")?;
        let [sb, skv, sh, st] = g.strides;
        let esize = esize as u32;
        let cfg = LaunchConfig {
            grid_dim: (slots.len() as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&f);
        b.arg(cache).arg(key).arg(value).arg(&dslots);
        b.arg(&g.kv_heads).arg(&g.head_dim).arg(&g.block_size);
        b.arg(&sb)
            .arg(&skv)
            .arg(&sh)
            .arg(&st)
            .arg(&esize)
            .arg(&vec16);
        // SAFETY: the argument list matches `write_kv` in memory.cu; every slot was checked to
        // lie inside `cache`'s layout and key/value hold `slots.len()` tokens.
        unsafe { b.launch(cfg) }.map_err(driver("launching write_kv"))?;
        Ok(())
    }

    /// Plans the split of each row's context: `(tokens per split, splits)`.
    fn plan(&self, ctas: usize, max_len: u32, block_size: u32, asked: Option<u32>) -> (u32, u32) {
        let cap = (MAX_PAGES - 1).saturating_mul(block_size).max(1);
        let wanted = match asked {
            Some(t) => t.max(1),
            None => {
                let target = 2 * self.sm_count as usize;
                if ctas >= target {
                    u32::MAX
                } else {
                    let per_row = target.div_ceil(ctas.max(1)) as u32;
                    max_len.div_ceil(per_row).max(MIN_SPLIT_TOKENS)
                }
            }
        };
        let tokens = wanted.min(cap).min(max_len.max(1));
        (tokens, max_len.div_ceil(tokens).max(1))
    }

    #[allow(clippy::too_many_arguments)]
    fn attention<T: KvElem + DeviceRepr>(
        &self,
        layout: &PagedLayout,
        cache: &CudaSlice<T>,
        table: &DevicePageTable,
        q: &CudaSlice<T>,
        params: AttnParams,
        split: Option<u32>,
        out: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        check_cache("cache", cache.len(), layout.len())?;
        let host = &table.host;
        if !host.fits(layout) {
            return Err(ShapeError::TableMismatch {
                block_size: layout.block_size(),
                num_blocks: layout.num_blocks(),
            }
            .into());
        }
        let kvh = layout.kv_heads();
        if params.q_heads == 0 || !params.q_heads.is_multiple_of(kvh) {
            return Err(ShapeError::HeadRatio {
                q_heads: params.q_heads,
                kv_heads: kvh,
            }
            .into());
        }
        let group = params.q_heads / kvh;
        let d = layout.head_dim();
        let rows = (host.total_queries() as u64).saturating_mul(u64::from(params.q_heads));
        check_len("q", q.len(), rows.saturating_mul(u64::from(d)))?;
        check_len("out", out.len(), rows.saturating_mul(u64::from(d)))?;
        check_len("lse", lse.len(), rows)?;
        if !HEAD_DIMS.contains(&d) {
            return Err(CudaError::UnsupportedHeadDim { head_dim: d });
        }
        let g_bound = GROUPS
            .into_iter()
            .find(|&g| g >= group)
            .ok_or(CudaError::GroupTooLarge { group })?;
        let dt = dtype_code(T::DTYPE)?;
        let geo = Geometry::of(layout);
        if !geo.aligned16(T::DTYPE.size_bytes()) {
            return Err(CudaError::Unaligned);
        }
        if rows == 0 {
            return Ok(());
        }
        let total_q = host.total_queries() as u32;
        let ctas = total_q as usize * kvh as usize;
        let (split_tokens, num_splits) = self.plan(ctas, table.max_len, layout.block_size(), split);
        let pages = split_tokens.div_ceil(layout.block_size()) + 1;
        let smem = (4 * g_bound * d + 4 * g_bound * 2 + pages) * 4;
        let f = self.attend_fn(dt, d, g_bound)?;
        // The split workspace (unused, one element, when there is one split).
        let ws = if num_splits > 1 { rows as usize } else { 1 };
        let mut part_o = self
            .stream
            .alloc_zeros::<f32>(ws * num_splits as usize * d as usize)
            .map_err(driver("allocating the split workspace"))?;
        let mut part_lse = self
            .stream
            .alloc_zeros::<f32>(ws * num_splits as usize)
            .map_err(driver("allocating the split workspace"))?;
        let batch = host.batch() as u32;
        let [sb, skv, sh, st] = geo.strides;
        let cfg = LaunchConfig {
            grid_dim: (total_q, kvh, num_splits),
            block_dim: (ATTEND_THREADS, 1, 1),
            shared_mem_bytes: smem,
        };
        let mut b = self.stream.launch_builder(&f);
        b.arg(cache).arg(q).arg(&mut *out).arg(&mut *lse);
        b.arg(&mut part_o).arg(&mut part_lse);
        b.arg(&table.qo_indptr).arg(&table.kv_indptr);
        b.arg(&table.kv_indices).arg(&table.seq_lens);
        b.arg(&batch)
            .arg(&params.q_heads)
            .arg(&group)
            .arg(&geo.block_size);
        b.arg(&sb).arg(&skv).arg(&sh).arg(&st);
        b.arg(&params.scale).arg(&split_tokens).arg(&num_splits);
        // SAFETY: the arguments match KVC_ATTEND in attention.cu; the table was validated
        // against this layout, the cache spans the layout, q/out/lse have the checked shapes,
        // rows are 16-byte aligned, and shared memory holds a split's pages.
        unsafe { b.launch(cfg) }.map_err(driver("launching attention"))?;
        if num_splits > 1 {
            let m = self.memory_fn("merge_splits")?;
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (d.min(128), 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = self.stream.launch_builder(&m);
            b.arg(&part_o)
                .arg(&part_lse)
                .arg(out)
                .arg(lse)
                .arg(&d)
                .arg(&num_splits);
            // SAFETY: matches merge_splits; the workspace holds rows × splits partials.
            unsafe { b.launch(cfg) }.map_err(driver("launching merge_splits"))?;
        }
        Ok(())
    }

    /// [`paged_decode`](crate::paged_decode) on the device (split-K planned for the device's
    /// SM count unless `args.options` fixes the split).
    pub fn paged_decode<T: KvElem + DeviceRepr>(
        &self,
        args: &DecodeArgs<'_, CudaSlice<T>, DevicePageTable>,
        out: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let table = args.table;
        for seq in 0..table.host.batch() {
            let queries = table.host.queries(seq).len();
            if queries != 1 {
                return Err(ShapeError::NotDecode { seq, queries }.into());
            }
        }
        self.attention(
            args.layout,
            args.cache,
            table,
            args.q,
            args.params,
            args.options.split_tokens,
            out,
            lse,
        )
    }

    /// [`paged_prefill`](crate::paged_prefill) on the device (causal, bottom-right aligned).
    #[allow(clippy::too_many_arguments)]
    pub fn paged_prefill<T: KvElem + DeviceRepr>(
        &self,
        layout: &PagedLayout,
        cache: &CudaSlice<T>,
        table: &DevicePageTable,
        q: &CudaSlice<T>,
        params: AttnParams,
        out: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        self.attention(layout, cache, table, q, params, None, out, lse)
    }

    /// [`merge_states`](crate::merge_states) on the device.
    #[allow(clippy::too_many_arguments)]
    pub fn merge_states(
        &self,
        oa: &CudaSlice<f32>,
        la: &CudaSlice<f32>,
        ob: &CudaSlice<f32>,
        lb: &CudaSlice<f32>,
        head_dim: u32,
        out: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        if head_dim == 0 {
            return Err(ShapeError::ZeroHeadDim.into());
        }
        let n = la.len() as u64;
        let d = u64::from(head_dim);
        check_len("lb", lb.len(), n)?;
        check_len("lse", lse.len(), n)?;
        check_len("oa", oa.len(), n * d)?;
        check_len("ob", ob.len(), n * d)?;
        check_len("out", out.len(), n * d)?;
        if n == 0 {
            return Ok(());
        }
        let f = self.memory_fn("merge_states")?;
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (head_dim.min(128), 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&f);
        b.arg(oa)
            .arg(la)
            .arg(ob)
            .arg(lb)
            .arg(out)
            .arg(lse)
            .arg(&head_dim);
        // SAFETY: matches merge_states in attention.cu; lengths checked above.
        unsafe { b.launch(cfg) }.map_err(driver("launching merge_states"))?;
        Ok(())
    }

    /// [`copy_blocks`](crate::copy_blocks) on the device: every pair in every layer, one
    /// launch.
    pub fn copy_blocks<T: KvElem + DeviceRepr>(
        &self,
        layout: &PagedLayout,
        layers: &mut [CudaSlice<T>],
        pairs: &[BlockCopy],
    ) -> Result<(), CudaError> {
        for layer in layers.iter() {
            check_cache("layers", layer.len(), layout.len())?;
        }
        crate::copy::check_pairs(pairs, layout.num_blocks(), layout.num_blocks(), true)?;
        if pairs.is_empty() || layers.is_empty() {
            return Ok(());
        }
        let esize = T::DTYPE.size_bytes();
        let g = Geometry::of(layout);
        let vec16 = i32::from(g.aligned16(esize));
        // Write pointers (the kernel writes every layer), with their guards held until the
        // launch is queued: taking them makes this stream wait for earlier reads and writes
        // of each layer on other streams, and dropping them afterwards records this launch
        // as the layers' latest write.
        let num_layers = layers.len() as u32;
        let (ptrs, guards): (Vec<u64>, Vec<_>) = layers
            .iter_mut()
            .map(|l| l.device_ptr_mut(&self.stream))
            .unzip();
        let dptrs = self
            .stream
            .clone_htod(&ptrs)
            .map_err(driver("uploading layer pointers"))?;
        let flat: Vec<u32> = pairs
            .iter()
            .flat_map(|c| [c.src.get(), c.dst.get()])
            .collect();
        let dpairs = self
            .stream
            .clone_htod(&flat)
            .map_err(driver("uploading copy pairs"))?;
        let f = self.memory_fn("copy_blocks")?;
        let [sb, skv, sh, st] = g.strides;
        let esize = esize as u32;
        let cfg = LaunchConfig {
            grid_dim: (pairs.len() as u32, num_layers, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&f);
        b.arg(&dptrs).arg(&dpairs);
        b.arg(&g.kv_heads).arg(&g.head_dim).arg(&g.block_size);
        b.arg(&sb)
            .arg(&skv)
            .arg(&sh)
            .arg(&st)
            .arg(&esize)
            .arg(&vec16);
        // SAFETY: matches copy_blocks in memory.cu; every block is inside each layer (checked);
        // the pointers are write pointers whose guards are still held, so the launch is
        // ordered after earlier work on the layers, on any stream.
        let launched = unsafe { b.launch(cfg) }.map_err(driver("launching copy_blocks"));
        drop(guards);
        launched?;
        Ok(())
    }

    /// [`swap_out`](crate::swap_out) on the device: copies device blocks to host blocks, every
    /// layer. Synchronous.
    pub fn swap_out<T: KvElem + DeviceRepr>(
        &self,
        device_layout: &PagedLayout,
        device: &[CudaSlice<T>],
        host_layout: &PagedLayout,
        host: &mut [&mut [T]],
        pairs: &[BlockSwap],
    ) -> Result<(), CudaError> {
        self.check_swap(device_layout, device, host_layout, host.len())?;
        for layer in host.iter() {
            check_cache("host", layer.len(), host_layout.len())?;
        }
        crate::copy::check_swaps(
            pairs,
            device_layout.num_blocks(),
            host_layout.num_blocks(),
            true,
        )?;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for (dev, hst) in device.iter().zip(host.iter_mut()) {
            for c in pairs {
                crate::copy::run_pairs(
                    device_layout,
                    c.device.get(),
                    host_layout,
                    c.host.get(),
                    &mut a,
                    &mut b,
                );
                for (&(s, n), &(t, _)) in a.iter().zip(&b) {
                    self.stream
                        .memcpy_dtoh(&dev.slice(s..s + n), &mut hst[t..t + n])
                        .map_err(driver("copying a block to the host"))?;
                }
            }
        }
        self.synchronize()
    }

    /// [`swap_in`](crate::swap_in) on the device: copies host blocks into device blocks, every
    /// layer. Synchronous.
    pub fn swap_in<T: KvElem + DeviceRepr>(
        &self,
        host_layout: &PagedLayout,
        host: &[&[T]],
        device_layout: &PagedLayout,
        device: &mut [CudaSlice<T>],
        pairs: &[BlockSwap],
    ) -> Result<(), CudaError> {
        self.check_swap(device_layout, device, host_layout, host.len())?;
        for layer in host {
            check_cache("host", layer.len(), host_layout.len())?;
        }
        crate::copy::check_swaps(
            pairs,
            device_layout.num_blocks(),
            host_layout.num_blocks(),
            false,
        )?;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for (hst, dev) in host.iter().zip(device.iter_mut()) {
            for c in pairs {
                crate::copy::run_pairs(
                    host_layout,
                    c.host.get(),
                    device_layout,
                    c.device.get(),
                    &mut a,
                    &mut b,
                );
                for (&(s, n), &(t, _)) in a.iter().zip(&b) {
                    self.stream
                        .memcpy_htod(&hst[s..s + n], &mut dev.slice_mut(t..t + n))
                        .map_err(driver("copying a block to the device"))?;
                }
            }
        }
        self.synchronize()
    }

    fn check_swap<T>(
        &self,
        device_layout: &PagedLayout,
        device: &[CudaSlice<T>],
        host_layout: &PagedLayout,
        host_layers: usize,
    ) -> Result<(), CudaError> {
        if !device_layout.same_block_shape(host_layout) {
            return Err(ShapeError::BlockShapeMismatch.into());
        }
        if device.len() != host_layers {
            return Err(ShapeError::LayerCount {
                src: device.len(),
                dst: host_layers,
            }
            .into());
        }
        for layer in device {
            check_cache("device", layer.len(), device_layout.len())?;
        }
        Ok(())
    }
}

/// Element types the CUDA kernels take: f32, f16 and bf16.
pub trait CudaElem: KvElem + DeviceRepr + ValidAsZeroBits {}
impl<T: KvElem + DeviceRepr + ValidAsZeroBits> CudaElem for T {}
