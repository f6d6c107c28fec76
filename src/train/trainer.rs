//! The training loop: flow-matching loss on batches of cached samples, backward to the LoRA
//! factors, AdamW, checkpoints, metrics, and the LoRA file at the end.

use super::builtin;
use super::checkpoint::{self, State};
use super::config::TrainConfig;
use super::data::{Dataset, Sample};
use super::objective::{loss_weight, noisy_pair, sample_sigma};
use super::sources::{parse_sides, Pipeline};
use crate::adapters::config::{parse_patterns, resolve_targets_to_train, AdapterSpec, Init, LoraConfig};
use crate::adapters::dora::frozen_row_norms;
use crate::adapters::export::{write_lora, LoraFormatOut};
use crate::adapters::{AdapterSet, Kind};
use crate::dist::nccl::Comm;
use crate::dist::rendezvous::{Config, Control};
use crate::dist::{self, timeout as dist_timeout, Joined, RankEnv};
use crate::engine::{BaseDtype, Device, Engine, EngineOptions};
use crate::io::lock::OutputLock;
use crate::io::safetensors::{atomic_write, output_folder, remove_stale_temps, Dtype};
use crate::model::checkpoint::Checkpoint;
use crate::model::config::{parse_rope_axes, FluxConfig};
use crate::model::flux::FluxInputs;
use crate::model::packing::{img_ids, pack_latent};
use crate::model::weights::FluxWeights;
use crate::ops::optim::{lr_at, AdamW};
use crate::sample::sampler::{sample, SampleSpec};
use crate::util::Rng;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// A per-(seed, index, stream) generator: each micro-batch draws from its own stream, so the
/// run's randomness needs no state beyond the step.
fn stream(seed: u64, k: u64, salt: u64) -> Rng {
    Rng::new(seed ^ k.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt.wrapping_mul(0xC2B2_AE3D_27D4_EB4F))
}

pub struct Outcome {
    pub steps_done: usize,
    pub interrupted: bool,
    pub lora_path: Option<PathBuf>,
    pub final_loss: f64,
    /// (before, after) style distances of the built-in demo's samples.
    pub demo: Option<(f32, f32)>,
    pub log: Vec<String>,
}

struct Model {
    cfg: FluxConfig,
    name: String,
}

fn open_model(tc: &TrainConfig) -> Result<(Model, FluxWeights)> {
    if tc.model.is_empty() {
        let cfg = builtin::tiny_config();
        let weights = builtin::tiny_weights(&cfg)?;
        return Ok((Model { cfg, name: "built-in tiny FLUX (random weights, seed 7)".into() }, weights));
    }
    let axes = if tc.rope_axes.is_empty() { None } else { Some(parse_rope_axes(&tc.rope_axes)?) };
    let ckpt = Checkpoint::open(Path::new(&tc.model), axes)?;
    let weights = FluxWeights::new(&ckpt.cfg, &|n| ckpt.param(n).cloned())?;
    Ok((Model { cfg: ckpt.cfg.clone(), name: tc.model.clone() }, weights))
}

pub fn lora_config(tc: &TrainConfig) -> Result<LoraConfig> {
    Ok(LoraConfig {
        rank: tc.rank,
        alpha: if tc.alpha > 0.0 { tc.alpha } else { tc.rank as f32 },
        rslora: tc.rslora,
        dropout: tc.dropout,
        targets: tc.targets.split(',').map(String::from).collect(),
        include_modulation: tc.include_modulation,
        rank_pattern: parse_patterns(&tc.rank_pattern, "rank_pattern")?,
        alpha_pattern: parse_patterns(&tc.alpha_pattern, "alpha_pattern")?,
        init: if tc.init == "gaussian" { Init::Gaussian } else { Init::KaimingUniform },
        use_dora: tc.adapter == "dora",
        lokr_factor: (tc.adapter == "lokr").then_some(tc.lokr_factor),
    })
}

/// The adapters of `lc` on `cfg` before training: their specs and a set of fresh terms (PEFT's
/// initialisation drawn from `rng`, B rows in BFL order). DoRA's magnitudes start from the frozen
/// weights, which `weights` must then give.
pub fn init_adapters(
    cfg: &FluxConfig,
    lc: &LoraConfig,
    rng: &mut Rng,
    weights: Option<&FluxWeights>,
) -> Result<AdapterInit> {
    let specs = resolve_targets_to_train(cfg, lc)?;
    let frozen = |module: &str| -> Result<Vec<f32>> {
        let w = weights.ok_or_else(|| anyhow::anyhow!("DoRA adapters need the frozen weights to start from"))?;
        let lin = w.linear(module).ok_or_else(|| anyhow::anyhow!("`{module}`: no such linear in the model"))?;
        Ok(lin.weight.load().with_context(|| module.to_string())?.into_owned())
    };
    let mut set = AdapterSet::new();
    for s in &specs {
        set.push(lc.init_term(s, rng, &frozen)?);
    }
    Ok(AdapterInit { specs, set })
}

/// What `init_adapters` returns.
pub struct AdapterInit {
    pub specs: Vec<AdapterSpec>,
    pub set: AdapterSet,
}

