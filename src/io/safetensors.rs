//! Memory-mapped safetensors files, validated before any tensor is touched.
//!
//! The header is validated by the `safetensors` crate before any tensor is touched; every
//! failure names the file and, where one is to blame, the tensor: a truncated file, offsets that
//! run past the end, overlap or leave gaps, a size that does not match dtype × shape, a key
//! given twice, or a dtype we cannot compute with.

use super::{reject_repeated_keys, short};
use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Element types found in safetensors files. Only the float ones can be read as f32; the rest
/// are recognised so the error can say what the tensor actually is. `I8` is read only as the
/// codes of an 8-bit weight, beside its scale (`quant`), never as numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    /// FP8 e4m3 "fn" (no infinities), as `t5xxl_fp8_e4m3fn.safetensors` and `flux1-dev-fp8` store it.
    F8E4M3,
    /// Codes of an int8-quantised weight (meaningful only with its `.weight_scale`).
    I8,
    Other(&'static str, usize),
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F64 => 8,
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::F8E4M3 | Dtype::I8 => 1,
            Dtype::Other(_, n) => n,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F64 => "F64",
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::I8 => "I8",
            Dtype::Other(n, _) => n,
        }
    }

    /// Whether a value of this type is a number by itself (not a code needing a scale).
    pub fn is_float(self) -> bool {
        !matches!(self, Dtype::Other(..) | Dtype::I8)
    }
}

/// One tensor's place in a mapped file.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range inside the data section (after the header).
    pub begin: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A memory-mapped, validated safetensors file. Cheap to clone.
#[derive(Clone)]
pub struct SafeTensors {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

/// Headers of real checkpoints are well under a megabyte; anything near this is a corrupt length.
/// The `safetensors` crate's own limit.
const MAX_HEADER: u64 = 100_000_000;

/// More tensors than any file this program reads holds by far (FLUX.1-dev: 780; a ComfyUI
/// bundle with its text encoders and VAE: about 2,000; T5-XXL: 219).
const MAX_TENSORS: usize = 200_000;

impl SafeTensors {
    pub fn open(path: &Path) -> Result<SafeTensors> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the map is read-only; a file truncated under us by another process can still
        // fault, which is the accepted contract of every mmap-based checkpoint loader.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot memory-map {}", path.display()))?;
        let (data_start, tensors, metadata) =
            parse_header(&mmap).with_context(|| format!("{}: invalid safetensors file", path.display()))?;
        Ok(SafeTensors { inner: Arc::new(Inner { path: path.to_path_buf(), mmap, data_start, tensors, metadata }) })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.inner.tensors
    }

    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.inner.metadata
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.inner.tensors.get(name)
    }

    pub fn file_size(&self) -> usize {
        self.inner.mmap.len()
    }

    /// Raw bytes of a tensor (little-endian, as stored).
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.info(name).with_context(|| format!("{}: no tensor `{name}`", self.path().display()))?;
        let s = self.inner.data_start;
        Ok(&self.inner.mmap[s + info.begin..s + info.end])
    }

    /// A tensor converted to f32, with its shape.
    pub fn read_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self.info(name).with_context(|| format!("{}: no tensor `{name}`", self.path().display()))?;
        require_float(info.dtype).with_context(|| format!("{}: tensor `{name}`", self.path().display()))?;
        let mut out = vec![0f32; info.numel()];
        convert_to_f32(info.dtype, self.bytes(name)?, &mut out)
            .with_context(|| format!("{}: tensor `{name}`", self.path().display()))?;
        Ok((info.shape.clone(), out))
    }

    /// Rows `rows` (along dim 0) of a tensor converted to f32 and written into `out`.
    pub fn read_rows_f32(&self, name: &str, rows: std::ops::Range<usize>, out: &mut [f32]) -> Result<()> {
        let at = || format!("{}: tensor `{name}`", self.path().display());
        let info = self.info(name).with_context(|| format!("{}: no tensor `{name}`", self.path().display()))?;
        let row_elems: usize = info.shape.iter().skip(1).product();
        let bytes = self.bytes(name)?;
        let sz = info.dtype.size();
        let span = rows
            .start
            .checked_mul(row_elems * sz)
            .zip(rows.end.checked_mul(row_elems * sz))
            .and_then(|(a, b)| bytes.get(a..b));
        let Some(span) = span.filter(|_| info.shape.first().is_some_and(|&n| rows.end <= n)) else {
            bail!("{}: rows {rows:?} are not inside shape {:?}", at(), info.shape);
        };
        convert_to_f32(info.dtype, span, out).with_context(at)
    }
}

