//! The AUTOMATIC1111/Forge request of `POST /sdapi/v1/txt2img`, read field by field so that an
//! error names the field, and the prompt's `<lora:NAME:WEIGHT>` tags as those clients write them.

use serde_json::{json, Map, Value};

/// An error answered as `{"error": …, "detail": …}` with an HTTP status.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// Seconds for a `Retry-After` header (503 when the queue is full).
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), retry_after: None }
    }

    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(400, message)
    }

    /// The JSON body: A1111 answers errors as {"error", "detail"}.
    pub fn body(&self) -> Value {
        let error = match self.status {
            400 => "BadRequest",
            401 => "Unauthorized",
            404 => "NotFound",
            405 => "MethodNotAllowed",
            409 => "Interrupted",
            413 => "PayloadTooLarge",
            503 => "ServiceUnavailable",
            _ => "InternalError",
        };
        json!({ "error": error, "detail": self.message })
    }
}

/// What a request may ask for, and how much may wait.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest width or height in pixels.
    pub max_side: usize,
    /// Most Euler steps.
    pub max_steps: usize,
    /// Most images of one request (batch_size × n_iter).
    pub max_images: usize,
    /// Most images in one transformer pass (requests are grouped up to this).
    pub max_batch: usize,
    /// Most images waiting or running; past it new requests get 503.
    pub max_queue: usize,
    /// Most LoRA tags in one prompt.
    pub max_loras: usize,
    /// Largest request body in bytes.
    pub max_body: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_side: 2048,
            max_steps: 100,
            max_images: 16,
            max_batch: 8,
            max_queue: 64,
            max_loras: 8,
            max_body: 1 << 20,
        }
    }
}

/// The largest |weight| of a LoRA tag: clients use about -2..2; far past that is a typo.
pub const MAX_LORA_WEIGHT: f32 = 16.0;
/// Seeds are taken up to 2^53 (exact in a JSON number, the range A1111's UI produces).
pub const MAX_SEED: u64 = 1 << 53;

/// An f32 as the JSON number it reads as (0.8, not 0.800000011920929 as a cast to f64 gives).
pub fn short_number(x: f32) -> Value {
    x.to_string().parse::<f64>().map_or(Value::Null, Value::from)
}

/// One `<lora:NAME:WEIGHT>` of a prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraTag {
    pub name: String,
    pub weight: f32,
}

/// A validated txt2img request; `prompt` without its LoRA tags.
#[derive(Clone, Debug)]
pub struct Txt2Img {
    /// The prompt as sent (tags included), for the response's parameters.
    pub prompt_as_sent: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub loras: Vec<LoraTag>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// The first image's seed (resolved when -1 was asked); image j uses seed + j.
    pub seed: u64,
    pub batch_size: usize,
    pub n_iter: usize,
    /// FLUX's guidance embedding (Forge's `distilled_cfg_scale`).
    pub guidance: f32,
    /// True classifier-free guidance against `negative_prompt`; 1 = off.
    pub cfg_scale: f32,
    /// Fields of the request this server does not act on (A1111 clients send many).
    pub ignored: Vec<String>,
}

impl Txt2Img {
    pub fn images(&self) -> usize {
        self.batch_size * self.n_iter
    }

    /// The response's `parameters`: the request as understood.
    pub fn parameters(&self) -> Value {
        json!({
            "prompt": self.prompt_as_sent,
            "negative_prompt": self.negative_prompt,
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "n_iter": self.n_iter,
            "distilled_cfg_scale": short_number(self.guidance),
            "cfg_scale": short_number(self.cfg_scale),
        })
    }
}

const KNOWN: &[&str] = &[
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "steps",
    "seed",
    "batch_size",
    "n_iter",
    "distilled_cfg_scale",
    "cfg_scale",
];

