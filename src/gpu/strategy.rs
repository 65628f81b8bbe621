//! How the kernels run on one adapter, as a plain value: chosen once per context from the
//! adapter's capabilities ([`Strategy::for_device`]), read once per call, and overridable
//! per call through [`crate::gpu::Options::strategy`] (tests run every strategy on one
//! device; benchmarks compare them). Nothing here is mutable context state.

use super::layout::{
    PIXEL_WG_MAX, PIXEL_WG_MIN, STAGED_PPT, STAGE_FLOATS, STAGE_PIXELS_MAX, STATS_PPT,
};
use super::stages::{grad_pixels_per_invocation, Kernel};
use crate::error::{Error, Result};

/// How the stats stage combines the sums of a tile's invocations (a file of
/// `shaders/tile_sum/` each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TileSum {
    /// Subgroup operations, a partial row per subgroup (`tile_sum/subgroup.wgsl`).
    Subgroup,
    /// Workgroup memory and barriers, a row per tile (`tile_sum/workgroup.wgsl`).
    Workgroup,
    /// None: a partial row per invocation, no barrier (`tile_sum/invocation.wgsl`).
    Invocation,
}

impl TileSum {
    /// Subgroups where the device has them (and sizes the shader handles, 4 to 128);
    /// otherwise [`TileSum::without_subgroups`].
    pub fn preferred(device: &wgpu::Device, info: &wgpu::AdapterInfo) -> Self {
        if subgroups_usable(device, info) {
            TileSum::Subgroup
        } else {
            Self::without_subgroups(device, info)
        }
    }

    /// Without subgroups: no barrier on CPU adapters (llvmpipe compiles barriers slowly
    /// and runs them slowly), workgroup memory on GPUs (fewer partial rows to write) when
    /// the device has enough of it.
    pub fn without_subgroups(device: &wgpu::Device, info: &wgpu::AdapterInfo) -> Self {
        if info.device_type != wgpu::DeviceType::Cpu && TileSum::Workgroup.fits(device) {
            TileSum::Workgroup
        } else {
            TileSum::Invocation
        }
    }

    /// The stats kernels of this sum: (stats alone, stats that also writes the gradient).
    pub fn kernels(self) -> [Kernel; 2] {
        match self {
            TileSum::Subgroup => [Kernel::StatsSubgroup, Kernel::StatsGradSubgroup],
            TileSum::Workgroup => [Kernel::StatsWorkgroup, Kernel::StatsGradWorkgroup],
            TileSum::Invocation => [Kernel::StatsInvocation, Kernel::StatsGradInvocation],
        }
    }

    /// Whether the device has the workgroup memory this sum's kernels declare.
    fn fits(self, device: &wgpu::Device) -> bool {
        workgroup_memory_error(&self.kernels(), PIXEL_WG_MAX, device).is_none()
    }
}

/// An error naming the first of `kernels` that declares more workgroup memory than the
/// device's `max_compute_workgroup_storage_size` (16,352 bytes on the most limited
/// adapters: wgpu's downlevel limits).
/// wgpu does not check this; a pipeline past the limit fails on some drivers and is
/// undefined on others.
fn workgroup_memory_error(
    kernels: &[Kernel],
    pixel_wg: u32,
    device: &wgpu::Device,
) -> Option<Error> {
    let limit = device.limits().max_compute_workgroup_storage_size;
    kernels.iter().find_map(|k| {
        let need = k.info().workgroup_bytes_with(pixel_wg);
        (need > limit).then(|| {
            Error::Input(format!(
                "{k:?} declares {need} bytes of workgroup memory; this device allows {limit} \
                 (max_compute_workgroup_storage_size)"
            ))
        })
    })
}

