//! The queue and the one thread that owns the model. Each request becomes one task per image;
//! the worker takes the oldest task and every queued task of the same size and steps (any LoRA
//! set, any guidance; on an engine without per-sample adapters, the same set only) up to
//! `max_batch` transformer rows, and runs them as one batch in which each sample's rows see only
//! its own adapters (`Engine::set_batch_adapters`). Each image has its own seed and noise and
//! its own text encoding, so its pixels do not depend on what else was in its batch.
//!
//! A batch that fails is run again one image at a time, so that only the request at fault fails;
//! a panic in the model is caught the same way, and the worker goes on with the queue.

use super::api::{ApiError, Limits, Txt2Img};
use crate::adapters::AdapterSet;
use crate::engine::Engine;
use crate::io::images::{encode_rgb8_png, rgb8_from_unit};
use crate::model::flux::FluxInputs;
use crate::pipeline::TextEncoders;
use crate::sample::sampler::{noise, sample_images, SampleSpec};
use crate::vae::AutoEncoder;
use anyhow::{anyhow, Result};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// The post-filter every generated image passes through (the NSFW check of issue 20 item 4):
/// given RGB8 pixels [h·w·3] with the width and height, `Some(reason)` when the image must be
/// replaced by a black one. An error counts as flagged (the check fails closed).
pub type ImageFilter = Box<dyn Fn(&[u8], usize, usize) -> Result<Option<String>> + Send + Sync>;

/// One finished image.
#[derive(Clone, Debug)]
pub struct ImageOut {
    pub png: Vec<u8>,
    pub seed: u64,
    /// Why the post-filter blacked it out, when it did.
    pub filtered: Option<String>,
    /// How many images shared its transformer pass.
    pub batch: usize,
}

pub type Reply = Result<Vec<ImageOut>, ApiError>;

/// Text conditioning of one prompt: T5 states [t5_len · d_ctx] and CLIP pooled [d_vec].
#[derive(Clone)]
struct Cond {
    txt: Arc<Vec<f32>>,
    y: Arc<Vec<f32>>,
}

/// A request in the queue: what to make, with its adapters resolved.
pub struct Job {
    pub req: Txt2Img,
    /// Its LoRA files at their weights.
    pub set: AdapterSet,
    /// Identifies the set (names, weights, file versions): engines that cannot mix sets in one
    /// batch group by it.
    pub set_key: String,
    /// (prompt, negative prompt when cfg_scale > 1), encoded once by the worker.
    cond: OnceLock<Result<(Cond, Option<Cond>), String>>,
    results: Mutex<Vec<Option<ImageOut>>>,
    reply: Mutex<Option<mpsc::Sender<Reply>>>,
}

impl Job {
    /// A job and the receiver its answer arrives on.
    pub fn new(req: Txt2Img, set: AdapterSet, set_key: String) -> (Arc<Job>, mpsc::Receiver<Reply>) {
        let (tx, rx) = mpsc::channel();
        let n = req.images();
        let job = Job {
            req,
            set,
            set_key,
            cond: OnceLock::new(),
            results: Mutex::new(vec![None; n]),
            reply: Mutex::new(Some(tx)),
        };
        (Arc::new(job), rx)
    }

    fn uses_cfg(&self) -> bool {
        self.req.cfg_scale != 1.0
    }

    fn failed(&self) -> bool {
        lock(&self.reply).is_none()
    }

    /// Answers with an error (once; later images of the job are skipped).
    fn fail(&self, e: ApiError) {
        if let Some(tx) = lock(&self.reply).take() {
            let _ = tx.send(Err(e));
        }
    }

    fn deliver(&self, index: usize, img: ImageOut) {
        let mut res = lock(&self.results);
        res[index] = Some(img);
        if res.iter().all(Option::is_some) {
            if let Some(tx) = lock(&self.reply).take() {
                let _ = tx.send(Ok(res.iter_mut().map(|r| r.take().expect("all set")).collect()));
            }
        }
    }
}

/// One image of a job.
struct Task {
    job: Arc<Job>,
    index: usize,
}

impl Task {
    fn seed(&self) -> u64 {
        self.job.req.seed.wrapping_add(self.index as u64)
    }

    /// Transformer rows: two with true CFG (the prompt and the negative prompt).
    fn rows(&self) -> usize {
        if self.job.uses_cfg() {
            2
        } else {
            1
        }
    }
}

