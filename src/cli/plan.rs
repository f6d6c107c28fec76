//! `flux-kernels plan` and the first lines of `train`: predicted peak GPU memory, whether it fits
//! the card, and which settings would.

use super::args::RopeArgs;
use super::args::{deprecated, AdapterArgs, CheckpointingArgs};
use super::{open_model, ModelSpec};
use crate::model::checkpoint::Checkpoint;
use crate::plan::{gib, plan, suggest, swap, table, Base, Settings};
use crate::quant::Code;
use crate::train::config::TrainConfig;
use anyhow::{bail, Context, Result};
use std::fmt::Write;

#[derive(clap::Args)]
pub struct Args {
    /// A checkpoint or a built-in configuration name (flux1-dev).
    #[arg(long)]
    pub model: String,
    #[command(flatten)]
    pub rope: RopeArgs,
    /// Base weights on the GPU: bf16, int8, fp8 or fp8-scaled. Default: what the checkpoint
    /// holds (bf16 for a configuration name).
    #[arg(long)]
    pub base: Option<String>,
    /// Image size in pixels: 1024 (square) or 1024x768 (width × height).
    #[arg(long, default_value = "1024")]
    pub resolution: String,
    /// Samples per micro-batch.
    #[arg(long, default_value_t = 1, conflicts_with = "batch")]
    pub batch_size: usize,
    /// Deprecated spelling of --batch-size.
    #[arg(long, hide = true)]
    pub batch: Option<usize>,
    /// T5 tokens (512 for FLUX.1-dev, 256 for schnell).
    #[arg(long, default_value_t = 512)]
    pub text_tokens: usize,
    #[command(flatten)]
    pub checkpointing: CheckpointingArgs,
    /// Where the modulation linears' weights live: gpu or host.
    #[arg(long, value_name = "gpu|host", default_value = "gpu")]
    pub modulation: String,
    /// GPU memory in GiB to check the plan against.
    #[arg(long, default_value_t = 24.0)]
    pub gpu_memory: f64,
    #[command(flatten)]
    pub adapter: AdapterArgs,
    /// Plan for an H100/H200, whose sm_90a LoRA GEMM needs no f32 base-product scratch (ranks
    /// that are multiples of 8) and dequantises an 8-bit base one linear at a time.
    #[arg(long)]
    pub hopper: bool,
    /// Keep the last N blocks' frozen weights in pinned host memory (block swap, as `train
    /// --blocks-to-swap`).
    #[arg(long, default_value_t = 0, conflicts_with = "max_vram")]
    pub blocks_to_swap: usize,
    /// GPU memory in GiB to fit by block swap: chooses the fewest blocks to swap (as `train
    /// --max-vram`) and checks the plan against this size instead of --gpu-memory.
    #[arg(long, value_name = "GIB")]
    pub max_vram: Option<f64>,
    /// With --gradient-checkpointing: the block inputs in pinned host memory (as `train
    /// --offload-checkpoints`).
    #[arg(long)]
    pub offload_checkpoints: bool,
}

pub fn main(a: Args) -> Result<()> {
    let (width, height) = parse_resolution(&a.resolution)?;
    let checkpointing = a.checkpointing.get(false);
    let settings = Settings {
        base: Base::Bf16,
        width,
        height,
        batch: deprecated(a.batch, "--batch", "--batch-size").unwrap_or(a.batch_size),
        text_tokens: a.text_tokens,
        checkpointing,
        modulation_on_host: parse_modulation(&a.modulation)?,
        lora: a.adapter.config()?,
        hopper: a.hopper,
        blocks_to_swap: a.blocks_to_swap,
        offload_checkpoints: a.offload_checkpoints,
    };
    let limit = Limit { gib: a.max_vram.unwrap_or(a.gpu_memory), choose_swap: a.max_vram.is_some() };
    print!("{}", run(&a.model, a.rope.rope_axes.as_deref(), a.base.as_deref(), settings, limit)?);
    Ok(())
}