/// What a checkpoint records of the adapters, to refuse resuming with others (a LoRA entry reads
/// as before DoRA existed, so older checkpoints still resume).
fn layout(specs: &[AdapterSpec]) -> Vec<String> {
    let kind = |s: &AdapterSpec| match (s.dora, s.lokr_factor) {
        (true, _) => " dora".to_string(),
        (_, Some(f)) => format!(" lokr {f}"),
        _ => String::new(),
    };
    specs.iter().map(|s| format!("{} r{}{}", s.name, s.rank, kind(s))).collect()
}

/// Builds the inputs of one micro-batch, of the samples at positions `keep` of `idx` (one
/// data-parallel rank's slice): x_t, target ε − x0 and per-sample loss weights. The random draws
/// of every sample of `idx` are made in order, kept or not, so a slice's samples get the noise,
/// σ and caption dropout they get in the whole batch.
fn make_batch(
    cfg: &FluxConfig,
    tc: &TrainConfig,
    ds: &Dataset,
    idx: &[usize],
    keep: std::ops::Range<usize>,
    rng: &mut Rng,
) -> (FluxInputs, Vec<f32>, Vec<f32>) {
    let s0: &Sample = &ds.samples[idx[0]];
    let (h, w, n_txt) = (s0.h, s0.w, s0.n_txt);
    let c = cfg.in_channels / 4;
    let n_img = (h / 2) * (w / 2);
    let b = keep.len();
    let ids = img_ids(h, w);
    let mut inp = FluxInputs {
        b,
        n_img,
        n_txt,
        img: Vec::with_capacity(b * n_img * cfg.in_channels),
        img_ids: (0..b).flat_map(|_| ids.iter().copied()).collect(),
        txt: Vec::with_capacity(b * n_txt * cfg.context_in_dim),
        txt_ids: vec![0.0; b * n_txt * 3],
        y: Vec::with_capacity(b * cfg.vec_in_dim),
        timesteps: Vec::with_capacity(b),
        guidance: cfg.guidance_embed.then(|| vec![tc.guidance; b]),
    };
    let mut target = Vec::with_capacity(b * n_img * cfg.in_channels);
    let mut weights = Vec::with_capacity(b);
    for (pos, &i) in idx.iter().enumerate() {
        let s = &ds.samples[i];
        let noise = rng.normal_vec(s.latent.len(), 1.0);
        let sigma = sample_sigma(tc, n_img, rng);
        // Caption dropout: the sample trains unconditioned, its text states zeroed.
        let drop = tc.caption_dropout > 0.0 && (rng.uniform() as f32) < tc.caption_dropout;
        if !keep.contains(&pos) {
            continue;
        }
        let x0 = pack_latent(&s.latent, c, h, w);
        let (xt, tgt) = noisy_pair(&x0, &noise, sigma);
        inp.img.extend(xt);
        target.extend(tgt);
        inp.timesteps.push(sigma);
        weights.push(loss_weight(&tc.loss_weighting, sigma));
        inp.txt.extend(s.txt.iter().map(|&v| if drop { 0.0 } else { v }));
        inp.y.extend(s.y.iter().map(|&v| if drop { 0.0 } else { v }));
    }
    (inp, target, weights)
}

/// Slice `s` of `n` samples cut into `slices` (as even as can be; the first ones shorter).
fn slice_range(n: usize, s: usize, slices: usize) -> std::ops::Range<usize> {
    s * n / slices..(s + 1) * n / slices
}

/// One micro-batch of the run, this rank's share of it: the k-th batch of `batch_size × world`
/// samples cut into `world × batch_slices` slices, this rank's `batch_slices` of them run one
/// after another. Each slice's loss is its samples' mean, weighted by its share of the batch
/// (and its gradient scaled likewise), so the ranks' sum is the whole batch's mean. Returns this
/// rank's weighted loss.
/// `reduce`: this is the step's last micro-batch, so its last backward starts the gradients'
/// all-reduce bucket by bucket (`Engine::arm_reduce`; the trainer waits in `reduce_grads`).
#[allow(clippy::too_many_arguments)]
fn micro_step(
    engine: &mut Engine,
    tc: &TrainConfig,
    ds: &Dataset,
    (rank, world): (usize, usize),
    k: u64,
    salt: u64,
    gscale: f32,
    reduce: Option<&Comm>,
) -> Result<f64> {
    let idx = ds.batch(k, tc.batch_size * world, tc.seed ^ salt);
    let slices = world * tc.batch_slices;
    let mine = rank * tc.batch_slices..(rank + 1) * tc.batch_slices;
    let last = mine.clone().rev().find(|&s| !slice_range(idx.len(), s, slices).is_empty());
    let mut loss = 0.0;
    for s in mine {
        let keep = slice_range(idx.len(), s, slices);
        if keep.is_empty() {
            continue;
        }
        if let (Some(comm), true) = (reduce, Some(s) == last) {
            engine.arm_reduce(comm, tc.deterministic_reduce)?;
        }
        let share = keep.len() as f64 / idx.len() as f64;
        let mut rng = stream(tc.seed, k, salt);
        let (inp, target, wts) = make_batch(engine.cfg(), tc, ds, &idx, keep, &mut rng);
        let mut seed = stream(tc.seed, k, salt ^ 0xD80).next_u64();
        if slices > 1 {
            // Each slice its own dropout masks (they are drawn per row of a batch).
            seed ^= (s as u64 + 1).wrapping_mul(0x94D0_49BB_1331_11EB);
        }
        let dropout = (tc.dropout > 0.0).then_some((tc.dropout, seed));
        loss += share * engine.micro_step(&inp, &target, Some(&wts), gscale * share as f32, dropout)?;
    }
    Ok(loss)
}

