//! The HTTP side: routes, the API key, body limits, JSON answers. A few threads take requests
//! from tiny_http; a txt2img request is checked here (fields, LoRA names, the files' fit to the
//! model) and queued, and a thread of its own waits for its images so that the others keep
//! answering `/progress` and `/health` meanwhile.

use super::api::{parse_txt2img, short_number, ApiError};
use super::registry::{LookupError, Registry};
use super::worker::{ImageOut, Job, Shared};
use crate::adapters::AdapterSet;
use serde_json::{json, Value};
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tiny_http::{Header, Method, Request, Response};

/// The page at `/`: HTML, CSS and JS in one file, nothing fetched from elsewhere.
pub const PAGE: &str = include_str!("page.html");

/// What every HTTP thread needs.
pub struct Ctx {
    pub shared: Arc<Shared>,
    pub registry: Registry,
    pub api_key: Option<String>,
    /// Width and height must be multiples of this (16, or twice the VAE's factor if larger).
    pub size_factor: usize,
    pub device: String,
    pub stop: AtomicBool,
    /// Threads waiting for a request's images.
    pub waiters: Mutex<Vec<JoinHandle<()>>>,
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("ASCII header")
}

fn json_response(status: u16, body: &Value) -> Response<std::io::Cursor<Vec<u8>>> {
    Response::from_string(body.to_string())
        .with_status_code(status)
        .with_header(header("Content-Type", "application/json"))
        .with_header(header("Cache-Control", "no-store"))
}

fn error_response(e: &ApiError) -> Response<std::io::Cursor<Vec<u8>>> {
    let mut r = json_response(e.status, &e.body());
    if let Some(s) = e.retry_after {
        r.add_header(header("Retry-After", &s.to_string()));
    }
    if e.status == 401 {
        r.add_header(header("WWW-Authenticate", "Bearer"));
    }
    r
}

fn respond(req: Request, r: Result<Value, ApiError>) {
    let resp = match r {
        Ok(v) => json_response(200, &v),
        Err(e) => error_response(&e),
    };
    // The client may have gone away; nothing to do about it.
    let _ = req.respond(resp);
}

/// The request's body, at most `max` bytes (413 past it).
fn read_body(req: &mut Request, max: usize) -> Result<Vec<u8>, ApiError> {
    let too_big = || ApiError::new(413, format!("the request body is over {max} bytes (--max-body)"));
    if req.body_length().is_some_and(|n| n > max) {
        return Err(too_big());
    }
    let mut body = Vec::new();
    req.as_reader()
        .take(max as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| ApiError::bad(format!("reading the request body: {e}")))?;
    if body.len() > max {
        return Err(too_big());
    }
    Ok(body)
}