/// An error where an image has more stats tiles than a CPU adapter's loops can sum (more
/// than 65,535 × 8,192 pixels at the largest tiles: llvmpipe would stop the sum short and
/// return a wrong loss with no error).
pub(crate) fn tile_loop_error(strategy: &Strategy, pixels: usize, cpu: bool) -> Option<Error> {
    let tiles = pixels.div_ceil(strategy.stats_tile());
    (cpu && tiles > CPU_LOOP_CAP).then(|| {
        Error::Input(format!(
            "an image of {pixels} pixels is {tiles} stats tiles of {}; a CPU adapter sums at \
             most {CPU_LOOP_CAP} an image (llvmpipe's cap on loop iterations): split the image",
            strategy.stats_tile()
        ))
    })
}

/// Whether the adapter is lavapipe (Mesa's llvmpipe through Vulkan), whose
/// robustBufferAccess2 bounds buffer accesses in the driver (`Strategy::index_checks`).
fn is_lavapipe(info: &wgpu::AdapterInfo) -> bool {
    info.backend == wgpu::Backend::Vulkan
        && info.device_type == wgpu::DeviceType::Cpu
        && (info.driver == "llvmpipe" || info.name.starts_with("llvmpipe"))
}

fn subgroups_usable(device: &wgpu::Device, info: &wgpu::AdapterInfo) -> bool {
    device.features().contains(wgpu::Features::SUBGROUP)
        && info.subgroup_min_size >= 4
        && info.subgroup_max_size <= 128
}