/// The built-in demo's samples with the engine's current adapters.
fn demo_samples(engine: &mut Engine, ds: &Dataset) -> Result<Vec<Vec<f32>>> {
    let pick: Vec<&Sample> = ds.samples.iter().take(4).collect();
    let spec = SampleSpec {
        txt: pick.iter().map(|s| s.txt.clone()).collect(),
        y: pick.iter().map(|s| s.y.clone()).collect(),
        n_txt: pick[0].n_txt,
        h: pick[0].h,
        w: pick[0].w,
        steps: 20,
        guidance: 1.0,
        seed: 1,
    };
    sample(engine, &spec)
}

fn mean_distance(lats: &[Vec<f32>]) -> f32 {
    let (h, w) = (builtin::LATENT, builtin::LATENT);
    lats.iter().map(|l| builtin::style_distance(l, h, w)).sum::<f32>() / lats.len() as f32
}

fn sibling(out: &Path, suffix: &str) -> PathBuf {
    let stem = out.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "lora".into());
    out.with_file_name(format!("{stem}{suffix}"))
}

/// Fixed prompts sampled during training, decoded through the VAE to PNGs.
struct Previews {
    spec: SampleSpec,
    vae: crate::vae::AutoEncoder,
    /// The NSFW check every preview image passes (as `sample`'s), when on.
    nsfw: Option<crate::safety::NsfwClassifier>,
}

impl Previews {
    /// The previews of `tc`'s prompts, with the line to print about their NSFW check.
    fn new(pipe: &mut Pipeline, tc: &TrainConfig, cfg: &FluxConfig) -> Result<(Previews, String)> {
        let dir = (!tc.nsfw_model.is_empty()).then(|| Path::new(&tc.nsfw_model));
        let root = Path::new(&tc.model);
        let nsfw = crate::safety::NsfwSetting::open(dir, tc.nsfw_check, root.is_dir().then_some(root))
            .context("the NSFW check of the preview images")?;
        let (txt, y) = pipe.text()?.encode(&tc.sample_prompts)?;
        let vae = crate::pipeline::open_vae(&super::sources::components(tc), cfg)?;
        let side = if tc.sample_size > 0 {
            tc.sample_size
        } else {
            parse_sides(&tc.resolution)?.first().copied().unwrap_or(512)
        };
        let f = vae.factor();
        if !side.is_multiple_of(2 * f) {
            bail!("sample_size {side} must be a multiple of {}", 2 * f);
        }
        let n = tc.sample_prompts.len();
        let (lt, dt, dv) = (tc.t5_max_len, cfg.context_in_dim, cfg.vec_in_dim);
        let spec = SampleSpec {
            txt: (0..n).map(|i| txt[i * lt * dt..(i + 1) * lt * dt].to_vec()).collect(),
            y: (0..n).map(|i| y[i * dv..(i + 1) * dv].to_vec()).collect(),
            n_txt: lt,
            h: side / f,
            w: side / f,
            steps: tc.sample_steps,
            guidance: tc.sample_guidance,
            seed: tc.sample_seed,
        };
        Ok((Previews { spec, vae, nsfw: nsfw.classifier }, format!("previews: {}", nsfw.status)))
    }

    fn write(&self, engine: &mut Engine, dir: &Path, step: usize) -> Result<Vec<String>> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let lats = sample(engine, &self.spec)?;
        let f = self.vae.factor();
        let mut files = Vec::new();
        let (h, w) = (self.spec.h * f, self.spec.w * f);
        for (i, z) in lats.iter().enumerate() {
            let img = self.vae.decode(z, 1, self.spec.h, self.spec.w)?;
            let rgb = crate::io::images::rgb8_from_unit(&img, h, w);
            let verdict = match &self.nsfw {
                Some(c) => c.check(&rgb, w, h).with_context(|| format!("NSFW check of preview {i} at step {step}"))?,
                None => None,
            };
            let (p, rgb) = match &verdict {
                Some(_) => (dir.join(format!("step{step:06}-{i}-nsfw-filtered.png")), crate::safety::black_rgb8(w, h)),
                None => (dir.join(format!("step{step:06}-{i}.png")), rgb),
            };
            crate::io::images::write_rgb8_png(&p, rgb, h, w)?;
            files.push(match verdict {
                Some(why) => format!("{} ({why})", p.display()),
                None => p.display().to_string(),
            });
        }
        Ok(files)
    }
}

/// What a run prints and returns as its log: lines to stderr (through the progress bar when it
/// is drawn) unless quiet.
struct Log {
    lines: Vec<String>,
    quiet: bool,
}

impl Log {
    fn say(&mut self, s: String, pb: Option<&indicatif::ProgressBar>) {
        if !self.quiet {
            match pb {
                Some(p) if !p.is_hidden() => p.println(&s),
                _ => eprintln!("{s}"),
            }
        }
        self.lines.push(s);
    }