/// The GPU memory a plan is checked against, and whether block swap is chosen to fit it.
#[derive(Clone, Copy, Debug)]
pub struct Limit {
    pub gib: f64,
    pub choose_swap: bool,
}

/// `--max-vram` as bytes, refused unless positive and finite.
fn max_vram_bytes(gib: f64) -> Result<usize> {
    if !(gib.is_finite() && gib > 0.0) {
        bail!("--max-vram {gib}: GiB of GPU memory, a positive number");
    }
    Ok((gib * (1u64 << 30) as f64) as usize)
}

/// `--resolution 1024` or `1024x768` (width × height).
pub fn parse_resolution(s: &str) -> Result<(usize, usize)> {
    let num = |x: &str| x.trim().parse::<usize>().with_context(|| format!("--resolution `{s}`: `{x}` is not a number"));
    match s.split_once(['x', 'X']) {
        Some((w, h)) => Ok((num(w)?, num(h)?)),
        None => Ok((num(s)?, num(s)?)),
    }
}

pub fn parse_modulation(s: &str) -> Result<bool> {
    match s {
        "host" => Ok(true),
        "gpu" => Ok(false),
        _ => bail!("--modulation takes host or gpu, got `{s}`"),
    }
}

/// The base dtype a checkpoint holds: 8-bit if its weights are.
pub fn base_of(ckpt: &Checkpoint) -> Base {
    let code = ckpt.params.values().find_map(|p| p.quant().map(|q| q.pieces[0].code));
    match code {
        Some(Code::I8) => Base::Int8,
        Some(Code::E4M3) => Base::Fp8,
        None => Base::Bf16,
    }
}

/// The plan's table with the fit verdict against `limit_gib` and, when it does not fit, the
/// settings that would. Returns (report, fits).
pub fn report(cfg: &crate::model::config::FluxConfig, s: &Settings, limit_gib: f64) -> Result<(String, bool)> {
    let p = plan(cfg, s)?;
    let mut r = String::new();
    writeln!(
        r,
        "memory plan: {} base, {}x{} ({} image + {} text tokens), batch {}, {} trainable LoRA params, \
         checkpointing {}, modulation on the {}",
        s.base.name(),
        s.width,
        s.height,
        p.tokens.img,
        p.tokens.txt,
        s.batch,
        crate::util::thousands(p.trainable),
        if s.checkpointing { "on" } else { "off" },
        if s.modulation_on_host { "host" } else { "GPU" },
    )?;
    r += &table(&p);
    if s.blocks_to_swap > 0 {
        let sw = &p.swap;
        writeln!(
            r,
            "block swap: {} blocks ({} double + {} single) in pinned host memory; {:.2} GiB over PCIe per step once \
             warm, {:.0} ms at an assumed {:.0} GB/s (PCIe 4.0 x16): a prediction, hidden while a block computes \
             longer than its copy",
            s.blocks_to_swap,
            sw.double,
            sw.single,
            gib(sw.pcie_per_step),
            1e3 * sw.pcie_seconds(swap::PCIE4_X16_BYTES_PER_S),
            swap::PCIE4_X16_BYTES_PER_S / 1e9
        )?;
    }
    let limit = (limit_gib * (1u64 << 30) as f64) as usize;
    let fits = p.gpu_total() <= limit;
    writeln!(
        r,
        "{} on a {limit_gib} GiB GPU ({:.2} GiB predicted; a prediction: no peak has been measured on a GPU yet)",
        if fits { "fits" } else { "does NOT fit" },
        gib(p.gpu_total())
    )?;
    if !fits {
        let alts = suggest::fitting(cfg, s, limit)?;
        if alts.is_empty() {
            writeln!(r, "no combination of checkpointing, checkpoint offload, 8-bit base, batch 1 and 512 px fits")?;
        }
        for (what, total) in alts {
            writeln!(r, "  would fit with {what}: {:.2} GiB", gib(total))?;
        }
    }
    Ok((r, fits))
}

