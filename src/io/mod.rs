//! Files and formats, with no model types: safetensors (memory-mapped reading, validation,
//! atomic writing, sharded indexes), images (decoding, bucketing, PNG writing) and JSON configs
//! read into the serde structs of the layers above. What the tensors of a file mean
//! is the business of the layers above (`model::checkpoint`, `adapters::formats`).

pub mod images;
pub mod lock;
pub mod safetensors;

use anyhow::{Context, Result};
use std::path::Path;

/// Reads a JSON file (a config.json, an index, a tokenizer config) into `T`, a serde derive of
/// the fields its reader uses; the error names the file, and serde's says which field and where.
/// A key given twice is an error naming it (serde_json would keep the last one silently).
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    reject_repeated_keys(text.as_bytes()).with_context(|| format!("{}: ambiguous JSON", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON or not the expected fields", path.display()))
}

/// Key prefix of single-file bundles of the BFL transformer (ComfyUI's "checkpoint" files).
pub const BFL_BUNDLE_PREFIX: &str = "model.diffusion_model.";

/// JSON with a key twice is ambiguous (serde_json, and so the `safetensors` crate, keep the
/// last one silently, other readers the first): refused, naming the key. Text that is not JSON
/// passes here; the parser that reads it says what is wrong.
pub fn reject_repeated_keys(json: &[u8]) -> Result<()> {
    match serde_json::from_slice::<UniqueKeys>(json) {
        Err(e) if e.classify() == serde_json::error::Category::Data => {
            anyhow::bail!("{e} (each name may appear once: the file is corrupt or hand-made)")
        }
        _ => Ok(()),
    }
}

/// Any JSON value, checked for objects holding a key twice (at any depth).
struct UniqueKeys;

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(UniqueKeysVisitor)
    }
}

struct UniqueKeysVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueKeysVisitor {
    type Value = UniqueKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<UniqueKeys, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if seen.contains(&key) {
                return Err(serde::de::Error::custom(format!("the key `{}` appears twice", short(&key))));
            }
            map.next_value::<UniqueKeys>()?;
            seen.insert(key);
        }
        Ok(UniqueKeys)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<UniqueKeys, A::Error> {
        while seq.next_element::<UniqueKeys>()?.is_some() {}
        Ok(UniqueKeys)
    }

    fn visit_bool<E>(self, _: bool) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_i64<E>(self, _: i64) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_u64<E>(self, _: u64) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_f64<E>(self, _: f64) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_str<E>(self, _: &str) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_unit<E>(self) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
}

/// A name from a file, cut for an error message (a hostile file can hold a megabyte-long key).
pub fn short(s: &str) -> String {
    const MAX: usize = 200;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}