    /// A result a script would want (the file written, the demo's verdict): stdout, not stderr,
    /// so `train ... > result.txt` keeps it apart from the progress chatter.
    fn result(&mut self, s: String) {
        if !self.quiet {
            println!("{s}");
        }
        self.lines.push(s);
    }
}

/// A training run between its phases: opened (model, data, adapters, resumed state, engine),
/// stepped, finished (the LoRA written).
struct Run {
    tc: TrainConfig,
    model: Model,
    ds: Dataset,
    class: Option<Dataset>,
    previews: Option<Previews>,
    lc: LoraConfig,
    specs: Vec<AdapterSpec>,
    set: AdapterSet,
    /// DoRA written as kohya: each adapted module's frozen norm per output row, for a `dora_scale`
    /// that must cover rows no term updates (export::FrozenNorms).
    frozen_norms: BTreeMap<String, Vec<f32>>,
    opt: AdamW,
    start: usize,
    ckpt_dir: PathBuf,
    out: PathBuf,
    engine: Engine,
    log: Log,
    /// This process's place among the data-parallel ranks.
    ranks: Ranks,
    /// Held by rank 0 from the start to the end of the run: one run per `--out`.
    _lock: Option<OutputLock>,
}

/// The data-parallel ranks as the trainer sees them: this rank, how many, the control channel
/// (each step's loss and stop flag, in rank order) and the NCCL communicator of the gradients
/// (None for a single rank). Rank 0 alone writes files.
struct Ranks {
    rank: usize,
    world: usize,
    control: Option<Control>,
    comm: Option<Comm>,
}

impl Ranks {
    fn single() -> Ranks {
        Ranks { rank: 0, world: 1, control: None, comm: None }
    }

    fn writes(&self) -> bool {
        self.rank == 0
    }

    /// Every rank's (loss, prior loss, stop) summed in rank order; stop when any rank stops.
    fn agree(&mut self, loss: f64, prior: f64, stop: bool) -> Result<(f64, f64, bool)> {
        let mine = [loss, prior, if stop { 1.0 } else { 0.0 }];
        let all = match self.control.as_mut() {
            Some(c) => c.gather(&mine)?,
            None => return Ok((loss, prior, stop)),
        };
        let sum = |i: usize| all.chunks(3).fold(0.0, |a, c| a + c[i]);
        Ok((sum(0), sum(1), sum(2) > 0.0))
    }
}

/// A digest of f32 tensors (FNV-1a over their bits): the ranks compare their starting weights.
fn digest(tensors: &[&[f32]]) -> String {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for t in tensors {
        for x in t.iter() {
            for b in x.to_bits().to_le_bytes() {
                h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
            }
        }
    }
    format!("{h:016x}")
}

/// What every rank must share, as (key, value) pairs rank 0 compares: the binary, the settings
/// (paths left out: each node may mount the files elsewhere), the model, the adapters, the data
/// and the starting weights and optimizer state.
#[allow(clippy::too_many_arguments)]
fn rank_config(
    tc: &TrainConfig,
    model: &Model,
    ds: &Dataset,
    specs: &[AdapterSpec],
    set: &AdapterSet,
    opt: &AdamW,
    start: usize,
    device: &Device,
    nccl: &str,
) -> Result<Config> {
    let mut c: Config = vec![
        ("flux-kernels version".into(), env!("CARGO_PKG_VERSION").into()),
        ("NCCL".into(), nccl.into()),
        ("device".into(), device.name().into()),
        ("model".into(), format!("{:?}", model.cfg)),
        ("adapters".into(), layout(specs).join(", ")),
    ];
    const PATHS: &[&str] = &[
        "model",
        "data",
        "class_data",
        "out",
        "checkpoint_dir",
        "metrics",
        "cache_dir",
        "vae",
        "t5",
        "t5_tokenizer",
        "clip",
        "clip_tokenizer",
        "log_every",
    ];
    if let serde_json::Value::Object(m) = serde_json::to_value(tc)? {
        c.extend(m.into_iter().filter(|(k, _)| !PATHS.contains(&k.as_str())).map(|(k, v)| (k, v.to_string())));
    }
    let names: Vec<String> = ds.samples.iter().map(|s| format!("{} {}x{}x{}", s.name, s.h, s.w, s.n_txt)).collect();
    let data: Vec<f32> = ds.samples.iter().flat_map(|s| s.latent.iter().take(64).copied()).collect();
    c.push(("data".into(), format!("{} samples, {:?}, digest {}", ds.len(), names.first(), digest(&[&data]))));
    let params: Vec<&[f32]> = set.params().map(|p| p.as_slice()).collect();
    let moments: Vec<&[f32]> = opt.m.iter().chain(&opt.v).map(|v| v.as_slice()).collect();
    c.push((
        "start".into(),
        format!("step {start}, weights {}, AdamW {} t {}", digest(&params), digest(&moments), opt.t),
    ));
    Ok(c)
}

/// Where the step loop ended.
struct Ended {
    step: usize,
    interrupted: bool,
    last_loss: f64,
    secs: f64,
}