/// The choices a call's kernels are built and dispatched with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Strategy {
    /// How the stats stage sums a tile.
    pub tile_sum: TileSum,
    /// Stats and grad invocations take runs of consecutive pixels (CPU adapters: a
    /// sequential stream per SIMD lane) instead of neighbouring invocations taking
    /// neighbouring pixels (GPUs: coalesced loads). See `CONTIGUOUS` in
    /// shaders/util/pixels.wgsl.
    pub contiguous_pixels: bool,
    /// With `contiguous_pixels`, the stats and grad stages read and write four consecutive
    /// pixels of a class as one vec4 wherever the call's layout allows (`plan::quads`;
    /// `QUADS` in shaders/util/pixels.wgsl). On CPU adapters, where every storage access
    /// costs a sequence per SIMD lane whatever its width (BENCHMARKS.md, "Quads").
    pub quad_pixels: bool,
    /// The subgroup size the stats stage's partial rows are planned for, with
    /// `TileSum::Subgroup` (0: the adapter's smallest). A smaller size plans more rows than
    /// the subgroups write, so tests reach `clear_spare_rows`.
    pub planned_subgroup_size: u32,
    /// The largest binding, in bytes, that batches are split to fit (0: the device's
    /// `max_storage_buffer_binding_size`); tests lower it to exercise chunking.
    pub binding_limit: u64,
    /// The most classes whose logits an invocation of the stats and grad stages keeps once
    /// read (a power of two, 8 to 1024): with C ≤ `class_block` each logit is read from
    /// memory once per pass. 256 on CPU adapters (llvmpipe's compile time grows steeply
    /// past it); 8 on GPUs, whose registers hold little (see `BLOCK` in
    /// shaders/util/pixels.wgsl): past it GPUs stage the classes in workgroup memory
    /// (`class_staging`).
    pub class_block: u32,
    /// The most classes the stats stage (and its one-pass form) keeps once read, when that
    /// is fewer than `class_block`'s (a power of two, 8 to 1024): past it the stats stage
    /// reads its classes again where used, `CHUNK` classes at a time in the class
    /// sums. 32 on CPU adapters: there a class loop that Mesa does not unroll indexes the
    /// invocation arrays with a variable, a gather or scatter lane by lane, and from about
    /// 33 classes that costs more than reading the logits again (1×150×96×96 DiceCE:
    /// stats −47 % executed instructions; BENCHMARKS.md, "The stats stage's class block").
    /// The grad stage past this block takes its classes in chunks (`grad_chunks`), or
    /// else keeps `class_block`'s: past a block it would read each class's coefficients
    /// four times a pixel. Equal to `class_block` on GPUs.
    pub stats_class_block: u32,
    /// With more classes than the stats stage's block (`stats_block_for`), the grad stage
    /// (compiled with that block) keeps no class of a pixel in invocation memory and takes
    /// the classes in chunks of 8, each chunk's coefficients read once an invocation, four
    /// pixels a vec4 where quads fit (grad.wgsl `GRAD_CHUNKS`, `plan::chunk_quads`):
    /// two reads of a logit in all (the softmax's online pass, which also sums what every
    /// class's gradient needs, and the gradient's; a third with a focal term), none of
    /// them through an array indexed in a loop. On for CPU
    /// adapters (BENCHMARKS.md, "The stats stage's class block"); GPUs past their block
    /// stage the classes instead.
    pub grad_chunks: bool,
    /// The kernels that write the gradient read the coefficient table through a uniform
    /// binding wherever it fits one (B·C ≤ `layout::coef_rows` of the device, 4,096 with
    /// 64 KiB uniform bindings): grad_pixel.wgsl `UNIFORM_COEFS`. On for CPU adapters,
    /// where llvmpipe reads a storage buffer with a mask test, bounds check and load per
    /// active lane, and a uniform buffer with clamped indices and a plain load a lane, no
    /// branch: the chunked grad stage reads a class's coefficients for every four pixels
    /// (BENCHMARKS.md, "Uniform coefficients"). Off on GPUs, where nothing has measured it
    /// (their kernels still declare and bind the view, unread: one 64 KiB range of `fin`).
    pub uniform_coefs: bool,
    /// Specs of pixel terms only (cross-entropy, focal, BCE) with a gradient take the
    /// one-pass path (a labels-only pass for the normalisers, then one pass over the logits
    /// that writes statistics and gradient) from this many logits B·C·S up; below it the
    /// two passes cost less than the extra dispatches. 0: always; `u64::MAX`: never.
    pub one_pass_min_elements: u64,
    /// Calls whose stats stage writes at most this many partial-row floats (B × tiles ×
    /// rows per tile × row width) have finalize add the partial rows itself instead of two
    /// summing dispatches before it (same order, so the same bits; ARCHITECTURE.md, "Small
    /// calls"). 0: never; values above [`FINALIZE_SUMS_CAP`] act as that cap.
    pub finalize_sums_max_floats: u64,
    /// Invocations per stats and grad workgroup (a power of two, 32 to 256; with
    /// `TileSum::Subgroup` at least the adapter's largest subgroup). A stats tile is this
    /// many invocations of 32 pixels. 256 on GPUs; 32 on CPU adapters, where a workgroup
    /// runs on one thread: tiles of 1,024 pixels give every thread work on small images
    /// (1×150×96×96 was 2 tiles of 8,192 and 1,024 pixels, one thread doing 8/9 of the
    /// pass), and the partial rows per pixel stay the same (BENCHMARKS.md, "Tiles for
    /// every thread").
    pub pixel_workgroup: u32,
    /// Calls with more classes than `class_block` stage every class of a sub-tile of pixels
    /// in workgroup memory (shaders/staged.wgsl), so that each logit is read from memory
    /// once per pass at any class count up to `STAGE_FLOATS` (2,048; 1,024 with soft
    /// labels); off, or past that, classes beyond the block are read again where used. On
    /// wherever the device has the staged kernels' workgroup memory (ARCHITECTURE.md,
    /// "Staged classes").
    pub class_staging: bool,
    /// Pixels per staged sub-tile of the call (0: not staged). Derived for each call from
    /// the fields above ([`Strategy::for_call`]); a value set here is replaced.
    pub stage_pixels: u32,
    /// The kernels are compiled with naga's clamp on every variable index into an
    /// invocation or workgroup array (wgpu's default). Off on lavapipe: there the clamp
    /// (`min(c, len − 1)`) hides the loop's counter from Mesa's loop analysis, which
    /// unrolls a loop of up to 32 iterations that indexes an array exactly as long as its
    /// trip count only when the index is the counter itself, so the grad stage's class
    /// loops at 21 classes stayed rolled, every array access in them a lane-by-lane gather
    /// (BENCHMARKS.md, "Index clamps"). Every such index in the WGSL is bounded by its
    /// loop or an `in_block` test; tests/gpu/index_checks.rs compares every output bit of
    /// calls compiled both ways. Buffer accesses stay bounded either way on lavapipe (its
    /// robustBufferAccess2). On elsewhere, and [`Strategy::validate`] refuses it off on
    /// any other adapter.
    pub index_checks: bool,
}