/// `flux-kernels plan`.
pub fn run(model: &str, rope_axes: Option<&str>, base: Option<&str>, mut s: Settings, limit: Limit) -> Result<String> {
    let spec = open_model(model, rope_axes)?;
    s.base = match (base, &spec) {
        (Some(b), _) => Base::parse(b)?,
        (None, ModelSpec::Checkpoint(c)) => base_of(c),
        (None, ModelSpec::Named(..)) => Base::Bf16,
    };
    let mut head = String::new();
    if limit.choose_swap {
        let (n, total) = swap::choose(spec.cfg(), &s, max_vram_bytes(limit.gib)?)?;
        s.blocks_to_swap = n;
        writeln!(head, "--max-vram {} GiB: {n} blocks to swap ({:.2} GiB predicted)", limit.gib, gib(total))?;
    }
    Ok(head + &report(spec.cfg(), &s, limit.gib)?.0)
}

/// Total memory of CUDA device 0, if there is one.
fn device_memory() -> Result<usize> {
    // SAFETY: only probes whether libcuda can be dlopen'ed.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        bail!("no CUDA driver");
    }
    let ctx = cudarc::driver::CudaContext::new(0).context("no CUDA device")?;
    Ok(ctx.total_mem()?)
}

/// `train` with --device cuda or auto: print the plan's total first and stop before training
/// when it exceeds the device's memory. The trainer keeps every block's activations (it has no
/// checkpointing yet) and the modulation weights on the device, so that is what is planned.
pub fn check_before_training(tc: &TrainConfig) -> Result<()> {
    // LoKr trains on the CPU path whatever --device says (the trainer's train_device).
    if tc.device == "cpu" || tc.adapter == "lokr" {
        return Ok(());
    }
    check_against(tc, device_memory())
}

/// `train --max-vram`: the fewest blocks to swap for the plan to fit, written into `tc`, with the
/// line that says what was chosen. None without --max-vram.
pub fn choose_blocks_to_swap(tc: &mut TrainConfig) -> Result<Option<String>> {
    if tc.max_vram == 0.0 {
        return Ok(None);
    }
    tc.check_block_swap()?;
    let (cfg, s) = train_settings(tc)?;
    let (n, total) = swap::choose(&cfg, &s, max_vram_bytes(tc.max_vram)?)?;
    let asked = tc.max_vram;
    // The choice replaces the request (a resumed run keeps the blocks, and the pair is refused).
    (tc.blocks_to_swap, tc.max_vram) = (n, 0.0);
    Ok(Some(format!(
        "--max-vram {asked} GiB: swapping {n} of {} blocks (the memory plan predicts {:.2} GiB)",
        cfg.depth + cfg.depth_single,
        gib(total)
    )))
}

/// The check against a device of `total` bytes (or none, with why).
fn check_against(tc: &TrainConfig, total: Result<usize>) -> Result<()> {
    let (cfg, s) = train_settings(tc)?;
    match total {
        Ok(total) => {
            let (r, fits) = report(&cfg, &s, gib(total))?;
            if !fits {
                bail!("{r}stopping before training: the step is predicted not to fit this GPU");
            }
            eprintln!(
                "memory plan: {:.2} GiB predicted of {:.2} GiB on the GPU",
                gib(plan(&cfg, &s)?.gpu_total()),
                gib(total)
            );
        }
        // `--device auto` without a GPU trains on the CPU: no GPU plan to speak of.
        Err(_) if tc.device != "cuda" => {}
        Err(e) => eprintln!(
            "memory plan: {:.2} GiB predicted on a GPU (not checked: {e:#})",
            gib(plan(&cfg, &s)?.gpu_total())
        ),
    }
    Ok(())
}