struct Queue {
    tasks: VecDeque<Task>,
    /// Images in the batch running now.
    running: usize,
    draining: bool,
}

/// Where the sampler is: what `GET /sdapi/v1/progress` reports.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub step: usize,
    pub steps: usize,
    /// Images in the running batch (0: idle).
    pub batch: usize,
    pub started: Option<Instant>,
    pub interrupted: bool,
    /// Seconds the last batch took, for Retry-After.
    pub last_batch_s: f64,
    pub images_done: u64,
    pub batches_done: u64,
}

/// What the HTTP threads and the worker share.
pub struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    progress: Mutex<Progress>,
    interrupt: AtomicBool,
    pub limits: Limits,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while a lock is held is caught by the worker; the data stays usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Marks the error of an interrupted batch.
#[derive(Debug)]
struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted by POST /sdapi/v1/interrupt")
    }
}

impl std::error::Error for Interrupted {}

impl Shared {
    pub fn new(limits: Limits) -> Shared {
        Shared {
            queue: Mutex::new(Queue { tasks: VecDeque::new(), running: 0, draining: false }),
            wake: Condvar::new(),
            progress: Mutex::new(Progress::default()),
            interrupt: AtomicBool::new(false),
            limits,
        }
    }

    /// Queues every image of `job`, or says 503 (with Retry-After) when the queue is full and
    /// when the server is shutting down.
    pub fn submit(&self, job: &Arc<Job>) -> Result<(), ApiError> {
        let n = job.req.images();
        let mut q = lock(&self.queue);
        if q.draining {
            return Err(ApiError { retry_after: Some(30), ..ApiError::new(503, "the server is shutting down") });
        }
        let waiting = q.tasks.len() + q.running;
        if waiting + n > self.limits.max_queue {
            let per_batch = lock(&self.progress).last_batch_s.max(1.0);
            let batches = waiting.div_ceil(self.limits.max_batch.max(1)) as f64;
            let secs = (per_batch * batches).ceil().clamp(1.0, 600.0) as u32;
            return Err(ApiError {
                retry_after: Some(secs),
                ..ApiError::new(
                    503,
                    format!(
                        "the queue is full: {waiting} images waiting, this request adds {n}, at most {} (--max-queue)",
                        self.limits.max_queue
                    ),
                )
            });
        }
        q.tasks.extend((0..n).map(|index| Task { job: job.clone(), index }));
        self.wake.notify_all();
        Ok(())
    }

    /// Images waiting and running.
    pub fn pending(&self) -> (usize, usize) {
        let q = lock(&self.queue);
        (q.tasks.len(), q.running)
    }

    pub fn progress(&self) -> Progress {
        lock(&self.progress).clone()
    }

    /// Stops the running batch at its next step; its requests answer 409.
    pub fn interrupt(&self) {
        self.interrupt.store(true, Ordering::SeqCst);
    }

    /// No new requests from now on; the worker finishes the queue and returns.
    pub fn drain(&self) {
        lock(&self.queue).draining = true;
        self.wake.notify_all();
    }

    pub fn draining(&self) -> bool {
        lock(&self.queue).draining
    }

    /// The next batch: the oldest task and every queued task that can share its pass, up to
    /// `max_batch` rows. None once draining with nothing left.
    fn next_batch(&self, mixed: bool) -> Option<Vec<Task>> {
        let mut q = lock(&self.queue);
        loop {
            // Tasks of failed jobs are dropped unrun.
            q.tasks.retain(|t| !t.job.failed());
            if !q.tasks.is_empty() {
                break;
            }
            if q.draining {
                return None;
            }
            q = self.wake.wait_timeout(q, Duration::from_millis(500)).unwrap_or_else(|p| p.into_inner()).0;
        }
        let first = q.tasks.pop_front().expect("not empty");
        let key = |t: &Task| {
            let r = &t.job.req;
            (r.width, r.height, r.steps, if mixed { String::new() } else { t.job.set_key.clone() })
        };
        let want = key(&first);
        let mut rows = first.rows();
        let mut batch = vec![first];
        let mut rest = VecDeque::new();
        while let Some(t) = q.tasks.pop_front() {
            if rows + t.rows() <= self.limits.max_batch && key(&t) == want {
                rows += t.rows();
                batch.push(t);
            } else {
                rest.push_back(t);
            }
        }
        q.tasks = rest;
        q.running = batch.len();
        Some(batch)
    }
}