/// The staged kernels (their workgroup memory decides whether a device stages).
const STAGED_KERNELS: [Kernel; 3] = [
    Kernel::StatsStaged,
    Kernel::StatsGradStaged,
    Kernel::GradStaged,
];

/// The largest class block a kernel is compiled for.
pub const MAX_CLASS_BLOCK: u32 = 1024;
/// Up to this many classes a call's class block is C itself (`Strategy::block_for`): Mesa's
/// limit on the iterations of a loop it unrolls (`max_unroll_iterations` in llvmpipe).
pub const EXACT_BLOCK_CLASSES: u32 = 32;
/// Where the one-pass path starts paying (BENCHMARKS.md, "One pass for pixel terms").
const ONE_PASS_MIN_ELEMENTS: u64 = 1 << 18;
/// Where finalize stops adding the partial rows itself: 2¹⁶ floats are 1,024 reads for
/// each of its 64 invocations, far below llvmpipe's 65,535 loop iterations an invocation.
const FINALIZE_SUMS_MAX_FLOATS: u64 = 1 << 16;
/// The most partial-row floats finalize ever adds itself, whatever the strategy says: 2²⁰
/// are 16,384 reads an invocation, a quarter of llvmpipe's cap on loop iterations (past
/// the cap llvmpipe ends the loops early and the sums would be wrong, with no error).
pub const FINALIZE_SUMS_CAP: u64 = 1 << 20;
/// Stats tiles an image may have before a call doubles its pixel workgroup
/// (`Strategy::for_call`): half of llvmpipe's cap on loop iterations.
const MAX_TILES_PER_IMAGE: usize = 1 << 15;
/// llvmpipe ends an invocation's loops after this many iterations in all, with no error;
/// sum_tiles.wgsl loops over an image's stats tiles in one invocation.
const CPU_LOOP_CAP: usize = 65_535;
/// The class block cap on CPU adapters: every class of a pixel in invocation memory up to
/// 256 classes. llvmpipe's compile time grows steeply past it (a pipeline set at 600 or
/// 1,024 classes: 15–18 s at 256, 255–272 s at 1,024; BENCHMARKS.md, "Staged classes").
const CPU_CLASS_BLOCK: u32 = 256;
/// The stats stage's class block cap on CPU adapters (`Strategy::stats_class_block`).
const CPU_STATS_CLASS_BLOCK: u32 = 32;
/// The pixel-stage workgroup on CPU adapters (`Strategy::pixel_workgroup`).
const CPU_PIXEL_WG: u32 = PIXEL_WG_MIN;