/// Decodes stored values of a float dtype into `out` (as many as it holds). An integer dtype is
/// refused: I8 codes mean a number only with their scale, which this does not have (an 8-bit
/// weight is read through `quant`).
pub fn convert_to_f32(dtype: Dtype, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    require_float(dtype)?;
    let sz = dtype.size();
    if bytes.len() != out.len() * sz {
        bail!("{} bytes of {} for {} values", bytes.len(), dtype.name(), out.len());
    }
    // Byte-wise decoding: the mapped data has no alignment guarantee.
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .zip(out.iter_mut())
            .for_each(|(b, o)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .zip(out.iter_mut())
            .for_each(|(b, o)| *o = half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .zip(out.iter_mut())
            .for_each(|(b, o)| *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .zip(out.iter_mut())
            .for_each(|(b, o)| *o = f64::from_le_bytes(b.try_into().unwrap()) as f32),
        Dtype::F8E4M3 => bytes.iter().zip(out.iter_mut()).for_each(|(&b, o)| *o = f8e4m3_to_f32(b)),
        Dtype::I8 | Dtype::Other(..) => return require_float(dtype),
    }
    Ok(())
}

/// Refuses a dtype whose stored values are not numbers by themselves.
pub fn require_float(dtype: Dtype) -> Result<()> {
    match dtype {
        Dtype::I8 => bail!(
            "dtype I8 holds integer codes, not numbers (they mean something only with a scale tensor, as \
             in an 8-bit base weight); expected BF16, F16 or F32"
        ),
        Dtype::Other(name, _) => bail!("unsupported dtype {name} (expected BF16, F16 or F32)"),
        _ => Ok(()),
    }
}

/// e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; exponent 0 is subnormal; S.1111.111 is
/// NaN; there are no infinities (max ±448).
pub fn f8e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((b >> 3) & 0xF) as i32;
    let m = (b & 0x7) as f32;
    if e == 0xF && b & 0x7 == 0x7 {
        return f32::NAN;
    }
    if e == 0 {
        sign * m / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + m / 8.0) * 2f32.powi(e - 7)
    }
}

type Header = (usize, BTreeMap<String, TensorInfo>, BTreeMap<String, String>);

/// Our name for one of the `safetensors` crate's dtypes. The crate's enum grows (it is
/// `non_exhaustive`); a dtype it learns later is recognised as unsupported here.
fn dtype_of(d: safetensors::Dtype) -> Dtype {
    use safetensors::Dtype as S;
    match d {
        S::F64 => Dtype::F64,
        S::F32 => Dtype::F32,
        S::F16 => Dtype::F16,
        S::BF16 => Dtype::BF16,
        S::F8_E4M3 => Dtype::F8E4M3,
        S::I8 => Dtype::I8,
        S::F8_E5M2 => Dtype::Other("F8_E5M2", 1),
        S::F8_E8M0 => Dtype::Other("F8_E8M0", 1),
        S::F8_E4M3FNUZ => Dtype::Other("F8_E4M3FNUZ", 1),
        S::F8_E5M2FNUZ => Dtype::Other("F8_E5M2FNUZ", 1),
        // Sub-byte element types: a byte size of 0 makes any read of them an error, never a slice.
        S::F4 => Dtype::Other("F4", 0),
        S::F6_E2M3 => Dtype::Other("F6_E2M3", 0),
        S::F6_E3M2 => Dtype::Other("F6_E3M2", 0),
        S::U8 => Dtype::Other("U8", 1),
        S::BOOL => Dtype::Other("BOOL", 1),
        S::I16 => Dtype::Other("I16", 2),
        S::U16 => Dtype::Other("U16", 2),
        S::I32 => Dtype::Other("I32", 4),
        S::U32 => Dtype::Other("U32", 4),
        S::I64 => Dtype::Other("I64", 8),
        S::U64 => Dtype::Other("U64", 8),
        S::C64 => Dtype::Other("C64", 8),
        _ => Dtype::Other("(a dtype newer than this program)", 0),
    }
}

