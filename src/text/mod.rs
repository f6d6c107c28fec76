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

#[cfg(test)]
mod tests {
    #[test]
    fn long_prompts_are_cut_at_a_char_boundary() {
        let s = "é".repeat(super::MAX_PROMPT_BYTES);
        let b = super::bounded_prompt(&s);
        assert!(b.len() <= super::MAX_PROMPT_BYTES && b.len() > super::MAX_PROMPT_BYTES - 4);
        assert_eq!(super::bounded_prompt("short"), "short");
    }
}