impl Strategy {
    /// The strategy segloss uses on this device by default.
    pub fn for_device(device: &wgpu::Device, info: &wgpu::AdapterInfo) -> Self {
        Strategy {
            tile_sum: TileSum::preferred(device, info),
            contiguous_pixels: info.device_type == wgpu::DeviceType::Cpu,
            quad_pixels: info.device_type == wgpu::DeviceType::Cpu,
            planned_subgroup_size: 0,
            binding_limit: 0,
            class_block: if info.device_type == wgpu::DeviceType::Cpu {
                CPU_CLASS_BLOCK
            } else {
                8
            },
            stats_class_block: if info.device_type == wgpu::DeviceType::Cpu {
                CPU_STATS_CLASS_BLOCK
            } else {
                8
            },
            grad_chunks: info.device_type == wgpu::DeviceType::Cpu,
            uniform_coefs: info.device_type == wgpu::DeviceType::Cpu,
            one_pass_min_elements: ONE_PASS_MIN_ELEMENTS,
            finalize_sums_max_floats: FINALIZE_SUMS_MAX_FLOATS,
            pixel_workgroup: if info.device_type == wgpu::DeviceType::Cpu {
                CPU_PIXEL_WG
                    .max(info.subgroup_max_size.next_power_of_two())
                    .min(PIXEL_WG_MAX)
            } else {
                PIXEL_WG_MAX
            },
            // CPU adapters keep every class of a pixel in invocation memory up to 256 and
            // read classes past it again (from the CPU's cache); the staged form measured
            // 1.9–3.5× slower there (llvmpipe runs each barrier as a switch between
            // coroutines: BENCHMARKS.md, "Staged classes").
            class_staging: info.device_type != wgpu::DeviceType::Cpu
                && workgroup_memory_error(&STAGED_KERNELS, PIXEL_WG_MAX, device).is_none(),
            stage_pixels: 0,
            index_checks: !is_lavapipe(info),
        }
    }

    /// An error where the device cannot run this strategy: subgroup sums without usable
    /// subgroups, a class block or pixel workgroup out of range (or a workgroup smaller than
    /// the adapter's subgroups, with subgroup sums), kernels declaring more workgroup memory
    /// than the device has, rows planned for subgroups larger than the adapter's smallest
    /// (rows some subgroups would then leave unwritten), or index clamps off on an adapter
    /// other than lavapipe.
    pub fn validate(&self, device: &wgpu::Device, info: &wgpu::AdapterInfo) -> Result<()> {
        if self.tile_sum == TileSum::Subgroup && !subgroups_usable(device, info) {
            return Err(Error::Input(format!(
                "TileSum::Subgroup needs Features::SUBGROUP and subgroups of 4 to 128 \
                 invocations; this device has {} (sizes {}..={})",
                if device.features().contains(wgpu::Features::SUBGROUP) {
                    "the feature"
                } else {
                    "no SUBGROUP feature"
                },
                info.subgroup_min_size,
                info.subgroup_max_size
            )));
        }
        if !self.index_checks && !is_lavapipe(info) {
            // Without the clamps wgpu also drops naga's buffer checks, which only a driver
            // that bounds buffer accesses itself makes safe to drop.
            return Err(Error::Input(format!(
                "index_checks off is allowed on lavapipe only (whose robustBufferAccess2 \
                 bounds buffer accesses), not on {} ({:?})",
                info.name, info.backend
            )));
        }
        if !self.class_block.is_power_of_two() || !(8..=MAX_CLASS_BLOCK).contains(&self.class_block)
        {
            return Err(Error::Input(format!(
                "class_block {} is not a power of two from 8 to {MAX_CLASS_BLOCK}",
                self.class_block
            )));
        }
        if !self.stats_class_block.is_power_of_two()
            || !(8..=MAX_CLASS_BLOCK).contains(&self.stats_class_block)
        {
            return Err(Error::Input(format!(
                "stats_class_block {} is not a power of two from 8 to {MAX_CLASS_BLOCK}",
                self.stats_class_block
            )));
        }
        let wg = self.pixel_workgroup;
        if !wg.is_power_of_two() || !(PIXEL_WG_MIN..=PIXEL_WG_MAX).contains(&wg) {
            return Err(Error::Input(format!(
                "pixel_workgroup {wg} is not a power of two from {PIXEL_WG_MIN} to {PIXEL_WG_MAX}"
            )));
        }
        if self.tile_sum == TileSum::Subgroup && wg < info.subgroup_max_size {
            return Err(Error::Input(format!(
                "pixel_workgroup {wg} is smaller than this adapter's subgroups (up to {}): \
                 TileSum::Subgroup plans a partial row per whole subgroup",
                info.subgroup_max_size
            )));
        }
        let [stats, stats_grad] = self.tile_sum.kernels();
        if let Some(e) = workgroup_memory_error(&[stats, stats_grad, Kernel::Finalize], wg, device)
        {
            return Err(e);
        }
        let sp = self.stage_pixels;
        if sp > 0 && (!sp.is_power_of_two() || sp > STAGE_PIXELS_MAX.min(wg)) {
            return Err(Error::Input(format!(
                "stage_pixels {sp} is not a power of two up to {}",
                STAGE_PIXELS_MAX.min(wg)
            )));
        }
        if self.class_staging || sp > 0 {
            if let Some(e) = workgroup_memory_error(&STAGED_KERNELS, wg, device) {
                return Err(e);
            }
        }
        if self.planned_subgroup_size > info.subgroup_min_size {
            return Err(Error::Input(format!(
                "partial rows planned for subgroups of {} invocations, but this adapter's \
                 subgroups may be as small as {}",
                self.planned_subgroup_size, info.subgroup_min_size
            )));
        }
        Ok(())
    }