/// The model side: the engine, the text encoders, the VAE and the post-filter.
pub struct Generator {
    pub engine: Engine,
    pub text: TextEncoders,
    pub vae: AutoEncoder,
    pub filter: Option<ImageFilter>,
    /// Different LoRA sets share a batch (`Engine::set_batch_adapters`); false: one set a batch.
    pub mixed: bool,
}

/// The worker thread's loop: batches until the queue is drained after `Shared::drain`.
pub fn run(shared: Arc<Shared>, mut gen: Generator) {
    let mixed = gen.mixed;
    while let Some(batch) = shared.next_batch(mixed) {
        shared.interrupt.store(false, Ordering::SeqCst);
        let t = Instant::now();
        let n = batch.len();
        // `run_batch` catches the model's panics; this catches the rest (text encoding, a
        // filter), so that no request waits for ever on a worker that is gone.
        let jobs: Vec<Arc<Job>> = batch.iter().map(|t| t.job.clone()).collect();
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| gen.run_batch(&shared, batch, mixed))).is_err() {
            // Answered jobs ignore this: `fail` answers only a job still waiting.
            jobs.iter()
                .for_each(|j| j.fail(ApiError::new(500, "the server failed on this request (a panic, in its log)")));
        }
        let mut p = lock(&shared.progress);
        p.last_batch_s = t.elapsed().as_secs_f64();
        (p.batch, p.step, p.steps, p.started) = (0, 0, 0, None);
        p.images_done += n as u64;
        p.batches_done += 1;
        drop(p);
        lock(&shared.queue).running = 0;
    }
}

