//! Memory-mapped safetensors files, validated before any tensor is touched.
//!
//! The header is validated entry by entry so that every failure names the file and the tensor: a
//! truncated file, offsets that run past the end or overlap, a size that does not match
//! dtype × shape, or a dtype we cannot compute with.

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Element types found in safetensors files. Only the float ones can be read as f32; the rest
/// are recognised so the error can say what the tensor actually is.
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
    fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "F64" => Dtype::F64,
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "F8_E4M3" => Dtype::F8E4M3,
            "F8_E5M2" => Dtype::Other("F8_E5M2", 1),
            "I8" => Dtype::I8,
            "U8" => Dtype::Other("U8", 1),
            "BOOL" => Dtype::Other("BOOL", 1),
            "I16" => Dtype::Other("I16", 2),
            "U16" => Dtype::Other("U16", 2),
            "I32" => Dtype::Other("I32", 4),
            "U32" => Dtype::Other("U32", 4),
            "I64" => Dtype::Other("I64", 8),
            "U64" => Dtype::Other("U64", 8),
            _ => return None,
        })
    }

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
const MAX_HEADER: u64 = 100 << 20;

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
        let mut out = vec![0f32; info.numel()];
        convert_to_f32(info.dtype, self.bytes(name)?, &mut out)
            .with_context(|| format!("{}: tensor `{name}`", self.path().display()))?;
        Ok((info.shape.clone(), out))
    }

    /// Rows `rows` (along dim 0) of a tensor converted to f32 and written into `out`.
    pub fn read_rows_f32(&self, name: &str, rows: std::ops::Range<usize>, out: &mut [f32]) -> Result<()> {
        let info = self.info(name).with_context(|| format!("{}: no tensor `{name}`", self.path().display()))?;
        let row_elems: usize = info.shape.iter().skip(1).product();
        let bytes = self.bytes(name)?;
        let sz = info.dtype.size();
        let span = &bytes[rows.start * row_elems * sz..rows.end * row_elems * sz];
        convert_to_f32(info.dtype, span, out).with_context(|| format!("{}: tensor `{name}`", self.path().display()))
    }
}

pub fn convert_to_f32(dtype: Dtype, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let sz = dtype.size();
    debug_assert_eq!(bytes.len(), out.len() * sz);
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
        // The raw integer codes; their scale lives in another tensor.
        Dtype::I8 => bytes.iter().zip(out.iter_mut()).for_each(|(&b, o)| *o = b as i8 as f32),
        Dtype::Other(name, _) => bail!("unsupported dtype {name} (expected BF16, F16 or F32)"),
    }
    Ok(())
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

fn parse_header(buf: &[u8]) -> Result<Header> {
    if buf.len() < 8 {
        bail!("file is {} bytes, too short for the 8-byte header length (truncated?)", buf.len());
    }
    let n = u64::from_le_bytes(buf[..8].try_into().unwrap());
    if n > MAX_HEADER {
        bail!("header length {n} is implausible (corrupt or not a safetensors file)");
    }
    let n = n as usize;
    if 8 + n > buf.len() {
        bail!("header says {n} bytes but the file has only {} after the length (truncated)", buf.len() - 8);
    }
    // `__metadata__` is a free-form string map (a non-string value is kept as its JSON text);
    // every other key is a tensor entry.
    let json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&buf[8..8 + n]).context("header is not valid JSON (or not a JSON object)")?;
    let data_len = buf.len() - 8 - n;
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, v) in json {
        if name == "__metadata__" {
            if let serde_json::Value::Object(m) = v {
                for (k, val) in m {
                    let s = match val {
                        serde_json::Value::String(s) => s,
                        other => other.to_string(),
                    };
                    metadata.insert(k, s);
                }
            }
            continue;
        }
        let info = parse_entry(&v, data_len).with_context(|| format!("tensor `{name}`"))?;
        tensors.insert(name, info);
    }
    // Tensors must not overlap: overlapping ranges mean the offsets lie.
    let mut ranges: Vec<(&String, &TensorInfo)> = tensors.iter().filter(|(_, t)| t.end > t.begin).collect();
    ranges.sort_by_key(|(_, t)| t.begin);
    for w in ranges.windows(2) {
        if w[1].1.begin < w[0].1.end {
            bail!("tensor `{}` overlaps tensor `{}` (header offsets are corrupt)", w[1].0, w[0].0);
        }
    }
    Ok((8 + n, tensors, metadata))
}

/// A sharded checkpoint's index (`*.safetensors.index.json`, as HF and diffusers write it):
/// which shard file holds each tensor.
#[derive(Deserialize)]
pub struct ShardIndex {
    pub weight_map: BTreeMap<String, String>,
}

impl ShardIndex {
    pub fn read(path: &Path) -> Result<ShardIndex> {
        super::read_json(path)
    }
}

/// A tensor's header entry as the format defines it.
#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: Vec<usize>,
}

fn parse_entry(v: &serde_json::Value, data_len: usize) -> Result<TensorInfo> {
    let RawEntry { dtype: dt, shape, data_offsets: offs } = RawEntry::deserialize(v)?;
    let dtype = Dtype::parse(&dt).with_context(|| format!("unknown dtype `{dt}`"))?;
    let [begin, end] = offs[..] else {
        bail!("data_offsets must have two entries");
    };
    if begin > end {
        bail!("data_offsets [{begin}, {end}] are reversed");
    }
    if end > data_len {
        bail!("data_offsets end {end} is past the end of the data ({data_len} bytes; file truncated?)");
    }
    let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).context("shape overflows")?;
    let want = numel.checked_mul(dtype.size()).context("shape overflows")?;
    if end - begin != want {
        bail!("{} bytes stored but dtype {} × shape {:?} needs {want}", end - begin, dtype.name(), shape);
    }
    Ok(TensorInfo { dtype, shape, begin, end })
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
/// An output never replaces a folder, a device or anything else that is not a regular file.
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

/// Runs `f` against a temp file beside `path`, syncs it and renames it over `path`.
pub fn atomic_write(path: &Path, f: impl FnOnce(&mut std::io::BufWriter<File>) -> std::io::Result<()>) -> Result<()> {
    let dir = output_folder(path)?;
    let name = path.file_name().with_context(|| format!("{}: not a file path", path.display()))?;
    let tmp = dir.join(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let result = (|| -> Result<()> {
        let file = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = std::io::BufWriter::new(file);
        f(&mut w).with_context(|| format!("cannot write {}", tmp.display()))?;
        let file =
            w.into_inner().map_err(|e| e.into_error()).with_context(|| format!("cannot write {}", tmp.display()))?;
        file.sync_all().with_context(|| format!("cannot sync {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    })();
    if result.is_err() {
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
        assert!(format!("{:#}", SafeTensors::open(&p).err().unwrap()).contains("implausible"));
        let _ = std::fs::remove_file(&p);
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