    /// The class block of a call with C classes: C itself up to [`EXACT_BLOCK_CLASSES`],
    /// else the smallest power of two ≥ C; at most `class_block`. (Mesa unrolls a class
    /// loop of up to 32 iterations whatever its length when the arrays it indexes are
    /// exactly as long as its trip count: `Strategy::index_checks`.)
    pub fn block_for(&self, classes: usize) -> u32 {
        let block = if classes <= EXACT_BLOCK_CLASSES as usize {
            classes.max(1) as u32
        } else {
            classes.next_power_of_two() as u32
        };
        block.min(self.class_block)
    }

    /// The class block of the stats stage (and its one-pass form) for C classes:
    /// `block_for`, at most `stats_class_block` while C ≤ `class_block`. (Past
    /// `class_block` every stage reads classes again already; a smaller block there would
    /// lengthen the per-pixel class loops towards llvmpipe's cap on loop iterations, and was
    /// not measured.)
    pub fn stats_block_for(&self, classes: usize) -> u32 {
        let block = self.block_for(classes);
        if classes <= self.class_block as usize {
            block.min(self.stats_class_block)
        } else {
            block
        }
    }

    /// Pixels per staged sub-tile for a call with `classes` classes (0: not staged): with
    /// `class_staging`, more classes than `class_block` and every class of a pixel (and its
    /// soft targets) within `STAGE_FLOATS`, the most pixels (a power of two, up to 32 and the
    /// workgroup) whose classes fit.
    pub fn stage_pixels_for(&self, classes: usize, soft_labels: bool) -> u32 {
        let floats = classes * if soft_labels { 2 } else { 1 };
        if !self.class_staging || classes <= self.class_block as usize || floats == 0 {
            return 0;
        }
        let fit = STAGE_FLOATS as usize / floats;
        if fit == 0 {
            return 0;
        }
        let pow2 = 1u32 << (usize::BITS - 1 - fit.leading_zeros());
        pow2.min(STAGE_PIXELS_MAX).min(self.pixel_workgroup.max(1))
    }

    /// The strategy a call over images of `pixels` pixels and `classes` classes runs with:
    /// its `stage_pixels` ([`Strategy::stage_pixels_for`]), and `pixel_workgroup` doubled
    /// (up to 256) while an image would have more than 32,768 stats tiles, so that the tile
    /// sums stay far from llvmpipe's cap on loop iterations (CPU adapters' tiles of 1,024
    /// pixels reach it at 67 million pixels an image; 8,192² is 67 million).
    pub fn for_call(self, pixels: usize, classes: usize, soft_labels: bool) -> Strategy {
        let mut s = self;
        s.stage_pixels = s.stage_pixels_for(classes, soft_labels);
        let wg = s.pixel_workgroup;
        if !wg.is_power_of_two() || !(PIXEL_WG_MIN..=PIXEL_WG_MAX).contains(&wg) {
            return s; // for `validate` to refuse
        }
        while s.pixel_workgroup < PIXEL_WG_MAX
            && pixels.div_ceil(s.stats_tile()) > MAX_TILES_PER_IMAGE
        {
            s.pixel_workgroup *= 2;
        }
        s
    }