/// The header is validated by the `safetensors` crate, HF's own reader (fuzzed upstream): the
/// offsets run back to back from 0 to the end of the file, and each tensor's byte length is its
/// dtype × shape, in checked arithmetic. Around it: the bounds that keep a corrupt length from
/// costing memory, a refusal of repeated keys (the crate keeps the last one), and, when the crate
/// says no, an explanation naming the tensor.
fn parse_header(buf: &[u8]) -> Result<Header> {
    if buf.len() < 8 {
        bail!("file is {} bytes, too short for the 8-byte header length (truncated?)", buf.len());
    }
    // The length is not printed: a file that is not a safetensors file (an index pointing at
    // something else) would have its first bytes quoted back.
    let n = u64::from_le_bytes(buf[..8].try_into().unwrap());
    if n > MAX_HEADER {
        bail!("the header length is implausible (over {MAX_HEADER} bytes): corrupt or not a safetensors file");
    }
    let n = n as usize;
    if 8 + n > buf.len() {
        bail!("the header runs past the end of the file ({} bytes; truncated?)", buf.len());
    }
    let header = &buf[8..8 + n];
    let data_len = buf.len() - 8 - n;
    // Parsing costs memory per entry, several hundred bytes each, whatever the header's size: a
    // 99 MB header of 1.7 million empty tensors took 1.4 GB to read (2.1 GB to explain). Every
    // entry is a JSON object, so counting `{` bounds them before parsing (braces inside metadata
    // strings count too, which errs only on the side of refusing a hand-made file).
    let objects = header.iter().filter(|&&b| b == b'{').count();
    if objects > MAX_TENSORS {
        bail!(
            "the header holds {objects} JSON objects, more than the {MAX_TENSORS} tensors this reads (a \
             FLUX.1 checkpoint has under 2,000): corrupt or not a model file"
        );
    }
    reject_repeated_keys(header).context("the header is ambiguous")?;
    let (_, meta) = match safetensors::SafeTensors::read_metadata(buf) {
        Ok(m) => m,
        Err(e) => {
            let crate_says = anyhow::anyhow!("safetensors: {e}");
            return Err(match explain(header, data_len) {
                Some(why) => crate_says.context(why),
                None => crate_says,
            });
        }
    };
    let tensors = meta
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let info = TensorInfo {
                dtype: dtype_of(t.dtype),
                shape: t.shape.clone(),
                begin: t.data_offsets.0,
                end: t.data_offsets.1,
            };
            (name, info)
        })
        .collect();
    let metadata = meta.metadata().iter().flatten().map(|(k, v)| (k.clone(), v.clone())).collect();
    Ok((8 + n, tensors, metadata))
}

