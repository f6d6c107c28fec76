//! `flux-kernels serve`: an image server speaking the part of the AUTOMATIC1111/Forge web API
//! that clients use (txt2img, loras, progress, interrupt), with a page of its own at `/`.
//! Requests with different LoRA sets share one transformer pass (issue 20).
//!
//! - `api`: the txt2img request read field by field, `<lora:NAME:WEIGHT>` tags, the limits;
//! - `registry`: the LoRA files of --lora-dir by name, loaded lazily, LRU within a budget;
//! - `worker`: the queue, the grouping into batches, the one thread that owns the model, and
//!   the post-filter every image passes (`ImageFilter`: where the NSFW check plugs in);
//! - `http`: routes, the API key, body limits, JSON answers, the page.
//!
//! Shutdown (`Server::shutdown`, called on SIGTERM/Ctrl-C by the command): new requests get
//! 503, the queue is finished and answered, then the threads end.

pub mod api;
pub mod http;
pub mod registry;
pub mod worker;

use crate::engine::{Device, Engine, EngineOptions};
use crate::model::config::FluxConfig;
use crate::model::weights::FluxWeights;
use crate::pipeline::{Components, TextEncoders};
use anyhow::{anyhow, bail, Context, Result};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

pub use api::Limits;
pub use worker::ImageFilter;

/// Threads taking HTTP requests (image requests wait on threads of their own).
const HTTP_THREADS: usize = 4;

/// Everything `serve` runs with.
pub struct ServeOptions {
    pub cfg: FluxConfig,
    pub weights: FluxWeights,
    /// The VAE and text encoders (from the --model folder or their own flags).
    pub components: Components,
    pub lora_dir: PathBuf,
    pub addr: SocketAddr,
    pub api_key: Option<String>,
    pub limits: Limits,
    pub device: Device,
    pub t5_len: usize,
    /// Bytes of LoRA parameters kept loaded.
    pub lora_budget: usize,
    /// The post-filter of every image (the NSFW check); None: off.
    pub image_filter: Option<ImageFilter>,
    /// Requests with different LoRA sets share a batch where the engine can
    /// (`Engine::batches_mixed_adapters`); false: only the same set does.
    pub mixed_batches: bool,
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    ctx: Arc<http::Ctx>,
    http: Arc<tiny_http::Server>,
    http_threads: Vec<JoinHandle<()>>,
    worker: Option<JoinHandle<()>>,
}

impl Server {
    /// Loads the model side, binds, and starts the threads.
    pub fn start(o: ServeOptions) -> Result<Server> {
        let l = &o.limits;
        if [l.max_side, l.max_steps, l.max_images, l.max_batch, l.max_queue, l.max_body].contains(&0) {
            bail!("every --max-* limit must be at least 1");
        }
        if l.max_queue < l.max_images {
            bail!(
                "--max-queue {} is less than --max-images {}: no full request could ever be queued",
                l.max_queue,
                l.max_images
            );
        }
        let registry = registry::Registry::open(&o.lora_dir, &o.cfg, o.lora_budget)?;
        let text = TextEncoders::open(&o.components, &o.cfg, o.t5_len)
            .context("serve encodes prompts with the model folder's T5 and CLIP")?;
        let vae = crate::pipeline::open_vae(&o.components, &o.cfg)
            .context("serve decodes images with the model folder's VAE")?;
        let size_factor = 16usize.max(2 * vae.factor());
        let engine = Engine::new(&o.device, &o.cfg, o.weights, EngineOptions::default())?;
        let device = engine.device_name().to_string();
        let shared = Arc::new(worker::Shared::new(o.limits));
        let http = Arc::new(tiny_http::Server::http(o.addr).map_err(|e| anyhow!("cannot listen on {}: {e}", o.addr))?);
        let addr = http.server_addr().to_ip().context("the server is not on an IP socket")?;
        if o.mixed_batches && !engine.batches_mixed_adapters() {
            eprintln!(
                "serve: the {device} engine batches only requests with the same LoRA set (no per-sample adapters yet)"
            );
        }
        let mixed = o.mixed_batches && engine.batches_mixed_adapters();
        let gen = worker::Generator { engine, text, vae, filter: o.image_filter, mixed };
        let worker = {
            let shared = shared.clone();
            std::thread::Builder::new().name("serve-worker".into()).spawn(move || worker::run(shared, gen))?
        };
        let ctx = Arc::new(http::Ctx {
            shared,
            registry,
            api_key: o.api_key,
            size_factor,
            device,
            stop: AtomicBool::new(false),
            waiters: Mutex::new(Vec::new()),
        });
        let http_threads = (0..HTTP_THREADS)
            .map(|i| {
                let (ctx, http) = (ctx.clone(), http.clone());
                std::thread::Builder::new().name(format!("serve-http-{i}")).spawn(move || ctx.serve_loop(&http))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Server { addr, ctx, http, http_threads, worker: Some(worker) })
    }

    /// The address it listens on (the port chosen when 0 was asked).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The device the transformer runs on.
    pub fn device(&self) -> &str {
        &self.ctx.device
    }

    fn join_waiters(&self) {
        let waiters = std::mem::take(&mut *self.ctx.waiters.lock().unwrap_or_else(|p| p.into_inner()));
        waiters.into_iter().for_each(|h| {
            let _ = h.join();
        });
    }

    /// Refuses new requests (503), finishes and answers every queued one, then stops.
    pub fn shutdown(mut self) -> Result<()> {
        self.ctx.shared.drain();
        let worker_ok = self.worker.take().is_none_or(|w| w.join().is_ok());
        self.join_waiters();
        self.ctx.stop.store(true, Ordering::SeqCst);
        self.http.unblock();
        for h in self.http_threads.drain(..) {
            let _ = h.join();
        }
        // A waiter registered while the HTTP threads were ending (its request queued just
        // before the drain) has its answer by now: the worker answered every queued request.
        self.join_waiters();
        if !worker_ok {
            bail!("the worker thread panicked");
        }
        Ok(())
    }
}