    /// Pixels per stats tile (a workgroup's).
    pub(crate) fn stats_tile(&self) -> usize {
        if self.stage_pixels > 0 {
            return self.staged_tile();
        }
        (self.pixel_workgroup * STATS_PPT) as usize
    }

    /// Pixels per staged tile (stats and grad stages alike).
    fn staged_tile(&self) -> usize {
        (self.pixel_workgroup * STAGED_PPT) as usize
    }

    /// Pixels per grad workgroup.
    pub(crate) fn grad_tile(&self) -> usize {
        if self.stage_pixels > 0 {
            return self.staged_tile();
        }
        self.pixel_workgroup as usize * grad_pixels_per_invocation(self.contiguous_pixels)
    }

    /// The call's stats kernels (stats alone, stats that also writes the gradient) and
    /// grad kernels (its own buffers, a buffer shared with the inputs).
    pub(crate) fn pixel_kernels(&self) -> ([Kernel; 2], [Kernel; 2]) {
        if self.stage_pixels > 0 {
            (
                [Kernel::StatsStaged, Kernel::StatsGradStaged],
                [Kernel::GradStaged, Kernel::GradStagedShared],
            )
        } else {
            (self.tile_sum.kernels(), [Kernel::Grad, Kernel::GradShared])
        }
    }

    /// Partial rows each stats tile writes.
    pub(crate) fn rows_per_tile(&self, info: &wgpu::AdapterInfo) -> usize {
        let wg = self.pixel_workgroup as usize;
        if self.stage_pixels > 0 {
            return 1;
        }
        match self.tile_sum {
            TileSum::Subgroup => {
                let size = match self.planned_subgroup_size {
                    0 => info.subgroup_min_size,
                    n => n,
                };
                wg / size.max(1) as usize
            }
            TileSum::Invocation => wg,
            TileSum::Workgroup => 1,
        }
    }
}