/// Which entry of a header the `safetensors` crate refused, and why, in the file's own names;
/// None when no entry is to blame (the crate's message then stands alone).
fn explain(header: &[u8], data_len: usize) -> Option<String> {
    let json: serde_json::Map<String, serde_json::Value> = match serde_json::from_slice(header) {
        Ok(j) => j,
        Err(e) => return Some(format!("the header is not valid JSON or not a JSON object ({e})")),
    };
    let mut spans: Vec<(usize, usize, &str)> = Vec::new();
    for (name, v) in &json {
        if name == "__metadata__" {
            let serde_json::Value::Object(m) = v else {
                return Some("`__metadata__` is not a JSON object of strings".into());
            };
            if let Some((k, _)) = m.iter().find(|(_, v)| !v.is_string()) {
                return Some(format!("`__metadata__` entry `{}` is not a string", short(k)));
            }
            continue;
        }
        let why = |s: String| Some(format!("tensor `{}`: {s}", short(name)));
        let RawEntry { dtype: dt, shape, data_offsets: offs } = match RawEntry::deserialize(v) {
            Ok(r) => r,
            Err(e) => return why(format!("not a tensor entry ({e})")),
        };
        let Ok(dtype) = serde_json::from_value::<safetensors::Dtype>(serde_json::Value::String(dt.clone())) else {
            return why(format!("unknown dtype `{}`", short(&dt)));
        };
        let [begin, end] = offs[..] else {
            return why("data_offsets must have two entries".into());
        };
        if begin > end {
            return why(format!("data_offsets [{begin}, {end}] are reversed"));
        }
        if end > data_len {
            return why(format!(
                "data_offsets end {end} is past the end of the data ({data_len} bytes; file truncated?)"
            ));
        }
        let bits = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).and_then(|n| n.checked_mul(dtype.bitsize()));
        let Some(bits) = bits else {
            return why(format!("shape {shape:?} overflows"));
        };
        if bits % 8 != 0 || end - begin != bits / 8 {
            return why(format!("{} bytes stored but dtype {dtype} × shape {shape:?} needs {bits} bits", end - begin));
        }
        spans.push((begin, end, name));
    }
    // The tensors must tile the data section: no overlap, no gap, nothing after the last.
    spans.sort();
    let mut at = 0;
    let mut prev: Option<&str> = None;
    for &(begin, end, name) in &spans {
        if begin < at {
            let other = prev.map_or(String::new(), |p| format!(" `{}`", short(p)));
            return Some(format!("tensor `{}` overlaps tensor{other} (header offsets are corrupt)", short(name)));
        }
        if begin > at {
            return Some(format!(
                "{} unused bytes before tensor `{}` (tensors are stored back to back)",
                begin - at,
                short(name)
            ));
        }
        at = end;
        prev = Some(name);
    }
    (at != data_len)
        .then(|| format!("{} bytes after the last tensor (tensors end at byte {at} of {data_len})", data_len - at))
}

/// A sharded checkpoint's index (`*.safetensors.index.json`, as HF and diffusers write it):
/// which shard file holds each tensor.
#[derive(Deserialize)]
pub struct ShardIndex {
    pub weight_map: BTreeMap<String, String>,
}

impl ShardIndex {
    /// Reads an index and confines its shards to the index's folder: a shard is a relative path
    /// with no `..`, and one that exists resolves (through any symlink) inside that folder. A
    /// downloaded index must not make us open, and quote, files elsewhere.
    pub fn read(path: &Path) -> Result<ShardIndex> {
        let index: ShardIndex = super::read_json(path)?;
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let mut checked = std::collections::BTreeSet::new();
        for shard in index.weight_map.values() {
            if checked.insert(shard.as_str()) {
                confine(dir, shard).with_context(|| format!("{}: shard `{}`", path.display(), short(shard)))?;
            }
        }
        Ok(index)
    }
}

/// `name` as a file inside `dir`: relative, without `..`, and not a symlink out of `dir`.
fn confine(dir: &Path, name: &str) -> Result<()> {
    use std::path::Component;
    let rel = Path::new(name);
    if name.is_empty() || rel.is_absolute() || rel.has_root() {
        bail!("is not a relative path; shards must be files inside the model folder {}", dir.display());
    }
    if rel.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
        bail!("leaves the folder (`..`); shards must be files inside the model folder {}", dir.display());
    }
    let full = dir.join(rel);
    if std::fs::symlink_metadata(&full).is_ok() {
        let real = full.canonicalize().with_context(|| format!("cannot resolve {}", full.display()))?;
        let root = dir.canonicalize().with_context(|| format!("cannot resolve {}", dir.display()))?;
        if !real.starts_with(&root) && !is_hub_blob(&real, &root) {
            bail!("is a link to a file outside the model folder {}; copy the shard into the folder", dir.display());
        }
    }
    Ok(())
}