/// Compares without stopping at the first difference (no timing hint about the key).
fn same_key(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Ctx {
    fn authorised(&self, req: &Request) -> bool {
        let Some(key) = &self.api_key else { return true };
        let want = format!("Bearer {key}");
        req.headers()
            .iter()
            .any(|h| h.field.equiv("Authorization") && same_key(h.value.as_str().as_bytes(), want.as_bytes()))
    }

    /// One HTTP thread: requests until `stop`.
    pub fn serve_loop(self: &Arc<Ctx>, server: &tiny_http::Server) {
        while !self.stop.load(Ordering::SeqCst) {
            match server.recv_timeout(Duration::from_millis(100)) {
                Ok(Some(req)) => self.handle(req),
                Ok(None) => {}
                Err(e) => {
                    eprintln!("serve: accepting a request failed: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    fn handle(self: &Arc<Ctx>, mut req: Request) {
        let path = req.url().split('?').next().unwrap_or("").to_string();
        let method = req.method().clone();
        let api = path.starts_with("/sdapi/");
        if api && !self.authorised(&req) {
            return respond(
                req,
                Err(ApiError::new(401, "this server needs `Authorization: Bearer <key>` (--api-key)")),
            );
        }
        let allowed = |m: Method| -> Result<(), ApiError> {
            if method == m {
                Ok(())
            } else {
                Err(ApiError::new(405, format!("{path} takes {m}, not {method}")))
            }
        };
        match path.as_str() {
            "/" | "/index.html" => {
                let r = match allowed(Method::Get) {
                    Ok(()) => Response::from_string(PAGE)
                        .with_header(header("Content-Type", "text/html; charset=utf-8"))
                        // Nothing from elsewhere: the page must work offline and leak nothing.
                        .with_header(header(
                            "Content-Security-Policy",
                            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; connect-src 'self'",
                        )),
                    Err(e) => error_response(&e),
                };
                let _ = req.respond(r);
            }
            "/health" => respond(req, allowed(Method::Get).map(|()| self.health())),
            "/sdapi/v1/loras" => respond(req, allowed(Method::Get).and_then(|()| self.loras())),
            // A1111's refresh: the folder is rescanned on every listing and look-up anyway.
            "/sdapi/v1/refresh-loras" => {
                respond(req, allowed(Method::Post).and_then(|()| self.loras().map(|_| json!({}))))
            }
            "/sdapi/v1/progress" => respond(req, allowed(Method::Get).map(|()| self.progress())),
            "/sdapi/v1/interrupt" => {
                let r = allowed(Method::Post).map(|()| {
                    self.shared.interrupt();
                    json!({})
                });
                respond(req, r)
            }
            "/sdapi/v1/txt2img" => {
                let r = allowed(Method::Post)
                    .and_then(|()| read_body(&mut req, self.shared.limits.max_body))
                    .and_then(|body| self.submit(&body));
                match r {
                    Err(e) => respond(req, Err(e)),
                    Ok((job, rx)) => {
                        // The answer comes when the images do; this thread goes back to others.
                        let h = std::thread::spawn(move || {
                            let reply = rx.recv().unwrap_or_else(|_| Err(ApiError::new(500, "the worker stopped")));
                            respond(req, reply.map(|imgs| txt2img_response(&job, &imgs)));
                        });
                        let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
                        w.retain(|h| !h.is_finished());
                        w.push(h);
                    }
                }
            }
            _ => respond(req, Err(ApiError::new(404, format!("no such endpoint: {path}")))),
        }
    }

    /// Checks a txt2img body, resolves its LoRAs and queues it.
    fn submit(&self, body: &[u8]) -> Result<(Arc<Job>, std::sync::mpsc::Receiver<super::worker::Reply>), ApiError> {
        let req = parse_txt2img(body, &self.shared.limits, self.size_factor, random_seed)?;
        let mut set = AdapterSet::new();
        let mut key = String::new();
        for tag in &req.loras {
            let loaded = self.registry.get(&tag.name).map_err(|e| match e {
                LookupError::Unknown(m) | LookupError::Broken(m) => ApiError::bad(m),
            })?;
            set.add(&loaded.terms, tag.weight);
            key.push_str(&format!("{}:{}:{};", tag.name, tag.weight, loaded.version));
        }
        let (job, rx) = Job::new(req, set, key);
        self.shared.submit(&job)?;
        Ok((job, rx))
    }

    fn health(&self) -> Value {
        let (queued, running) = self.shared.pending();
        let p = self.shared.progress();
        json!({
            "status": if self.shared.draining() { "draining" } else { "ok" },
            "device": self.device,
            "queued_images": queued,
            "running_images": running,
            "images_done": p.images_done,
            "batches_done": p.batches_done,
        })
    }

    fn loras(&self) -> Result<Value, ApiError> {
        let list = self.registry.list().map_err(|e| ApiError::new(500, format!("{e:#}")))?;
        Ok(Value::Array(
            list.into_iter()
                .map(|r| match r {
                    Ok(i) => json!({
                        "name": i.name, "alias": i.name, "path": i.path, "rank": i.rank, "alpha": short_number(i.alpha),
                        "kind": i.kind, "targets": i.targets, "format": i.format, "bytes": i.bytes, "metadata": {},
                    }),
                    Err((name, error)) => json!({ "name": name, "alias": name, "error": error }),
                })
                .collect(),
        ))
    }

    /// A1111's progress: the running batch's fraction, its ETA, the step.
    fn progress(&self) -> Value {
        let p = self.shared.progress();
        let (queued, running) = self.shared.pending();
        let frac = if p.batch > 0 && p.steps > 0 { p.step as f64 / p.steps as f64 } else { 0.0 };
        let eta = match p.started {
            Some(t) if p.step > 0 => t.elapsed().as_secs_f64() / p.step as f64 * (p.steps - p.step) as f64,
            _ => 0.0,
        };
        json!({
            "progress": frac,
            "eta_relative": eta,
            "state": {
                "skipped": false,
                "interrupted": p.interrupted,
                "job": if p.batch > 0 { format!("batch of {}", p.batch) } else { String::new() },
                "job_count": queued + running,
                "job_no": 0,
                "sampling_step": p.step,
                "sampling_steps": p.steps,
            },
            "current_image": null,
            "textinfo": null,
        })
    }
}

/// A seed for `seed: -1`: std's randomly keyed hasher, so two servers do not repeat each other.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish() % super::api::MAX_SEED
}

/// The A1111 answer: images, the request as understood, and `info` (a JSON string) with the
/// seeds, the LoRAs and the post-filter's verdicts.
fn txt2img_response(job: &Job, imgs: &[ImageOut]) -> Value {
    let r = &job.req;
    let seeds: Vec<u64> = imgs.iter().map(|i| i.seed).collect();
    let loras: Vec<Value> =
        r.loras.iter().map(|l| json!({ "name": l.name, "weight": short_number(l.weight) })).collect();
    let lora_text: String = r.loras.iter().map(|l| format!(" <lora:{}:{}>", l.name, l.weight)).collect();
    let infotexts: Vec<String> = seeds
        .iter()
        .map(|s| {
            format!(
                "{}{lora_text}\nSteps: {}, Seed: {s}, Size: {}x{}, Distilled CFG Scale: {}, CFG scale: {}",
                r.prompt, r.steps, r.width, r.height, r.guidance, r.cfg_scale
            )
        })
        .collect();
    let info = json!({
        "prompt": r.prompt,
        "negative_prompt": r.negative_prompt,
        "seed": r.seed,
        "all_seeds": seeds,
        "width": r.width,
        "height": r.height,
        "steps": r.steps,
        "distilled_cfg_scale": short_number(r.guidance),
        "cfg_scale": short_number(r.cfg_scale),
        "loras": loras,
        "nsfw": imgs.iter().map(|i| i.filtered.clone()).collect::<Vec<_>>(),
        "batch_sizes": imgs.iter().map(|i| i.batch).collect::<Vec<_>>(),
        "ignored_fields": r.ignored,
        "infotexts": infotexts,
    });
    #[allow(deprecated)]
    let images: Vec<String> = imgs.iter().map(|i| base64::encode(&i.png)).collect();
    json!({ "images": images, "parameters": r.parameters(), "info": info.to_string() })
}