impl Run {
    /// Everything before the first step. `resume`: a checkpoint folder whose config is the base.
    fn open(tc: TrainConfig, resume: Option<&Path>, quiet: bool, env: Option<&RankEnv>) -> Result<Run> {
        let writes = env.is_none_or(|e| e.rank == 0);
        let mut log = Log { lines: Vec::new(), quiet: quiet || !writes };
        let out = PathBuf::from(&tc.out);
        let ckpt_dir = PathBuf::from(tc.checkpoint_path());
        // Before anything is read or written: a second run on this output stops here. Only rank
        // 0 writes, so only it holds the lock and clears a killed run's temp files.
        let mut lock = None;
        let mut stale = Vec::new();
        if writes {
            let taken = OutputLock::take(&out)?;
            if let Some(n) = taken.note {
                log.say(format!("note: {n}"), None);
            }
            lock = Some(taken.lock);
            stale = remove_stale_run_temps(&tc, &out, &ckpt_dir)?;
        }
        if !stale.is_empty() {
            let names: Vec<String> = stale.iter().map(|p| p.display().to_string()).collect();
            log.say(
                format!("note: removed {} temp files left by a killed run: {}", names.len(), names.join(", ")),
                None,
            );
        }
        let (model, weights) = open_model(&tc)?;
        let mut pipe = Pipeline::new(&tc, &model.cfg);
        let ds =
            if tc.builtin_data() { builtin::synthetic_dataset(&model.cfg)? } else { pipe.dataset(&tc.data, quiet)? };
        let class = if tc.class_data.is_empty() {
            None
        } else {
            Some(pipe.dataset(&tc.class_data, quiet).context("class_data")?)
        };
        let previews = if tc.sample_every > 0 && !tc.sample_prompts.is_empty() && writes {
            let (p, line) = Previews::new(&mut pipe, &tc, &model.cfg)?;
            log.say(line, None);
            Some(p)
        } else {
            None
        };
        let lc = lora_config(&tc)?;
        let mut rng = stream(tc.seed, u64::MAX, 0x1417);
        let AdapterInit { specs, mut set } = init_adapters(&model.cfg, &lc, &mut rng, Some(&weights))?;
        // Only a kohya file needs them (its dora_scale covers whole BFL modules): each weight is
        // read once more here, not for a PEFT file.
        let mut frozen_norms = BTreeMap::new();
        let kohya = matches!(tc.format.parse()?, LoraFormatOut::Kohya);
        for t in set.terms().iter().filter(|t| kohya && matches!(t.kind, Kind::Dora { .. })) {
            if !frozen_norms.contains_key(&t.module) {
                let lin = weights.linear(&t.module).ok_or_else(|| anyhow::anyhow!("no linear `{}`", t.module))?;
                frozen_norms.insert(t.module.clone(), frozen_row_norms(&lin.weight.load()?, lin.d_in));
            }
        }
        let sizes: Vec<usize> = set.params().map(|p| p.len()).collect();
        let mut opt = AdamW::new(&sizes, tc.adam_beta1, tc.adam_beta2, tc.adam_eps, tc.weight_decay);
        let mut start = 0;
        if let Some(dir) = resume {
            let st = checkpoint::load(dir)?;
            if st.layout != layout(&specs) {
                bail!(
                    "{}: the checkpoint's adapters differ from this config's (targets or ranks changed)",
                    dir.display()
                );
            }
            if st.params.iter().map(|p| p.len()).collect::<Vec<_>>() != sizes {
                bail!("{}: checkpoint tensor sizes differ from this config's adapters", dir.display());
            }
            set.set_params(st.params)?;
            opt = st.opt;
            start = st.step;
            if start >= tc.steps {
                bail!(
                    "{}: the checkpoint is at step {start}, and steps = {}; raise --steps to go on",
                    dir.display(),
                    tc.steps
                );
            }
        }

        let (device, device_note) = train_device(&tc)?;
        let ranks = match env.filter(|e| e.world > 1) {
            Some(e) => {
                let cfg = |nccl: &str| rank_config(&tc, &model, &ds, &specs, &set, &opt, start, &device, nccl);
                let Joined { control, comm } = dist::join(e, cfg)?;
                let lib = comm.library();
                let r = Ranks { rank: e.rank, world: e.world, control: Some(control), comm: Some(comm) };
                let line = format!(
                    "data parallel: {} ranks over {lib}; each micro-batch is {} × {} samples",
                    e.world, e.world, tc.batch_size
                );
                log.say(line, None);
                r
            }
            None => Ranks::single(),
        };
        let opts = EngineOptions {
            base: BaseDtype::parse(&tc.base)?,
            checkpointing: tc.gradient_checkpointing,
            blocks_to_swap: tc.blocks_to_swap,
            offload_checkpoints: tc.offload_checkpoints,
        };
        let engine = Engine::new(&device, &model.cfg, weights, opts)?;
        if let Some(n) = device_note {
            log.say(format!("--device auto: {n}"), None);
        }
        if let Some(g) = engine.cuda() {
            let bytes = g.m.w.device_bytes();
            let swap = match &g.m.w.swap {
                Some(s) => {
                    let (n, nd) = s.swapped();
                    format!(
                        "; block swap: {n} blocks ({nd} double + {} single) in pinned host memory ({:.2} GiB), \
                         streamed through device slots ({:.2} GiB, counted above)",
                        n - nd,
                        crate::plan::gib(s.host_bytes()),
                        crate::plan::gib(s.slot_bytes())
                    )
                }
                None => String::new(),
            };
            log.say(
                format!(
                    "GPU: the whole step on the device; base weights {} ({:.2} GiB on the device), activation \
                     checkpointing {}{swap}",
                    tc.base,
                    crate::plan::gib(bytes),
                    match (tc.gradient_checkpointing, tc.offload_checkpoints) {
                        (true, true) => "on, the block inputs offloaded to pinned host memory",
                        (true, false) => "on",
                        _ => "off",
                    }
                ),
                None,
            );
        }
        let n_train: usize = specs.iter().map(|s| s.param_count()).sum();
        log.say(
            format!(
                "model: {}; data: {} samples{}; {} adapters, {} trainable parameters; {} steps from step {start}",
                model.name,
                ds.len(),
                class.as_ref().map_or(String::new(), |c| format!(
                    " + {} class samples (λ = {})",
                    c.len(),
                    tc.prior_weight
                )),
                specs.len(),
                crate::util::thousands(n_train),
                tc.steps
            ),
            None,
        );
        Ok(Run {
            tc,
            model,
            ds,
            class,
            previews,
            lc,
            specs,
            set,
            frozen_norms,
            opt,
            start,
            ckpt_dir,
            out,
            engine,
            log,
            ranks,
            _lock: lock,
        })
    }