/// Reads a txt2img body. `size_factor`: width and height must also be multiples of it (twice the
/// VAE's factor; 16 for FLUX.1). `random_seed` is called only for seed -1.
pub fn parse_txt2img(
    body: &[u8],
    limits: &Limits,
    size_factor: usize,
    random_seed: impl FnOnce() -> u64,
) -> Result<Txt2Img, ApiError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("the request body is not valid JSON: {e}")))?;
    let Value::Object(o) = v else {
        return Err(ApiError::bad("the request body must be a JSON object (the txt2img fields)"));
    };
    let prompt_as_sent = string(&o, "prompt")?;
    if prompt_as_sent.len() > crate::text::MAX_PROMPT_BYTES {
        return Err(ApiError::bad(format!(
            "`prompt` is {} bytes; at most {}",
            prompt_as_sent.len(),
            crate::text::MAX_PROMPT_BYTES
        )));
    }
    let negative_prompt = string(&o, "negative_prompt")?;
    if negative_prompt.len() > crate::text::MAX_PROMPT_BYTES {
        return Err(ApiError::bad(format!("`negative_prompt` is longer than {} bytes", crate::text::MAX_PROMPT_BYTES)));
    }
    let (prompt, loras) = split_lora_tags(&prompt_as_sent, limits.max_loras)?;
    let step = 16usize.max(size_factor);
    let side = |name: &str| -> Result<usize, ApiError> {
        let v = integer(&o, name, 1024, 1, limits.max_side as u64)? as usize;
        if !v.is_multiple_of(step) {
            return Err(ApiError::bad(format!("`{name}` is {v}: it must be a multiple of {step}")));
        }
        Ok(v)
    };
    let width = side("width")?;
    let height = side("height")?;
    let steps = integer(&o, "steps", 28, 1, limits.max_steps as u64)? as usize;
    let batch_size = integer(&o, "batch_size", 1, 1, limits.max_images as u64)? as usize;
    let n_iter = integer(&o, "n_iter", 1, 1, limits.max_images as u64)? as usize;
    if batch_size * n_iter > limits.max_images {
        return Err(ApiError::bad(format!(
            "`batch_size` × `n_iter` is {}: at most {} images per request (--max-images)",
            batch_size * n_iter,
            limits.max_images
        )));
    }
    let seed = match o.get("seed") {
        None | Some(Value::Null) => random_seed(),
        Some(v) => match v.as_i64() {
            Some(-1) => random_seed(),
            Some(s) if s >= 0 && (s as u64) < MAX_SEED => s as u64,
            _ => return Err(ApiError::bad(format!("`seed` is {v}: give -1 (random) or an integer from 0 to 2^53"))),
        },
    };
    let guidance = number(&o, "distilled_cfg_scale", 3.5, 0.0, 100.0)?;
    let cfg_scale = number(&o, "cfg_scale", 1.0, 1.0, 100.0)?;
    let ignored = o.keys().filter(|k| !KNOWN.contains(&k.as_str())).cloned().collect();
    Ok(Txt2Img {
        prompt_as_sent,
        prompt,
        negative_prompt,
        loras,
        width,
        height,
        steps,
        seed,
        batch_size,
        n_iter,
        guidance,
        cfg_scale,
        ignored,
    })
}

fn string(o: &Map<String, Value>, name: &str) -> Result<String, ApiError> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(ApiError::bad(format!("`{name}` must be a string, got {v}"))),
    }
}

/// An integer field in [lo, hi] (absent or null: `default`); 512.0 is taken as 512.
fn integer(o: &Map<String, Value>, name: &str, default: u64, lo: u64, hi: u64) -> Result<u64, ApiError> {
    let v = match o.get(name) {
        None | Some(Value::Null) => return Ok(default),
        Some(v) => v,
    };
    let n = v.as_u64().or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 1e15).map(|f| f as u64));
    match n {
        Some(n) if (lo..=hi).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::bad(format!("`{name}` is {n}: it must be between {lo} and {hi}"))),
        None => Err(ApiError::bad(format!("`{name}` must be a whole number, got {v}"))),
    }
}

/// A finite number field in [lo, hi] (absent or null: `default`).
fn number(o: &Map<String, Value>, name: &str, default: f32, lo: f32, hi: f32) -> Result<f32, ApiError> {
    let v = match o.get(name) {
        None | Some(Value::Null) => return Ok(default),
        Some(v) => v,
    };
    match v.as_f64() {
        Some(x) if x >= lo as f64 && x <= hi as f64 => Ok(x as f32),
        Some(x) => Err(ApiError::bad(format!("`{name}` is {x}: it must be between {lo} and {hi}"))),
        None => Err(ApiError::bad(format!("`{name}` must be a number, got {v}"))),
    }
}

