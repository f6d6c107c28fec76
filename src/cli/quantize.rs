//! `flux-kernels quantize`: a bf16/f16/f32 transformer to 8 bits, tensor by tensor from the
//! memory map, written atomically under the input's own keys. Which tensors are quantised and
//! why: `quant::quantised_by_default`.

use super::args::RopeArgs;
use crate::io::safetensors::{remove_stale_temps, write_streamed, Dtype, SafeTensors};
use crate::model::checkpoint::{Checkpoint, Layout};
use crate::model::config::parse_rope_axes;
use crate::quant::load::{is_ignored_companion, scale_keys};
use crate::quant::{quantised_by_default, quantize_tensor, Code, Granularity, Scale, Scheme, METADATA_KEY};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One output tensor: copied from the input, or the codes or scale of a quantised weight.
enum Job {
    Copy { file: usize, key: String },
    Codes { file: usize, key: String },
    Scale,
}

struct Entry {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    job: Job,
}

#[derive(Default)]
struct Tally {
    quantised: usize,
    quantised_params: usize,
    bytes_before: usize,
    bytes_after: usize,
    kept: usize,
    kept_bytes: usize,
}

fn refuse_quantised(files: &[SafeTensors]) -> Result<()> {
    for f in files {
        if let Some(s) = f.metadata().get(METADATA_KEY) {
            bail!(
                "{} is already quantised ({METADATA_KEY} = {s}); quantise the bf16/f16/f32 original",
                f.path().display()
            );
        }
        for (k, info) in f.tensors() {
            let scale = k.ends_with(".weight_scale") || k.ends_with(".scale_weight");
            if Code::from_dtype(info.dtype).is_some() || is_ignored_companion(k) || scale {
                bail!(
                    "{} is already quantised (tensor `{k}` is {}); quantise the bf16/f16/f32 original",
                    f.path().display(),
                    info.dtype.name()
                );
            }
        }
    }
    Ok(())
}