/// A CPU adapter's strategy with subgroup sums, for unit tests without a device.
#[cfg(test)]
pub(crate) fn cpu_for_tests() -> Strategy {
    tests::cpu()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn cpu() -> Strategy {
        Strategy {
            tile_sum: TileSum::Subgroup,
            contiguous_pixels: true,
            quad_pixels: true,
            planned_subgroup_size: 0,
            binding_limit: 0,
            class_block: CPU_CLASS_BLOCK,
            stats_class_block: CPU_STATS_CLASS_BLOCK,
            grad_chunks: true,
            uniform_coefs: true,
            one_pass_min_elements: ONE_PASS_MIN_ELEMENTS,
            finalize_sums_max_floats: FINALIZE_SUMS_MAX_FLOATS,
            pixel_workgroup: CPU_PIXEL_WG,
            class_staging: true,
            stage_pixels: 0,
            index_checks: false,
        }
    }

    #[test]
    fn the_stats_stage_keeps_at_most_its_own_block_up_to_the_class_block() {
        let s = cpu();
        for (classes, block, stats) in [
            (1, 1, 1),
            (4, 4, 4),
            (21, 21, 21),
            (32, 32, 32),
            (33, 64, 32),
            (150, 256, 32),
            (256, 256, 32),
            (600, 256, 256),
        ] {
            assert_eq!(s.block_for(classes), block, "C = {classes}");
            assert_eq!(s.stats_block_for(classes), stats, "C = {classes}");
        }
        let gpu = Strategy {
            class_block: 8,
            stats_class_block: 8,
            ..s
        };
        assert_eq!(gpu.stats_block_for(150), 8);
        assert_eq!(gpu.block_for(5), 5);
        assert_eq!(gpu.block_for(21), 8);
    }

    #[test]
    fn very_large_images_get_larger_workgroups_and_the_largest_are_refused_on_cpus() {
        let s = cpu();
        // Up to 32,768 tiles of 1,024 pixels: the strategy's own workgroup.
        assert_eq!(s.for_call(96 * 96, 4, false).pixel_workgroup, 32);
        assert_eq!(s.for_call(1 << 25, 4, false).pixel_workgroup, 32);
        // 8,192² pixels: 65,536 tiles of 1,024, so tiles of 2,048.
        let big = s.for_call(8192 * 8192, 4, false);
        assert_eq!(big.pixel_workgroup, 64);
        assert_eq!((8192 * 8192usize).div_ceil(big.stats_tile()), 1 << 15);
        // Never past 256; past 65,535 tiles of 8,192 a CPU adapter refuses the image.
        let huge = 65_536 * 8_192;
        assert_eq!(s.for_call(huge, 4, false).pixel_workgroup, 256);
        assert!(tile_loop_error(&s.for_call(huge, 4, false), huge, true).is_some());
        assert!(tile_loop_error(&s.for_call(huge, 4, false), huge, false).is_none());
        let most = 65_535 * 8_192;
        assert!(tile_loop_error(&s.for_call(most, 4, false), most, true).is_none());
        // A workgroup out of range is left for `validate` to refuse.
        for wg in [0, 16, 48, 512] {
            let bad = Strategy {
                pixel_workgroup: wg,
                ..s
            };
            assert_eq!(bad.for_call(1 << 30, 4, false).pixel_workgroup, wg);
        }
        // A GPU's workgroup of 256 is left as it is.
        let gpu = Strategy {
            pixel_workgroup: PIXEL_WG_MAX,
            ..s
        };
        assert_eq!(gpu.for_call(1 << 30, 4, false).pixel_workgroup, 256);
    }

    #[test]
    fn staging_starts_past_the_class_block_and_fits_the_sub_tile() {
        let gpu = Strategy {
            class_block: 8,
            pixel_workgroup: PIXEL_WG_MAX,
            contiguous_pixels: false,
            ..cpu()
        };
        // Within the register block: not staged.
        assert_eq!(gpu.stage_pixels_for(8, false), 0);
        // Past it: the most pixels whose classes fit 2,048 floats, at most 32.
        assert_eq!(gpu.stage_pixels_for(9, false), 32);
        assert_eq!(gpu.stage_pixels_for(21, false), 32);
        assert_eq!(gpu.stage_pixels_for(150, false), 8);
        assert_eq!(gpu.stage_pixels_for(150, true), 4);
        assert_eq!(gpu.stage_pixels_for(1024, false), 2);
        assert_eq!(gpu.stage_pixels_for(1024, true), 1);
        assert_eq!(gpu.stage_pixels_for(2048, false), 1);
        // Past the sub-tile, or with staging off: the register path.
        assert_eq!(gpu.stage_pixels_for(2049, false), 0);
        assert_eq!(gpu.stage_pixels_for(1025, true), 0);
        let off = Strategy {
            class_staging: false,
            ..gpu
        };
        assert_eq!(off.stage_pixels_for(150, false), 0);
        // CPU adapters' block of 256 holds up to 256 classes; past it, with staging on,
        // their workgroup of 32 caps the sub-tile.
        assert_eq!(cpu().stage_pixels_for(256, false), 0);
        assert_eq!(cpu().stage_pixels_for(600, false), 2);
        let small_wg = Strategy {
            pixel_workgroup: 32,
            ..gpu
        };
        assert_eq!(small_wg.stage_pixels_for(9, false), 32);
        // A staged call has a row per tile of WG · 4 pixels, for stats and grad alike.
        let call = gpu.for_call(1000, 150, false);
        assert_eq!(call.stage_pixels, 8);
        assert_eq!(call.stats_tile(), 1024);
        assert_eq!(call.grad_tile(), 1024);
        assert_eq!(
            call.pixel_kernels().0,
            [Kernel::StatsStaged, Kernel::StatsGradStaged]
        );
        let plain = gpu.for_call(1000, 8, false);
        assert_eq!(plain.stage_pixels, 0);
        assert_eq!(plain.stats_tile(), 8192);
        assert_eq!(plain.grad_tile(), 2048);
    }
}