/// The prompt without its `<lora:NAME>` / `<lora:NAME:WEIGHT>` tags (spaces around a tag
/// collapsed), and the tags in order. A name is a file name in --lora-dir without
/// `.safetensors`: no path separators, no leading dot.
pub fn split_lora_tags(prompt: &str, max_loras: usize) -> Result<(String, Vec<LoraTag>), ApiError> {
    let mut text = String::with_capacity(prompt.len());
    let mut tags: Vec<LoraTag> = Vec::new();
    let mut rest = prompt;
    while let Some(at) = rest.find("<lora:") {
        text.push_str(&rest[..at]);
        let after = &rest[at + "<lora:".len()..];
        let Some(end) = after.find('>') else {
            return Err(ApiError::bad(format!(
                "`prompt`: a LoRA tag `{}` has no closing `>`",
                &rest[at..].chars().take(40).collect::<String>()
            )));
        };
        let body = &after[..end];
        let (name, weight) = match body.rsplit_once(':') {
            Some((n, w)) => {
                let w: f32 = w.trim().parse().map_err(|_| {
                    ApiError::bad(format!("`prompt`: LoRA tag `<lora:{body}>`: the weight `{w}` is not a number"))
                })?;
                (n.trim(), w)
            }
            None => (body.trim(), 1.0),
        };
        if !weight.is_finite() || weight.abs() > MAX_LORA_WEIGHT {
            return Err(ApiError::bad(format!(
                "`prompt`: LoRA `{name}` has weight {weight}: it must be between -{MAX_LORA_WEIGHT} and {MAX_LORA_WEIGHT}"
            )));
        }
        check_lora_name(name)?;
        if tags.iter().any(|t| t.name == name) {
            return Err(ApiError::bad(format!(
                "`prompt`: LoRA `{name}` is tagged twice; give it once with one weight"
            )));
        }
        tags.push(LoraTag { name: name.to_string(), weight });
        if tags.len() > max_loras {
            return Err(ApiError::bad(format!("`prompt` tags more than {max_loras} LoRAs (--max-loras)")));
        }
        rest = &after[end + 1..];
    }
    text.push_str(rest);
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    Ok((text, tags))
}