    /// The built-in demo's samples with the engine's current adapters, written next to the
    /// output as `<stem><suffix>`; returns their mean distance to the style colour.
    fn demo_preview(&mut self, suffix: &str) -> Result<f32> {
        let lats = demo_samples(&mut self.engine, &self.ds)?;
        let (h, w) = (builtin::LATENT, builtin::LATENT);
        crate::sample::preview::write_preview(&sibling(&self.out, suffix), &lats, h, w, 8)?;
        Ok(mean_distance(&lats))
    }

    /// The optimizer steps from `start` until `steps` or an interrupt: micro-batches, the loss
    /// check, AdamW, metrics, log lines, previews and checkpoints.
    fn steps(&mut self, interrupt: &AtomicBool) -> Result<Ended> {
        let tc = &self.tc;
        let at = (self.ranks.rank, self.ranks.world);
        let writes = self.ranks.writes();
        let mut metrics = if tc.metrics.is_empty() || !writes {
            None
        } else {
            let (file, dropped) = open_metrics(Path::new(&tc.metrics), self.start)?;
            if dropped > 0 {
                let line = format!(
                    "metrics: {} lines after step {} dropped from {} (this run writes them again)",
                    dropped, self.start, tc.metrics
                );
                self.log.say(line, None);
            }
            Some(file)
        };
        let pb = if self.log.quiet {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(tc.steps as u64)
        };
        pb.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{per_sec}, ETA {eta}]")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.set_position(self.start as u64);
        let log_every = if tc.log_every > 0 { tc.log_every } else { (tc.steps / 20).max(1) };
        let t0 = Instant::now();
        let mut ema: Option<f64> = None;
        let mut last_loss = f64::NAN;
        let mut interrupted = false;
        let mut step = self.start;
        while step < tc.steps {
            let gscale = 1.0 / tc.grad_accum as f32;
            let (mut loss, mut prior) = (0.0, 0.0);
            self.engine.zero_grads()?;
            for j in 0..tc.grad_accum {
                let k = (step * tc.grad_accum + j) as u64;
                // The step's last backward starts the all-reduce (the prior's when it has one).
                let comm = self.ranks.comm.as_ref().filter(|_| j + 1 == tc.grad_accum);
                let (data_reduce, class_reduce) = if self.class.is_some() { (None, comm) } else { (comm, None) };
                loss +=
                    micro_step(&mut self.engine, tc, &self.ds, at, k, 0, gscale, data_reduce)? / tc.grad_accum as f64;
                if let Some(cds) = &self.class {
                    let l =
                        micro_step(&mut self.engine, tc, cds, at, k, 0xC1A55, gscale * tc.prior_weight, class_reduce)?;
                    prior += l / tc.grad_accum as f64;
                }
            }
            // The ranks' shares add up to the batch's loss; a Ctrl-C seen by any rank stops all
            // of them after this step, so they checkpoint the same step.
            let (loss, prior, stop) = self.ranks.agree(loss, prior, interrupt.load(Ordering::SeqCst))?;
            if let Some(comm) = &self.ranks.comm {
                self.engine.reduce_grads(comm, tc.deterministic_reduce, dist_timeout())?;
                if step == self.start && self.ranks.writes() {
                    if let Some(line) = self.engine.reduce_summary() {
                        self.log.say(line, None);
                    }
                }
            }
            let total = loss + tc.prior_weight as f64 * prior;
            if !total.is_finite() {
                pb.abandon();
                let kept = if self.ckpt_dir.join("state.safetensors").exists() {
                    format!("the last good checkpoint is {}", self.ckpt_dir.display())
                } else {
                    "no checkpoint was written".into()
                };
                bail!(
                    "step {}: the loss is not finite ({total}); stopping without writing the LoRA ({kept})",
                    step + 1
                );
            }
            let lr = lr_at(&tc.lr_schedule, tc.lr, step, tc.warmup_steps, tc.steps);
            let gnorm = self.engine.optimizer_step(&mut self.opt, lr, tc.max_grad_norm)?;
            step += 1;
            last_loss = total;
            let e = ema.map_or(total, |e| 0.9 * e + 0.1 * total);
            ema = Some(e);
            pb.set_position(step as u64);
            pb.set_message(format!("loss {e:.4} lr {lr:.2e}"));
            if let Some(f) = metrics.as_mut() {
                let mut j = serde_json::json!({"step": step, "loss": loss, "lr": lr, "grad_norm": gnorm});
                if self.class.is_some() {
                    j["prior_loss"] = prior.into();
                }
                // One whole line per write on an append-only file: a line is never split, even
                // with another writer on the same file.
                f.write_all(format!("{j}\n").as_bytes())
                    .and_then(|_| f.flush())
                    .with_context(|| format!("cannot write {}", tc.metrics))?;
            }
            if step.is_multiple_of(log_every) || step == tc.steps {
                let pl = if self.class.is_some() { format!(" prior {prior:.4}") } else { String::new() };
                let line =
                    format!("step {step}/{} loss {loss:.4}{pl} (ema {e:.4}) lr {lr:.2e} |g| {gnorm:.3}", tc.steps);
                self.log.say(line, Some(&pb));
            }
            let preview_now = writes && (step.is_multiple_of(tc.sample_every) || step == tc.steps);
            if let Some(p) = self.previews.as_ref().filter(|_| preview_now) {
                let files = p.write(&mut self.engine, &sibling(&self.out, "-samples"), step)?;
                self.log.say(format!("step {step}: samples {}", files.join(", ")), Some(&pb));
            }
            let checkpoint_now = tc.checkpoint_every > 0 && step.is_multiple_of(tc.checkpoint_every);
            if writes && (checkpoint_now || stop) {
                let params = self.engine.trainable_to_host(&mut self.opt)?;
                let state =
                    State { step, params, opt: self.opt.clone(), config: tc.clone(), layout: layout(&self.specs) };
                checkpoint::save(&self.ckpt_dir, &state)?;
            }
            if stop {
                let line = format!(
                    "interrupted: checkpoint at step {step} in {} (resume with --resume)",
                    self.ckpt_dir.display()
                );
                self.log.say(line, Some(&pb));
                interrupted = true;
                break;
            }
        }
        pb.finish_and_clear();
        Ok(Ended { step, interrupted, last_loss, secs: t0.elapsed().as_secs_f64() })
    }

    /// After the last step: the trained factors back from the engine, the GPU's memory report,
    /// and the LoRA file with its metadata.
    fn finish(&mut self, end: &Ended) -> Result<()> {
        let tc = &self.tc;
        if !self.ranks.writes() {
            return Ok(());
        }
        self.set.set_params(self.engine.trainable_to_host(&mut self.opt)?)?;
        if let Some(g) = self.engine.cuda() {
            g.m.synchronize()?;
            let gib = crate::plan::gib;
            let pool = g.m.pool_peak().map_or("unknown (no memory pool)".into(), |b| format!("{:.2} GiB", gib(b)));
            let line = format!(
                "GPU memory: peak allocated {pool} (the CUDA context and cuBLAS workspace come on top); \
                 {:.2} GiB in use at the fullest block boundary",
                gib(g.m.peak_used)
            );
            self.log.say(line, None);
        }
        let done = end.step - self.start;
        let line = format!("{done} steps in {:.1} s ({:.2} it/s)", end.secs, done as f64 / end.secs.max(1e-9));
        self.log.say(line, None);

        let mut meta = BTreeMap::from([
            ("flux_kernels.config".to_string(), serde_json::to_string(tc)?),
            ("flux_kernels.base_model".to_string(), self.model.name.clone()),
            ("flux_kernels.steps".to_string(), end.step.to_string()),
            ("flux_kernels.dataset_size".to_string(), self.ds.len().to_string()),
            ("flux_kernels.rank".to_string(), tc.rank.to_string()),
            ("flux_kernels.alpha".to_string(), self.lc.alpha.to_string()),
            ("flux_kernels.targets".to_string(), tc.targets.clone()),
            ("flux_kernels.adapter".to_string(), tc.adapter.clone()),
        ]);
        if end.interrupted {
            meta.insert("flux_kernels.interrupted".into(), "true".into());
        }
        let format: LoraFormatOut = tc.format.parse()?;
        let dtype = match tc.save_dtype.as_str() {
            "f32" => Dtype::F32,
            "f16" => Dtype::F16,
            _ => Dtype::BF16,
        };
        let norms = |m: &str| self.frozen_norms.get(m).cloned().ok_or_else(|| anyhow::anyhow!("no DoRA term on `{m}`"));
        let size = write_lora(&self.out, &self.model.cfg, self.set.terms(), format, dtype, meta, Some(&norms))?;
        let line = format!(
            "wrote {} ({} bytes, {format:?} format)",
            self.out.display(),
            crate::util::thousands(size as usize)
        );
        self.log.result(line);
        Ok(())
    }
}