/// What `train` runs, as the plan's settings: its model's configuration (the tiny demo's when
/// there is no model) and the largest resolution side.
fn train_settings(tc: &TrainConfig) -> Result<(crate::model::config::FluxConfig, Settings)> {
    let (cfg, base) = if tc.model.is_empty() {
        (crate::model::config::FluxConfig::tiny(), Base::Bf16)
    } else {
        let axes =
            (!tc.rope_axes.is_empty()).then(|| crate::model::config::parse_rope_axes(&tc.rope_axes)).transpose()?;
        let ckpt = Checkpoint::open(std::path::Path::new(&tc.model), axes)?;
        let base = match (base_of(&ckpt), tc.base.as_str()) {
            (Base::Bf16, "int8") => Base::Int8,
            (b, _) => b,
        };
        (ckpt.cfg, base)
    };
    let sides = crate::train::sources::parse_sides(&tc.resolution)?;
    let side = sides.into_iter().max().unwrap_or(512);
    let s = Settings {
        base,
        width: side,
        height: side,
        batch: tc.batch_size,
        text_tokens: tc.t5_max_len,
        checkpointing: tc.gradient_checkpointing,
        modulation_on_host: false,
        lora: crate::train::trainer::lora_config(tc)?,
        // The cuBLAS-base path's f32 scratch is counted on every card: an over-estimate by one
        // linear's f32 output on an H100/H200, never an under-estimate.
        hopper: false,
        blocks_to_swap: tc.blocks_to_swap,
        offload_checkpoints: tc.offload_checkpoints,
    };
    Ok((cfg, s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tc(resolution: &str) -> TrainConfig {
        TrainConfig {
            model: "random:flux1-dev".into(),
            resolution: resolution.into(),
            rank: 32,
            device: "cuda".into(),
            ..TrainConfig::default()
        }
    }

    #[test]
    fn train_stops_before_training_when_the_plan_exceeds_the_device() {
        let e = format!("{:#}", check_against(&tc("1024"), Ok(24 << 30)).unwrap_err());
        assert!(e.contains("stopping before training") && e.contains("would fit with"), "{e}");
        assert!(e.contains("does NOT fit on a 24 GiB GPU"), "{e}");
        check_against(&tc("1024"), Ok(80 << 30)).unwrap();
        check_against(&tc("1024"), Err(anyhow::anyhow!("no CUDA driver"))).unwrap();
    }

    /// `train --max-vram`: the plan's choice goes into the config, and the check then passes on
    /// a card of that size; a size nothing fits names the flag.
    #[test]
    fn max_vram_chooses_the_blocks_to_swap_for_train() {
        let mut c =
            TrainConfig { rank: 16, base: "int8".into(), gradient_checkpointing: true, max_vram: 12.0, ..tc("1024") };
        let line = choose_blocks_to_swap(&mut c).unwrap().unwrap();
        assert!(line.contains("--max-vram 12 GiB: swapping 38 of 57 blocks"), "{line}");
        assert_eq!((c.blocks_to_swap, c.max_vram), (38, 0.0));
        c.check_block_swap().unwrap();
        check_against(&c, Ok(12 << 30)).unwrap();
        assert!(choose_blocks_to_swap(&mut c.clone()).unwrap().is_none(), "no --max-vram: no choice");
        c.blocks_to_swap = 0;
        assert!(check_against(&c, Ok(12 << 30)).is_err());
        let mut small = TrainConfig { max_vram: 4.0, ..c.clone() };
        let e = format!("{:#}", choose_blocks_to_swap(&mut small).unwrap_err());
        assert!(e.contains("--max-vram 4.00 GiB: the step does not fit even with all 57 blocks swapped"), "{e}");
        let mut both = TrainConfig { blocks_to_swap: 3, max_vram: 12.0, ..c };
        assert!(choose_blocks_to_swap(&mut both).unwrap_err().to_string().contains("give one"));
    }

    #[test]
    fn resolutions_and_switches_parse_or_name_the_flag() {
        assert_eq!(parse_resolution("1024").unwrap(), (1024, 1024));
        assert_eq!(parse_resolution("1024x768").unwrap(), (1024, 768));
        assert!(parse_resolution("big").unwrap_err().to_string().contains("--resolution"));
        assert!(parse_modulation("cpu").unwrap_err().to_string().contains("--modulation"));
        assert!(Base::parse("int4").unwrap_err().to_string().contains("--base"));
    }
}