/// The Hugging Face cache's layout: a snapshot's files (`<repo>/snapshots/<rev>/…`) are links
/// to `<repo>/blobs/<hash>`, outside the snapshot folder. A link into the `blobs` folder of a
/// repository holding the model folder is that, and nothing else can be reached that way.
fn is_hub_blob(real: &Path, root: &Path) -> bool {
    let Some(blobs) = real.parent() else { return false };
    let Some(repo) = blobs.parent() else { return false };
    blobs.file_name().is_some_and(|n| n == "blobs") && root.starts_with(repo.join("snapshots"))
}

/// A tensor's header entry as the format defines it.
#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: Vec<usize>,
}

/// A tensor to write: name, shape, f32 data, and the dtype to store it as.
pub struct OutTensor<'a> {
    pub name: &'a str,
    pub shape: Vec<usize>,
    pub data: &'a [f32],
    pub dtype: Dtype,
}

fn encode(dtype: Dtype, data: &[f32]) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(data.len() * dtype.size());
    match dtype {
        Dtype::F32 => data.iter().for_each(|v| buf.extend_from_slice(&v.to_le_bytes())),
        Dtype::F64 => data.iter().for_each(|v| buf.extend_from_slice(&(*v as f64).to_le_bytes())),
        Dtype::BF16 => data.iter().for_each(|v| buf.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        Dtype::F16 => data.iter().for_each(|v| buf.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
        Dtype::F8E4M3 | Dtype::I8 | Dtype::Other(..) => bail!("cannot write dtype {}", dtype.name()),
    }
    Ok(buf)
}

/// Header of a file holding `entries` (name, dtype, shape) back to back in this order, padded
/// so the data section starts 8-byte aligned as the reference writer does.
fn header_bytes(entries: &[(&str, Dtype, &[usize])], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata)?);
    }
    let mut off = 0usize;
    for (name, dtype, shape) in entries {
        let len = shape.iter().product::<usize>() * dtype.size();
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [off, off + len]}),
        );
        off += len;
    }
    let mut hjson = serde_json::to_vec(&serde_json::Value::Object(header))?;
    while !(hjson.len() + 8).is_multiple_of(8) {
        hjson.push(b' ');
    }
    Ok(hjson)
}

/// Writes tensors to `path` atomically: a temp file in the same folder, then a rename, so a
/// crash never leaves a half-written output behind.
pub fn write_tensors(path: &Path, tensors: &[OutTensor], metadata: &BTreeMap<String, String>) -> Result<()> {
    for t in tensors {
        let numel: usize = t.shape.iter().product();
        if numel != t.data.len() {
            bail!("tensor `{}`: shape {:?} does not match {} values", t.name, t.shape, t.data.len());
        }
    }
    let entries: Vec<(&str, Dtype, &[usize])> = tensors.iter().map(|t| (t.name, t.dtype, t.shape.as_slice())).collect();
    let hjson = header_bytes(&entries, metadata)?;
    let bufs = tensors.iter().map(|t| encode(t.dtype, t.data)).collect::<Result<Vec<_>>>()?;
    atomic_write(path, |w| {
        w.write_all(&(hjson.len() as u64).to_le_bytes())?;
        w.write_all(&hjson)?;
        for b in &bufs {
            w.write_all(b)?;
        }
        Ok(())
    })
}