/// `out` names the input itself (or, for a folder, the input folder).
fn same_path(a: &Path, b: &Path) -> bool {
    let canon = |p: &Path| -> Option<PathBuf> {
        if let Ok(c) = p.canonicalize() {
            return Some(c);
        }
        let parent = p.parent().filter(|q| !q.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Some(parent.canonicalize().ok()?.join(p.file_name()?))
    };
    matches!((canon(a), canon(b)), (Some(x), Some(y)) if x == y)
}

fn plan(ckpt: &Checkpoint, scheme: Scheme, tally: &mut Tally) -> Vec<Entry> {
    let mut entries = Vec::new();
    for (fi, f) in ckpt.files.iter().enumerate() {
        for (key, info) in f.tensors() {
            let before = info.end - info.begin;
            if !quantised_by_default(key, &info.shape) {
                tally.kept += 1;
                tally.kept_bytes += before;
                let job = Job::Copy { file: fi, key: key.clone() };
                entries.push(Entry { name: key.clone(), dtype: info.dtype, shape: info.shape.clone(), job });
                continue;
            }
            tally.quantised += 1;
            tally.quantised_params += info.numel();
            tally.bytes_before += before;
            tally.bytes_after += info.numel();
            let job = Job::Codes { file: fi, key: key.clone() };
            entries.push(Entry { name: key.clone(), dtype: scheme.code.dtype(), shape: info.shape.clone(), job });
            let scale_shape = match scheme.scale {
                Granularity::None => continue,
                Granularity::PerTensor => vec![],
                Granularity::PerChannel => vec![info.shape[0]],
            };
            tally.bytes_after += 4 * scale_shape.iter().product::<usize>();
            let name = scale_keys(key)[0].clone();
            entries.push(Entry { name, dtype: Dtype::F32, shape: scale_shape, job: Job::Scale });
        }
    }
    entries
}

fn write_file(ckpt: &Checkpoint, scheme: Scheme, entries: &[Entry], out: &Path) -> Result<()> {
    let mut meta: BTreeMap<String, String> = ckpt.files[0].metadata().clone();
    meta.insert(METADATA_KEY.into(), scheme.name().into());
    let list: Vec<(&str, Dtype, &[usize])> =
        entries.iter().map(|e| (e.name.as_str(), e.dtype, e.shape.as_slice())).collect();
    // A weight's scale is the entry right after its codes.
    let mut pending: Option<Vec<u8>> = None;
    write_streamed(out, &list, &meta, |i| {
        let e = &entries[i];
        match &e.job {
            Job::Copy { file, key } => Ok(ckpt.files[*file].bytes(key)?.to_vec()),
            Job::Codes { file, key } => {
                let f = &ckpt.files[*file];
                let (rows, cols) = (e.shape[0], e.shape[1]);
                let qz = quantize_tensor(scheme, rows, cols, &|r, buf| f.read_rows_f32(key, r, buf))
                    .with_context(|| format!("{}: tensor `{key}`", f.path().display()))?;
                pending = match qz.scale {
                    Scale::None => None,
                    Scale::Tensor(s) => Some(s.to_le_bytes().to_vec()),
                    Scale::Rows(v) => Some(v.iter().flat_map(|s| s.to_le_bytes()).collect()),
                };
                Ok(qz.q)
            }
            Job::Scale => pending.take().with_context(|| format!("scale `{}` has no weight before it", e.name)),
        }
    })
    .with_context(|| format!("cannot write {}", out.display()))
}

/// A diffusers folder: config.json and one safetensors file, built in a temp folder beside
/// `out` and renamed into place, so a failure leaves neither.
fn write_folder(ckpt: &Checkpoint, scheme: Scheme, entries: &[Entry], out: &Path) -> Result<()> {
    if std::fs::symlink_metadata(out).is_ok() {
        bail!("{} already exists; remove it or choose another --out folder", out.display());
    }
    if out.extension().is_some_and(|e| e == "safetensors") {
        bail!(
            "--out {}: a diffusers model quantises to a folder (config.json + weights), and this name \
             reads as a file; give a folder name without .safetensors",
            out.display()
        );
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("cannot create the output folder {}", parent.display()))?;
    let name = out.file_name().with_context(|| format!("--out {}: not a folder path", out.display()))?;
    let tmp = parent.join(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = (|| -> Result<()> {
        let cfg = ckpt.path.join("config.json");
        std::fs::copy(&cfg, tmp.join("config.json")).with_context(|| format!("cannot copy {}", cfg.display()))?;
        write_file(ckpt, scheme, entries, &tmp.join("diffusion_pytorch_model.safetensors"))?;
        std::fs::rename(&tmp, out).with_context(|| format!("cannot rename {} to {}", tmp.display(), out.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn human(b: usize) -> String {
    let (unit, div) = match b {
        b if b >= 1 << 30 => ("GiB", 1u64 << 30),
        b if b >= 1 << 20 => ("MiB", 1 << 20),
        _ => ("KiB", 1 << 10),
    };
    format!("{:.2} {unit}", b as f64 / div as f64)
}

#[derive(clap::Args)]
pub struct Args {
    /// A bf16/f16/f32 transformer: BFL file or diffusers folder.
    #[arg(long)]
    pub model: String,
    /// Output: a .safetensors file for a BFL input, a new folder for a diffusers one.
    #[arg(long)]
    pub out: PathBuf,
    /// int8 (per-output-channel scales), fp8 (plain e4m3 cast, as flux1-dev-fp8 files),
    /// fp8-scaled (e4m3, one scale per tensor) or fp8-channel (e4m3, per-channel scales).
    #[arg(long, value_name = "int8|fp8|fp8-scaled|fp8-channel")]
    pub format: String,
    #[command(flatten)]
    pub rope: RopeArgs,
}

pub fn main(a: Args) -> Result<()> {
    println!("{}", run(&a.model, &a.out, &a.format, a.rope.rope_axes.as_deref())?);
    Ok(())
}

/// Quantises `model` into `out`; returns the report lines.
pub fn run(model: &str, out: &Path, format: &str, rope_axes: Option<&str>) -> Result<String> {
    let scheme = Scheme::parse_format(format)?;
    let input = Path::new(model);
    if !input.exists() {
        bail!("--model {model}: no such file or folder (quantize needs a checkpoint, not a configuration name)");
    }
    let axes = rope_axes.map(parse_rope_axes).transpose()?;
    // Opening validates every tensor and infers the architecture before anything is written.
    let ckpt = Checkpoint::open(input, axes)?;
    refuse_quantised(&ckpt.files)?;
    if same_path(input, out) || same_path(&ckpt.path, out) || ckpt.files.iter().any(|f| same_path(f.path(), out)) {
        bail!("--out {} is the input model; write the quantised copy elsewhere", out.display());
    }
    // Temp files (or folders) of this output left by a killed quantize.
    let out_name = out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let out_dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let stale = remove_stale_temps(out_dir, |o| o == out_name)?;
    let mut tally = Tally::default();
    let entries = plan(&ckpt, scheme, &mut tally);
    match ckpt.layout {
        Layout::Bfl { .. } => write_file(&ckpt, scheme, &entries, out)?,
        Layout::Diffusers => write_folder(&ckpt, scheme, &entries, out)?,
    }
    let t = &tally;
    let mut lines: Vec<String> =
        stale.iter().map(|p| format!("note: removed {}, left by a killed run", p.display())).collect();
    lines.extend([
        format!("format: {} ({METADATA_KEY} = {})", format, scheme.name()),
        format!(
            "quantised: {} block linear weights, {} params, {} → {} ({} codes{})",
            t.quantised,
            crate::util::thousands(t.quantised_params),
            human(t.bytes_before),
            human(t.bytes_after),
            scheme.code.dtype().name(),
            if scheme.scale == Granularity::None { "" } else { " + f32 scales" }
        ),
        format!("kept as stored: {} tensors (biases, norms, embedders, final layer), {}", t.kept, human(t.kept_bytes)),
        format!(
            "total tensor bytes: {} → {}; wrote {}",
            human(t.bytes_before + t.kept_bytes),
            human(t.bytes_after + t.kept_bytes),
            out.display()
        ),
    ]);
    Ok(lines.join("\n"))
}