/// Where the run trains: `--device` as parsed, except that LoKr trains on the CPU reference only
/// so far (the CUDA engine runs LoRA and DoRA terms): `auto` then picks the CPU with a note, and
/// `cuda` was refused by `TrainConfig::validate`.
fn train_device(tc: &TrainConfig) -> Result<(Device, Option<String>)> {
    if tc.adapter == "lokr" {
        let note =
            (tc.device != "cpu").then(|| "using the CPU (LoKr training runs on the CPU path for now)".to_string());
        return Ok((Device::Cpu, note));
    }
    Device::parse(&tc.device)
}

/// Temp files of this run's outputs left by a killed run (the LoRA and the demo's previews
/// beside `out`, the checkpoint folder, the samples folder, the metrics file); removed.
fn remove_stale_run_temps(tc: &TrainConfig, out: &Path, ckpt_dir: &Path) -> Result<Vec<PathBuf>> {
    let here = |p: &Path| p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let (out_name, stem) = (name(out), name(&sibling(out, "")));
    let mut removed = remove_stale_temps(&here(out), |o| o == out_name || o.starts_with(&format!("{stem}-")))?;
    removed.extend(remove_stale_temps(ckpt_dir, |_| true)?);
    removed.extend(remove_stale_temps(&sibling(out, "-samples"), |_| true)?);
    if !tc.metrics.is_empty() {
        let m = Path::new(&tc.metrics);
        let m_name = name(m);
        removed.extend(remove_stale_temps(&here(m), |o| o == m_name)?);
    }
    Ok(removed)
}