/// A LoRA name must name a file directly inside --lora-dir: no separators, no `..`, no NUL.
pub fn check_lora_name(name: &str) -> Result<(), ApiError> {
    let bad = name.is_empty()
        || name.len() > 255
        || name.starts_with('.')
        || name.chars().any(|c| c == '/' || c == '\\' || c == '\0' || c.is_control());
    if bad {
        return Err(ApiError::bad(format!(
            "LoRA name `{}` is not a file name in --lora-dir (no paths, no leading dot): use a name from GET /sdapi/v1/loras",
            name.escape_debug()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<Txt2Img, ApiError> {
        parse_txt2img(body.as_bytes(), &Limits::default(), 16, || 77)
    }

    #[test]
    fn tags_are_stripped_and_read() {
        let (p, t) = split_lora_tags("a <lora:ink:0.8> cat <lora:film> in rain", 8).unwrap();
        assert_eq!(p, "a cat in rain");
        assert_eq!(t, vec![LoraTag { name: "ink".into(), weight: 0.8 }, LoraTag { name: "film".into(), weight: 1.0 }]);
        let (p, t) = split_lora_tags("<lora:a:b:-1.5>x", 8).unwrap();
        assert_eq!((p.as_str(), t[0].name.as_str(), t[0].weight), ("x", "a:b", -1.5));
    }

    #[test]
    fn bad_tags_name_what_is_wrong() {
        for (prompt, want) in [
            ("<lora:../../etc/passwd:1>", "no paths"),
            ("<lora:a/b>", "no paths"),
            ("<lora:.hidden>", "no paths"),
            ("<lora:x:abc>", "`abc` is not a number"),
            ("<lora:x:1e9>", "between"),
            ("<lora:x:nan>", "between"),
            ("<lora:x", "no closing"),
            ("<lora:x> <lora:x:2>", "tagged twice"),
        ] {
            let e = split_lora_tags(prompt, 8).unwrap_err();
            assert!(e.status == 400 && e.message.contains(want), "{prompt}: {e:?}");
        }
        let e = split_lora_tags("<lora:a><lora:b><lora:c>", 2).unwrap_err();
        assert!(e.message.contains("more than 2"), "{e:?}");
    }

    #[test]
    fn defaults_and_seeds() {
        let r = parse(r#"{"prompt": "a <lora:s:0.5> dog", "width": 512, "height": 768.0, "sampler_name": "Euler"}"#)
            .unwrap();
        assert_eq!((r.width, r.height, r.steps, r.seed, r.images()), (512, 768, 28, 77, 1));
        assert_eq!((r.guidance, r.cfg_scale), (3.5, 1.0));
        assert_eq!(r.prompt, "a dog");
        assert_eq!(r.ignored, vec!["sampler_name".to_string()]);
        assert_eq!(parse(r#"{"seed": 12, "batch_size": 2, "n_iter": 3}"#).unwrap().seed, 12);
        assert_eq!(parse(r#"{"seed": -1}"#).unwrap().seed, 77);
    }

    /// Mutated bodies (bytes flipped, cut, spliced) answer Ok or a 400, never a panic.
    #[test]
    fn mutated_bodies_never_panic() {
        let good = r#"{"prompt": "a <lora:ink:0.5> cat <lora:b>", "width": 512, "height": 768, "steps": 20, "seed": -1, "batch_size": 2, "n_iter": 2, "cfg_scale": 2.5, "negative_prompt": "é"}"#;
        let mut rng = crate::util::Rng::new(20);
        let alphabet = b"<>:{}[]\",-.0123456789eE lora\\u00\xff";
        for _ in 0..5000 {
            let mut b = good.as_bytes().to_vec();
            for _ in 0..1 + rng.next_u64() % 4 {
                let at = (rng.next_u64() % b.len() as u64) as usize;
                match rng.next_u64() % 3 {
                    0 => b[at] = alphabet[(rng.next_u64() % alphabet.len() as u64) as usize],
                    1 => b.truncate(at.max(1)),
                    _ => b.insert(at, alphabet[(rng.next_u64() % alphabet.len() as u64) as usize]),
                }
            }
            if let Err(e) = parse_txt2img(&b, &Limits::default(), 16, || 1) {
                assert_eq!(e.status, 400, "{e:?}");
                assert!(!e.message.is_empty());
            }
        }
    }

    #[test]
    fn bad_fields_are_named() {
        for (body, want) in [
            ("[1]", "JSON object"),
            ("{", "not valid JSON"),
            (r#"{"width": 500}"#, "`width` is 500: it must be a multiple of 16"),
            (r#"{"height": 4096}"#, "`height` is 4096: it must be between 1 and 2048"),
            (r#"{"width": "big"}"#, "`width` must be a whole number"),
            (r#"{"steps": 0}"#, "`steps` is 0"),
            (r#"{"steps": 1000}"#, "`steps` is 1000"),
            (r#"{"batch_size": 8, "n_iter": 4}"#, "at most 16 images"),
            (r#"{"seed": -5}"#, "`seed`"),
            (r#"{"seed": 1.5}"#, "`seed`"),
            (r#"{"cfg_scale": 0.5}"#, "`cfg_scale`"),
            (r#"{"distilled_cfg_scale": "x"}"#, "`distilled_cfg_scale` must be a number"),
            (r#"{"prompt": 3}"#, "`prompt` must be a string"),
        ] {
            let e = parse(body).unwrap_err();
            assert!(e.status == 400 && e.message.contains(want), "{body}: {e:?}");
        }
        let e = parse_txt2img(br#"{"width": 48}"#, &Limits::default(), 32, || 0).unwrap_err();
        assert!(e.message.contains("multiple of 32"), "{e:?}");
    }
}