impl Generator {
    /// Runs `batch` and answers its images; on failure runs each image alone.
    fn run_batch(&mut self, shared: &Shared, batch: Vec<Task>, mixed: bool) {
        let batch: Vec<Task> = batch.into_iter().filter(|t| !t.job.failed()).collect();
        let mut ready = Vec::new();
        for t in batch {
            match self.encode(&t.job) {
                Ok(()) => ready.push(t),
                Err(e) => t.job.fail(ApiError::new(500, format!("text encoding failed: {e}"))),
            }
        }
        if ready.is_empty() {
            return;
        }
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.images(shared, &ready, mixed)))
            .unwrap_or_else(|p| {
                let msg =
                    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
                Err(anyhow!("the model panicked: {}", msg.unwrap_or_default()))
            });
        match result {
            Ok(images) => ready.into_iter().zip(images).for_each(|(t, img)| t.job.deliver(t.index, img)),
            Err(e) if e.is::<Interrupted>() => {
                lock(&shared.progress).interrupted = true;
                ready.iter().for_each(|t| t.job.fail(ApiError::new(409, e.to_string())));
            }
            Err(e) if ready.len() > 1 => {
                eprintln!("serve: a batch of {} images failed ({e:#}); running them one at a time", ready.len());
                for t in ready {
                    self.run_batch(shared, vec![t], mixed);
                }
            }
            Err(e) => ready[0].job.fail(ApiError::new(500, format!("generation failed: {e:#}"))),
        }
    }

    fn encode(&self, job: &Job) -> Result<(), String> {
        let enc = job.cond.get_or_init(|| {
            let one = |p: &str| -> Result<Cond, String> {
                let (txt, y) = self.text.encode(&[p.to_string()]).map_err(|e| format!("{e:#}"))?;
                Ok(Cond { txt: Arc::new(txt), y: Arc::new(y) })
            };
            let pos = one(&job.req.prompt)?;
            let neg = if job.uses_cfg() { Some(one(&job.req.negative_prompt)?) } else { None };
            Ok((pos, neg))
        });
        enc.as_ref().map(|_| ()).map_err(Clone::clone)
    }

    /// The images of `tasks` (same size and steps) in one batch: rows 0..b the prompts, then one
    /// row per CFG task with its negative prompt.
    fn images(&mut self, shared: &Shared, tasks: &[Task], mixed: bool) -> Result<Vec<ImageOut>> {
        let cfg = self.engine.cfg().clone();
        let req0 = &tasks[0].job.req;
        let f = self.vae.factor();
        let (h, w, steps) = (req0.height / f, req0.width / f, req0.steps);
        let c = cfg.in_channels / 4;
        let conds: Vec<&(Cond, Option<Cond>)> =
            tasks.iter().map(|t| t.job.cond.get().and_then(|r| r.as_ref().ok()).expect("encoded")).collect();
        let cfg_rows: Vec<(usize, &Cond, f32)> = tasks
            .iter()
            .zip(&conds)
            .enumerate()
            .filter_map(|(i, (t, (_, neg)))| neg.as_ref().map(|n| (i, n, t.job.req.cfg_scale)))
            .collect();
        let mut sets: Vec<AdapterSet> = tasks.iter().map(|t| t.job.set.clone()).collect();
        sets.extend(cfg_rows.iter().map(|(i, _, _)| tasks[*i].job.set.clone()));
        if mixed {
            self.engine.set_batch_adapters(&sets)?;
        } else {
            self.engine.set_adapters(&tasks[0].job.set)?;
        }
        let spec = SampleSpec {
            txt: conds.iter().map(|(p, _)| p.txt.to_vec()).collect(),
            y: conds.iter().map(|(p, _)| p.y.to_vec()).collect(),
            n_txt: self.text.t5_len,
            h,
            w,
            steps,
            guidance: req0.guidance,
            seed: 0,
        };
        let start: Vec<Vec<f32>> = tasks.iter().map(|t| noise(1, c, h, w, t.seed()).remove(0)).collect();
        let guidance: Vec<f32> = tasks.iter().map(|t| t.job.req.guidance).collect();
        {
            let mut p = lock(&shared.progress);
            (p.step, p.steps, p.batch, p.started, p.interrupted) = (0, steps, tasks.len(), Some(Instant::now()), false);
        }
        let engine = &mut self.engine;
        let mut k = 0;
        let lats = sample_images(&cfg, &spec, Some(&start), Some(&guidance), &mut |inp| {
            if shared.interrupt.load(Ordering::SeqCst) {
                return Err(Interrupted.into());
            }
            let v = if cfg_rows.is_empty() { engine.forward(inp)? } else { cfg_forward(engine, inp, &cfg_rows)? };
            k += 1;
            lock(&shared.progress).step = k;
            Ok(v)
        })?;
        tasks
            .iter()
            .zip(lats)
            .map(|(t, z)| {
                let img = self.vae.decode(&z, 1, h, w)?;
                let (ph, pw) = (h * f, w * f);
                let mut rgb = rgb8_from_unit(&img, ph, pw);
                let filtered = self.post_filter(&rgb, pw, ph);
                if filtered.is_some() {
                    rgb.iter_mut().for_each(|v| *v = 0);
                }
                Ok(ImageOut { png: encode_rgb8_png(rgb, ph, pw)?, seed: t.seed(), filtered, batch: tasks.len() })
            })
            .collect()
    }

    /// The one place every generated image passes before it leaves the server: the optional
    /// post-filter (the NSFW classifier). Some(reason): the caller blacks the image out.
    fn post_filter(&self, rgb: &[u8], w: usize, h: usize) -> Option<String> {
        let f = self.filter.as_ref()?;
        match f(rgb, w, h) {
            Ok(r) => r,
            Err(e) => Some(format!("the image check failed ({e:#}); blacked out to be safe")),
        }
    }
}