/// The metrics file for a run starting at step `start`: what it holds of steps after `start`
/// (an earlier run's, or a resumed run's own lines past its checkpoint) is dropped, so that no
/// step appears twice, and it is opened for appending. Returns the file and the lines dropped.
fn open_metrics(path: &Path, start: usize) -> Result<(std::fs::File, usize)> {
    output_folder(path)?;
    let mut dropped = 0;
    if let Ok(text) = std::fs::read(path) {
        #[derive(serde::Deserialize)]
        struct Line {
            step: usize,
        }
        let mut kept = Vec::new();
        // Whole lines only: a line without its newline was being written when a run was killed.
        for line in text.split_inclusive(|&b| b == b'\n') {
            match serde_json::from_slice::<Line>(line) {
                Ok(l) if l.step <= start && line.ends_with(b"\n") => kept.extend_from_slice(line),
                _ => dropped += 1,
            }
        }
        if kept.len() != text.len() {
            atomic_write(path, |w| w.write_all(&kept))?;
        }
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open the metrics file {}", path.display()))?;
    Ok((file, dropped))
}

/// Runs (or resumes) a training run. `resume`: a checkpoint folder whose config is the base.
pub fn train(tc: TrainConfig, resume: Option<&Path>, interrupt: Arc<AtomicBool>, quiet: bool) -> Result<Outcome> {
    train_ranked(tc, resume, interrupt, quiet, None)
}

/// `train` as one of several data-parallel ranks (`env`; None: the only one). Every rank runs
/// this; rank 0 alone writes the LoRA, checkpoints, metrics and previews.
pub fn train_ranked(
    tc: TrainConfig,
    resume: Option<&Path>,
    interrupt: Arc<AtomicBool>,
    quiet: bool,
    env: Option<&RankEnv>,
) -> Result<Outcome> {
    tc.validate()?;
    let writes = env.is_none_or(|e| e.rank == 0);
    let builtin_demo = tc.model.is_empty() && tc.builtin_data() && writes;
    let mut run = Run::open(tc, resume, quiet, env)?;
    let mut demo_before = None;
    if builtin_demo && run.start == 0 {
        let data: Vec<Vec<f32>> = run.ds.samples.iter().take(4).map(|s| s.latent.clone()).collect();
        crate::sample::preview::write_preview(
            &sibling(&run.out, "-data.png"),
            &data,
            builtin::LATENT,
            builtin::LATENT,
            8,
        )?;
        // The base model alone: the adapters are attached after.
        let d = run.demo_preview("-before.png")?;
        demo_before = Some(d);
        run.log.say(format!("before training: samples' colour is {d:.3} from the style colour (RGB distance)"), None);
    }
    run.engine.train_adapters(&run.set, Some(&run.opt))?;
    let end = match run.steps(&interrupt) {
        Ok(end) => end,
        Err(e) => {
            // Peers may be gone or waiting: NCCL wants an abort here, not a destroy.
            if let Some(c) = &run.ranks.comm {
                c.mark_failed();
            }
            return Err(e);
        }
    };
    run.finish(&end)?;

    let mut demo = None;
    if let (Some(before), false) = (demo_before, end.interrupted) {
        let after = run.demo_preview("-after.png")?;
        let line = format!(
            "after training: samples' colour is {after:.3} from the style colour (before: {before:.3}); \
             previews: {} (training data), {} and {}",
            sibling(&run.out, "-data.png").display(),
            sibling(&run.out, "-before.png").display(),
            sibling(&run.out, "-after.png").display()
        );
        run.log.result(line);
        demo = Some((before, after));
    }
    let Run { out, log, .. } = run;
    Ok(Outcome {
        steps_done: end.step,
        interrupted: end.interrupted,
        lora_path: writes.then_some(out),
        final_loss: end.last_loss,
        demo,
        log: log.lines,
    })
}