/// Writes `entries` (name, dtype, shape) atomically, asking `bytes(i)` for the stored bytes of
/// entry i one at a time, so a file larger than memory can be written tensor by tensor.
pub fn write_streamed(
    path: &Path,
    entries: &[(&str, Dtype, &[usize])],
    metadata: &BTreeMap<String, String>,
    mut bytes: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    let hjson = header_bytes(entries, metadata)?;
    // atomic_write speaks io::Error; the producer's own error (naming the tensor) is kept here.
    let mut failure: Option<anyhow::Error> = None;
    let result = atomic_write(path, |w| {
        w.write_all(&(hjson.len() as u64).to_le_bytes())?;
        w.write_all(&hjson)?;
        for (i, (name, dtype, shape)) in entries.iter().enumerate() {
            let want = shape.iter().product::<usize>() * dtype.size();
            let b = match bytes(i) {
                Ok(b) if b.len() == want => b,
                Ok(b) => {
                    failure = Some(anyhow::anyhow!("tensor `{name}`: {} bytes produced, header says {want}", b.len()));
                    return Err(std::io::Error::other("tensor size mismatch"));
                }
                Err(e) => {
                    failure = Some(e);
                    return Err(std::io::Error::other("tensor producer failed"));
                }
            };
            w.write_all(&b)?;
        }
        Ok(())
    });
    match (result, failure) {
        (Err(_), Some(e)) => Err(e),
        (r, _) => r,
    }
}

/// The folder an output file goes to, created when missing (every command follows this rule).
/// An output never replaces a folder, a device, a link or anything else that is not a regular
/// file: every writer (safetensors, PNGs, the metrics file, lock files) checks here first.
pub fn output_folder(path: &Path) -> Result<&Path> {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.is_file() {
            bail!("{} exists and is not a regular file; choose another output path", path.display());
        }
    }
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the output folder {}", dir.display()))?;
    Ok(dir)
}

/// The temp file an atomic write of `name` by process `pid` goes through.
fn temp_name(name: &str, pid: u32) -> String {
    format!(".{name}.{pid}.tmp")
}

/// Whether process `pid` is running; None where this system cannot tell (no /proc).
pub fn pid_alive(pid: u32) -> Option<bool> {
    if !Path::new("/proc/self").exists() {
        return None;
    }
    Some(Path::new(&format!("/proc/{pid}")).exists())
}

/// Temp files (`.<name>.<pid>.tmp`) in `dir` left by writers that were killed: the process that
/// made each is gone. `keep` chooses by the output name (`<name>`). Removes them (files and, for
/// `quantize`'s folders, whole folders; never through a link) and returns their paths.
pub fn remove_stale_temps(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(removed);
    };
    for e in entries.flatten() {
        let file_name = e.file_name();
        let Some(name) = file_name.to_str() else { continue };
        let Some((output, pid)) = name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".tmp"))
            .and_then(|n| n.rsplit_once('.'))
            .and_then(|(o, p)| Some((o, p.parse::<u32>().ok()?)))
        else {
            continue;
        };
        if pid == std::process::id() || pid_alive(pid) != Some(false) || !keep(output) {
            continue;
        }
        let path = e.path();
        let Ok(m) = std::fs::symlink_metadata(&path) else { continue };
        let gone = if m.is_file() {
            std::fs::remove_file(&path)
        } else if m.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            continue;
        };
        gone.with_context(|| format!("cannot remove the stale temp file {}", path.display()))?;
        removed.push(path);
    }
    Ok(removed)
}