/// One forward with true CFG: the rows of `cfg_rows` run a second time with their negative
/// prompt (appended after the b rows), and their velocity becomes neg + scale·(pos − neg).
fn cfg_forward(engine: &mut Engine, inp: &FluxInputs, cfg_rows: &[(usize, &Cond, f32)]) -> Result<Vec<f32>> {
    let (b, nt) = (inp.b, inp.n_txt);
    let per = |v: &[f32]| v.len() / b;
    let (pi, pid, pt, py) = (per(&inp.img), per(&inp.img_ids), per(&inp.txt), per(&inp.y));
    let mut big = inp.clone();
    big.b = b + cfg_rows.len();
    for &(i, neg, _) in cfg_rows {
        big.img.extend_from_slice(&inp.img[i * pi..(i + 1) * pi]);
        big.img_ids.extend_from_slice(&inp.img_ids[i * pid..(i + 1) * pid]);
        anyhow::ensure!(neg.txt.len() == pt && neg.y.len() == py, "negative prompt conditioning has the wrong size");
        big.txt.extend_from_slice(&neg.txt);
        big.txt_ids.extend(std::iter::repeat_n(0.0, nt * 3));
        big.y.extend_from_slice(&neg.y);
        big.timesteps.push(inp.timesteps[i]);
        if let Some(g) = big.guidance.as_mut() {
            g.push(inp.guidance.as_ref().expect("same model")[i]);
        }
    }
    let v = engine.forward(&big)?;
    let per_out = v.len() / big.b;
    let mut out = v[..b * per_out].to_vec();
    for (j, &(i, _, scale)) in cfg_rows.iter().enumerate() {
        let neg = &v[(b + j) * per_out..(b + j + 1) * per_out];
        out[i * per_out..(i + 1) * per_out].iter_mut().zip(neg).for_each(|(p, &n)| *p = n + scale * (*p - n));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::api::parse_txt2img;

    fn job(body: &str, key: &str) -> Arc<Job> {
        let req = parse_txt2img(body.as_bytes(), &Limits::default(), 16, || 0).unwrap();
        Job::new(req, AdapterSet::new(), key.into()).0
    }

    fn ids(batch: &[Task], jobs: &[Arc<Job>]) -> Vec<(usize, usize)> {
        batch.iter().map(|t| (jobs.iter().position(|j| Arc::ptr_eq(j, &t.job)).unwrap(), t.index)).collect()
    }

    /// The oldest task leads; tasks of its size and steps join whatever their LoRA set (only the
    /// same set without mixed batching), up to max_batch rows with a CFG image counting twice;
    /// the others keep their order.
    #[test]
    fn batches_group_by_size_and_steps_up_to_the_row_limit() {
        let shared = Shared::new(Limits { max_batch: 4, ..Limits::default() });
        let jobs = vec![
            job(r#"{"width": 16, "height": 16, "steps": 2}"#, "a"),
            job(r#"{"width": 32, "height": 16, "steps": 2}"#, "a"),
            job(r#"{"width": 16, "height": 16, "steps": 3}"#, "a"),
            job(r#"{"width": 16, "height": 16, "steps": 2, "batch_size": 2}"#, "b"),
            job(r#"{"width": 16, "height": 16, "steps": 2, "cfg_scale": 2}"#, "a"),
            job(r#"{"width": 16, "height": 16, "steps": 2}"#, "a"),
        ];
        jobs.iter().for_each(|j| shared.submit(j).unwrap());
        assert_eq!(shared.pending(), (7, 0));
        // Rows: job 0 (1) + job 3's two images (2) = 3; job 4 needs 2 more: over 4; job 5 fits.
        assert_eq!(ids(&shared.next_batch(true).unwrap(), &jobs), vec![(0, 0), (3, 0), (3, 1), (5, 0)]);
        assert_eq!(shared.pending(), (3, 4));
        assert_eq!(ids(&shared.next_batch(true).unwrap(), &jobs), vec![(1, 0)]);
        assert_eq!(ids(&shared.next_batch(true).unwrap(), &jobs), vec![(2, 0)]);
        assert_eq!(ids(&shared.next_batch(true).unwrap(), &jobs), vec![(4, 0)]);

        // Without mixed batching only the same set key shares a pass.
        jobs.iter().for_each(|j| shared.submit(j).unwrap());
        assert_eq!(ids(&shared.next_batch(false).unwrap(), &jobs), vec![(0, 0), (4, 0), (5, 0)]);
        assert_eq!(ids(&shared.next_batch(false).unwrap(), &jobs), vec![(1, 0)]);
        assert_eq!(ids(&shared.next_batch(false).unwrap(), &jobs), vec![(2, 0)]);
        assert_eq!(ids(&shared.next_batch(false).unwrap(), &jobs), vec![(3, 0), (3, 1)]);

        // A failed job's tasks are dropped unrun; a draining queue ends the worker.
        let j = job(r#"{"batch_size": 3}"#, "a");
        shared.submit(&j).unwrap();
        j.fail(ApiError::new(500, "x"));
        shared.drain();
        assert!(shared.next_batch(true).is_none());
        let e = shared.submit(&jobs[0]).unwrap_err();
        assert_eq!((e.status, e.retry_after.is_some()), (503, true));
    }

    #[test]
    fn a_full_queue_says_how_full() {
        let shared = Shared::new(Limits { max_queue: 3, ..Limits::default() });
        shared.submit(&job(r#"{"batch_size": 2}"#, "a")).unwrap();
        let e = shared.submit(&job(r#"{"batch_size": 2}"#, "a")).unwrap_err();
        assert_eq!(e.status, 503);
        assert!(e.message.contains("2 images waiting") && e.message.contains("--max-queue"), "{e:?}");
        assert!(e.retry_after.unwrap() >= 1);
        shared.submit(&job("{}", "a")).unwrap();
    }
}
