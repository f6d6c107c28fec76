//! The text encoders FLUX conditions on: T5-XXL v1.1 (per-token states, `txt`) and CLIP-L
//! (the pooled vector, `y`), with their tokenizers. CPU reference in f32.

pub mod clip;
pub mod t5;

/// The most bytes of a prompt or caption the tokenizers see. T5 keeps 512 tokens and CLIP 77;
/// 64 KiB is over 100 bytes per T5 token, far more than any real caption needs, while the
/// tokenizer's cost on it is milliseconds. (A 50 MB caption tokenised whole took 3.3 GiB.)
pub const MAX_PROMPT_BYTES: usize = 64 * 1024;

/// Widths (vocabulary, hidden, MLP, positions) a text encoder config may have: T5-XXL's largest is
/// 32,128 (the vocabulary). Sizes from files are bounded before anything is sized by them.
pub const MAX_DIM: usize = 1 << 20;
/// Encoder layers (T5-XXL 24, CLIP-L 12), counted from key names or read from a config.json.
pub const MAX_LAYERS: usize = 1024;

/// The first [`MAX_PROMPT_BYTES`] of `text`, cut at a character boundary: the tokens past that
/// point would be truncated away anyway.
pub fn bounded_prompt(text: &str) -> &str {
    if text.len() <= MAX_PROMPT_BYTES {
        return text;
    }
    let mut end = MAX_PROMPT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Runs a call into the `tokenizers` crate, turning a panic into an error naming `what`. The
/// crate panics on some malformed tokenizer files instead of returning an error (a bad
/// precompiled charsmap, a control character in a JSON string: found by tools/fuzz.sh, kept in
/// tests/fuzz-crashes/tokenizer-json/); the library's own message is still printed by the panic
/// hook, then the command ends with this error.
pub(crate) fn guarded<T>(what: impl std::fmt::Display, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(anyhow::anyhow!("{what}: the tokenizers library failed on it: {msg}"))
    })
}

/// Checks a SentencePiece precompiled charsmap before the `tokenizers` crate reads it: the blob
/// starts with the byte size of its trie (u32 LE), which the crate trusts and allocates from (a
/// 1 KB charsmap declaring a 4 GB trie asked for 8 GB: tools/fuzz.sh, tests/fuzz-crashes/spiece/).
pub(crate) fn check_charsmap(blob: &[u8], file: &std::path::Path) -> anyhow::Result<()> {
    let size = blob.get(..4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    match size {
        Some(n) if n % 4 == 0 && n <= blob.len() - 4 => Ok(()),
        Some(n) => anyhow::bail!(
            "{}: the precompiled charsmap declares a {n}-byte trie but holds {} bytes",
            file.display(),
            blob.len() - 4
        ),
        None => anyhow::bail!("{}: the precompiled charsmap is shorter than its 4-byte header", file.display()),
    }
}

/// Checks every `Precompiled` normaliser of a tokenizer.json (see `check_charsmap`). A file that
/// is not JSON is left to the tokenizers crate to reject.
pub(crate) fn check_tokenizer_json(bytes: &[u8], file: &std::path::Path) -> anyhow::Result<()> {
    fn walk(v: &serde_json::Value, file: &std::path::Path) -> anyhow::Result<()> {
        match v {
            serde_json::Value::Object(m) => {
                if m.get("type").and_then(|t| t.as_str()) == Some("Precompiled") {
                    if let Some(s) = m.get("precompiled_charsmap").and_then(|s| s.as_str()) {
                        let blob = base64_decode(s)
                            .ok_or_else(|| anyhow::anyhow!("{}: precompiled_charsmap is not base64", file.display()))?;
                        check_charsmap(&blob, file)?;
                    }
                }
                m.values().try_for_each(|x| walk(x, file))
            }
            serde_json::Value::Array(a) => a.iter().try_for_each(|x| walk(x, file)),
            _ => Ok(()),
        }
    }
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(v) => walk(&v, file),
        Err(_) => Ok(()),
    }
}

/// Standard base64 with padding (the encoding tokenizer.json uses for binary blobs).
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c)? << (18 - 6 * i);
        }
        let n = chunk.len() * 6 / 8;
        out.extend_from_slice(&acc.to_be_bytes()[1..1 + n]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_prompts_are_cut_at_a_char_boundary() {
        let s = "é".repeat(super::MAX_PROMPT_BYTES);
        let b = super::bounded_prompt(&s);
        assert!(b.len() <= super::MAX_PROMPT_BYTES && b.len() > super::MAX_PROMPT_BYTES - 4);
        assert_eq!(super::bounded_prompt("short"), "short");
    }

    #[test]
    fn base64_decodes_with_and_without_padding() {
        assert_eq!(base64_decode("TWFu").unwrap(), b"Man");
        assert_eq!(base64_decode("TWE=").unwrap(), b"Ma");
        assert_eq!(base64_decode("TQ==").unwrap(), b"M");
        assert!(base64_decode("T*==").is_none());
    }

    #[test]
    fn a_charsmap_declaring_more_trie_than_it_holds_is_refused() {
        let f = std::path::Path::new("spiece.model");
        let mut blob = 8u32.to_le_bytes().to_vec();
        blob.extend_from_slice(&[0; 8]);
        assert!(check_charsmap(&blob, f).is_ok());
        blob[..4].copy_from_slice(&4_009_755_648u32.to_le_bytes());
        let e = format!("{:#}", check_charsmap(&blob, f).unwrap_err());
        assert!(e.contains("spiece.model") && e.contains("4009755648"), "{e}");
        assert!(check_charsmap(&[1, 2], f).is_err());
    }
}