/// Runs `f` against a temp file beside `path`, syncs it and renames it over `path`. (Temp files
/// left by killed runs are removed by the commands at their start, `remove_stale_temps`: a scan
/// of the folder per write would cost a cache of many files quadratic time.)
pub fn atomic_write(path: &Path, f: impl FnOnce(&mut std::io::BufWriter<File>) -> std::io::Result<()>) -> Result<()> {
    let dir = output_folder(path)?;
    let name = path.file_name().with_context(|| format!("{}: not a file path", path.display()))?;
    let tmp = dir.join(temp_name(&name.to_string_lossy(), std::process::id()));
    let result = (|| -> Result<()> {
        // A new file, never an existing one: what is under this process's temp name (a file of
        // an earlier process with the same pid, a planted link) is removed, not written through.
        if std::fs::symlink_metadata(&tmp).is_ok_and(|m| !m.is_dir()) {
            std::fs::remove_file(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = std::io::BufWriter::new(file);
        f(&mut w).with_context(|| format!("cannot write {}", tmp.display()))?;
        let file =
            w.into_inner().map_err(|e| e.into_error()).with_context(|| format!("cannot write {}", tmp.display()))?;
        file.sync_all().with_context(|| format!("cannot sync {}", tmp.display()))?;
        // Checked again just before the rename: what is at `path` may have changed meanwhile.
        output_folder(path)?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    })();
    if result.is_err() && std::fs::symlink_metadata(&tmp).is_ok_and(|m| m.is_file()) {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_raw(path: &Path, header: &str, data: &[u8]) {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        std::fs::write(path, v).unwrap();
    }

    fn err_of(header: &str, data: &[u8]) -> String {
        let dir = std::env::temp_dir().join(format!("fk-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("t{}.safetensors", header.len() + data.len()));
        write_raw(&p, header, data);
        let e = SafeTensors::open(&p).err().map(|e| format!("{e:#}")).unwrap_or_default();
        let _ = std::fs::remove_file(&p);
        e
    }

    #[test]
    fn round_trip_f32() {
        let dir = std::env::temp_dir().join(format!("fk-st-rt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.safetensors");
        let data = [1.0f32, -2.5, 3.25, 0.0, 7.0, 8.0];
        write_tensors(
            &p,
            &[OutTensor { name: "x", shape: vec![2, 3], data: &data, dtype: Dtype::F32 }],
            &BTreeMap::new(),
        )
        .unwrap();
        let st = SafeTensors::open(&p).unwrap();
        let (shape, v) = st.read_f32("x").unwrap();
        assert_eq!(shape, vec![2, 3]);
        assert_eq!(v, data);
        let mut rows = [0f32; 3];
        st.read_rows_f32("x", 1..2, &mut rows).unwrap();
        assert_eq!(rows, [0.0, 7.0, 8.0]);
        // No temp file is left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    }

    #[test]
    fn bad_headers_name_the_problem() {
        assert!(err_of(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, &[0; 4]).contains("truncated"));
        assert!(err_of(r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, &[0; 8]).contains("`a`"));
        assert!(err_of(r#"{"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}"#, &[0; 8]).contains("unknown dtype"));
        let overlap = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
        assert!(err_of(overlap, &[0; 12]).contains("overlaps"));
        assert!(err_of("{not json", &[]).contains("JSON"));
        let dir = std::env::temp_dir();
        let p = dir.join(format!("fk-short-{}.safetensors", std::process::id()));
        std::fs::write(&p, [1u8, 2, 3]).unwrap();
        assert!(format!("{:#}", SafeTensors::open(&p).err().unwrap()).contains("too short"));
        std::fs::write(&p, u64::MAX.to_le_bytes()).unwrap();
        let e = format!("{:#}", SafeTensors::open(&p).err().unwrap());
        assert!(e.contains("implausible") && !e.contains(&u64::MAX.to_string()), "{e}");
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn the_crate_rules_hold_with_our_names() {
        // A gap, bytes after the last tensor, a key twice (at the top and inside the metadata), a
        // metadata value that is not a string: refused, naming what is wrong.
        let gap = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#;
        let e = err_of(gap, &[0; 12]);
        assert!(e.contains("unused bytes before tensor `b`") && e.contains("safetensors:"), "{e}");
        let e = err_of(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#, &[0; 6]);
        assert!(e.contains("2 bytes after the last tensor"), "{e}");
        let twice = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let e = err_of(twice, &[0; 8]);
        assert!(e.contains("the key `a` appears twice"), "{e}");
        let meta_twice = r#"{"__metadata__":{"k":"1","k":"2"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        assert!(err_of(meta_twice, &[0; 4]).contains("the key `k` appears twice"));
        let meta_num = r#"{"__metadata__":{"k":1},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        assert!(err_of(meta_num, &[0; 4]).contains("`__metadata__` entry `k` is not a string"));
        let many = format!("{{{}}}", (0..200_001).map(|i| format!("\"t{i}\":{{}}")).collect::<Vec<_>>().join(","));
        assert!(err_of(&many, &[]).contains("200002 JSON objects, more than the 200000"));
        let huge = r#"{"a":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,4]}}"#;
        assert!(err_of(huge, &[0; 4]).contains("overflows"));
        // What the crate accepts reads as before.
        let ok = r#"{"__metadata__":{"k":"v"},"b":{"dtype":"BF16","shape":[2],"data_offsets":[4,8]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        let dir = std::env::temp_dir().join(format!("fk-st-ok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("ok.safetensors");
        let mut data = 2.5f32.to_le_bytes().to_vec();
        data.extend(half::bf16::from_f32(-1.0).to_le_bytes());
        data.extend(half::bf16::from_f32(3.0).to_le_bytes());
        write_raw(&p, ok, &data);
        let st = SafeTensors::open(&p).unwrap();
        assert_eq!(st.read_f32("a").unwrap(), (vec![1], vec![2.5]));
        assert_eq!(st.read_f32("b").unwrap(), (vec![2], vec![-1.0, 3.0]));
        assert_eq!(st.metadata()["k"], "v");
        let mut two = [0f32; 2];
        let e = format!("{:#}", st.read_rows_f32("b", 1..3, &mut two).err().unwrap());
        assert!(e.contains("`b`") && e.contains("rows 1..3"), "{e}");
    }

    #[test]
    fn int8_codes_are_not_read_as_numbers() {
        let dir = std::env::temp_dir();
        let p = dir.join(format!("fk-i8-{}.safetensors", std::process::id()));
        write_raw(&p, r#"{"q":{"dtype":"I8","shape":[2],"data_offsets":[0,2]}}"#, &[3, 0xFD]);
        let st = SafeTensors::open(&p).unwrap();
        let e = format!("{:#}", st.read_f32("q").err().unwrap());
        assert!(e.contains("`q`") && e.contains("I8") && e.contains(&p.display().to_string()), "{e}");
        let mut one = [0f32; 1];
        assert!(st.read_rows_f32("q", 0..1, &mut one).is_err());
        // The codes stay readable as bytes, for an 8-bit weight with its scale.
        assert_eq!(st.bytes("q").unwrap(), &[3, 0xFD]);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn stale_temps_of_dead_processes_go_and_live_ones_stay() {
        let dir = std::env::temp_dir().join(format!("fk-st-stale-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = dir.join(temp_name("a.safetensors", dead));
        let other = dir.join(temp_name("b.safetensors", dead));
        let live = dir.join(temp_name("a.safetensors", std::process::id()));
        for p in [&stale, &other, &live] {
            std::fs::write(p, b"x").unwrap();
        }
        let removed = remove_stale_temps(&dir, |o| o == "a.safetensors").unwrap();
        assert_eq!(removed, vec![stale.clone()]);
        assert!(!stale.exists() && other.exists() && live.exists());
    }

    #[test]
    fn fp8_e4m3_decodes_known_values() {
        assert_eq!(f8e4m3_to_f32(0x38), 1.0);
        assert_eq!(f8e4m3_to_f32(0xC0), -2.0);
        assert_eq!(f8e4m3_to_f32(0x7E), 448.0);
        assert_eq!(f8e4m3_to_f32(0x01), 2f32.powi(-9));
        assert!(f8e4m3_to_f32(0x7F).is_nan());
    }

    #[test]
    fn unsupported_dtype_is_an_error_on_read() {
        let dir = std::env::temp_dir();
        let p = dir.join(format!("fk-i32-{}.safetensors", std::process::id()));
        write_raw(&p, r#"{"a":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}}"#, &[0; 8]);
        let st = SafeTensors::open(&p).unwrap();
        let e = format!("{:#}", st.read_f32("a").err().unwrap());
        assert!(e.contains("`a`") && e.contains("I32"), "{e}");
        let _ = std::fs::remove_file(&p);
    }
}
