//! The engine thread's inbox: the bounded request queue (interactive requests wait ahead
//! of background ones, FIFO within a class; a per-peer limit stops one uid from filling
//! it; a queued request whose client went away is removed at once) and the control
//! commands, which go before any waiting request.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use gemmad_engine::{Control, EngineState};
use tokio::sync::mpsc::UnboundedSender;

use super::estimate::{JobSize, JobStats, Rates};
use super::types::{CounterSnapshot, Event, Priority as Class, QueueSnapshot};
use super::ServiceError;

/// A control command waiting for the engine thread, with where its answer goes.
pub struct Command {
    pub control: Control,
    pub reply: tokio::sync::oneshot::Sender<Result<EngineState, ServiceError>>,
}

/// A validated request, ready for the engine.
pub struct Job {
    /// Assigned by `Queue::admit`.
    pub id: u64,
    pub peer_key: String,
    pub class: Class,
    pub request: gemmad_engine::GenerateRequest,
    pub cancel: Arc<AtomicBool>,
    pub tx: UnboundedSender<Event>,
    /// When the front-end received the request.
    pub received: Instant,
    pub admitted: Instant,
    /// Tokens generated so far (the engine thread counts; the retry hint reads).
    pub generated: Arc<AtomicUsize>,
}

impl Job {
    fn size(&self) -> JobSize {
        let prompt_tokens = match &self.request.prompt {
            gemmad_engine::Prompt::Prepared(p) => p.len(),
            gemmad_engine::Prompt::Ids(ids) => ids.len(),
            // The core queues prepared prompts only.
            gemmad_engine::Prompt::Text(_) | gemmad_engine::Prompt::Chat(_) => 0,
        };
        JobSize {
            prompt_tokens,
            max_tokens: self.request.max_tokens,
            ignore_eos: self.request.ignore_eos,
        }
    }
}

fn queue_full(waiting: usize, retry_after: Duration) -> ServiceError {
    ServiceError::ResourceExhausted {
        message: format!(
            "the request queue is full ({waiting} waiting); retry in about {} ms",
            retry_after.as_millis()
        ),
        retry_after,
    }
}

fn peer_limit(limit: usize, retry_after: Duration) -> ServiceError {
    ServiceError::ResourceExhausted {
        message: format!(
            "this user already has {limit} requests waiting or running (queue.per_peer); \
             retry in about {} ms",
            retry_after.as_millis()
        ),
        retry_after,
    }
}

/// Totals since start (Status RPC, logs, the soak tool's "none lost" check).
#[derive(Debug, Default)]
pub struct Counters {
    pub admitted: AtomicU64,
    pub completed: AtomicU64,
    pub cancelled: AtomicU64,
    pub failed: AtomicU64,
    pub rejected: AtomicU64,
}

impl Counters {
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> CounterSnapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CounterSnapshot {
            admitted: load(&self.admitted),
            completed: load(&self.completed),
            cancelled: load(&self.cancelled),
            failed: load(&self.failed),
            rejected: load(&self.rejected),
        }
    }
}

/// What the engine thread is given next.
pub enum Work {
    Command(Command),
    /// A request, with its run sequence number.
    Job(Box<Job>, u64),
}

struct Running {
    id: u64,
    peer_key: String,
    cancel: Arc<AtomicBool>,
    size: JobSize,
    since: Instant,
    generated: Arc<AtomicUsize>,
}

struct Inner {
    /// How often an idle engine thread wakes (for the watchdog); `None`: never.
    idle_beat: Option<std::time::Duration>,
    commands: VecDeque<Command>,
    interactive: VecDeque<Job>,
    background: VecDeque<Job>,
    per_peer_count: HashMap<String, usize>,
    running: Option<Running>,
    depth: usize,
    per_peer: usize,
    accepting: bool,
    /// Why background requests are refused now (the governor's tier), if they are.
    background_paused: Option<String>,
    stopped: bool,
    next_id: u64,
    run_seq: u64,
    /// What finished jobs measured (retry hints).
    rates: Rates,
}

impl Inner {
    fn waiting(&self) -> usize {
        self.interactive.len() + self.background.len()
    }

    fn release_peer(&mut self, key: &str) {
        if let Some(n) = self.per_peer_count.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_peer_count.remove(key);
            }
        }
    }

    /// The jobs in the order they will run: the running one (with what is left of it),
    /// then interactive, then background ones; each with its peer and expected time.
    fn schedule(&self, now: Instant) -> impl Iterator<Item = (&str, Class, Duration)> {
        let running = self.running.as_ref().map(|r| {
            let left = self.rates.remaining(
                &r.size,
                now.saturating_duration_since(r.since),
                r.generated.load(Ordering::Relaxed),
            );
            (r.peer_key.as_str(), Class::Interactive, left)
        });
        let waiting = self.interactive.iter().chain(&self.background);
        running
            .into_iter()
            .chain(waiting.map(|j| (j.peer_key.as_str(), j.class, self.rates.job(&j.size()))))
    }

    /// How long a new request of `class` would wait before it starts: what is left of
    /// the running job and the expected time of every job that runs before it.
    fn expected_wait(&self, class: Class, now: Instant) -> Duration {
        self.schedule(now)
            .filter(|(_, c, _)| class == Class::Background || *c == Class::Interactive)
            .map(|(.., d)| d)
            .fold(Duration::ZERO, Duration::saturating_add)
    }

    /// How long until one of `peer`'s requests ends, freeing one of its slots.
    fn until_peer_frees(&self, peer: &str, now: Instant) -> Duration {
        let mut t = Duration::ZERO;
        for (p, _, d) in self.schedule(now) {
            t = t.saturating_add(d);
            if p == peer {
                return t;
            }
        }
        t
    }
}

/// A retry hint in the range a client can act on.
fn hint(d: Duration) -> Duration {
    d.clamp(Duration::from_millis(50), Duration::from_secs(30 * 60))
}

pub struct Queue {
    inner: Mutex<Inner>,
    cv: Condvar,
    pub counters: Counters,
}

impl Queue {
    pub fn new(depth: usize, per_peer: usize) -> Self {
        Queue {
            inner: Mutex::new(Inner {
                commands: VecDeque::new(),
                interactive: VecDeque::new(),
                background: VecDeque::new(),
                per_peer_count: HashMap::new(),
                running: None,
                depth,
                per_peer,
                accepting: true,
                background_paused: None,
                stopped: false,
                next_id: 1,
                run_seq: 0,
                rates: Rates::default(),
                idle_beat: None,
            }),
            cv: Condvar::new(),
            counters: Counters::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock would be a bug in this file; keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How often an idle engine thread wakes to show it is alive; `None` (the default):
    /// it sleeps until work comes.
    pub fn set_idle_beat(&self, every: Option<std::time::Duration>) {
        self.lock().idle_beat = every;
    }

    pub fn set_limits(&self, depth: usize, per_peer: usize) {
        let mut g = self.lock();
        g.depth = depth;
        g.per_peer = per_peer;
    }

    /// Whether background requests are admitted (the governor pauses them in
    /// constrained tiers; `reason` says which).
    pub fn set_background_admission(&self, admit: bool, reason: &str) {
        let mut g = self.lock();
        g.background_paused = (!admit).then(|| reason.to_string());
    }

    /// Admits `job` (assigning its id) and sends it its `Queued` event, or says why not.
    pub fn admit(&self, mut job: Job) -> Result<u64, ServiceError> {
        let mut g = self.lock();
        if !g.accepting {
            return Err(ServiceError::Unavailable(
                "gemmad is shutting down; retry when it is back".into(),
            ));
        }
        if let (Class::Background, Some(why)) = (job.class, &g.background_paused) {
            Counters::bump(&self.counters.rejected);
            return Err(ServiceError::ResourceExhausted {
                message: format!(
                    "background requests are paused by the governor ({why}); retry later \
                     or send the request as interactive"
                ),
                retry_after: std::time::Duration::from_secs(30),
            });
        }
        let waiting = g.waiting();
        // The queue is full when `depth` requests wait; a request that can start at once
        // (nothing running, nothing waiting) never waits, so it is always admitted.
        let now = Instant::now();
        if waiting >= g.depth {
            Counters::bump(&self.counters.rejected);
            return Err(queue_full(waiting, hint(g.expected_wait(job.class, now))));
        }
        let mine = g.per_peer_count.get(&job.peer_key).copied().unwrap_or(0);
        if mine >= g.per_peer {
            Counters::bump(&self.counters.rejected);
            let wait = g.until_peer_frees(&job.peer_key, now);
            return Err(peer_limit(g.per_peer, hint(wait)));
        }
        let id = g.next_id;
        g.next_id += 1;
        job.id = id;
        job.admitted = Instant::now();
        let position = match job.class {
            Class::Interactive => g.interactive.len(),
            Class::Background => waiting,
        };
        let _ = job.tx.send(Event::Queued {
            request_id: id,
            position,
        });
        *g.per_peer_count.entry(job.peer_key.clone()).or_insert(0) += 1;
        match job.class {
            Class::Interactive => g.interactive.push_back(job),
            Class::Background => g.background.push_back(job),
        }
        Counters::bump(&self.counters.admitted);
        drop(g);
        self.cv.notify_one();
        Ok(id)
    }

    /// Queues a control command for the engine thread (ahead of waiting requests).
    pub fn command(&self, c: Command) -> Result<(), ServiceError> {
        let mut g = self.lock();
        if g.stopped {
            return Err(ServiceError::shutting_down());
        }
        g.commands.push_back(c);
        drop(g);
        self.cv.notify_one();
        Ok(())
    }

    /// The waiting commands that may be applied between two decode steps: those ahead of
    /// the first that must wait for the request to end (order is kept).
    pub fn take_mid_request_commands(&self) -> Vec<Command> {
        let mut g = self.lock();
        let n = g
            .commands
            .iter()
            .take_while(|c| c.control.safe_mid_request())
            .count();
        g.commands.drain(..n).collect()
    }

    /// Blocks until a command or a job is due, or the queue is stopped and empty of jobs
    /// (commands left then are answered as refused).
    pub fn next(&self) -> Option<Work> {
        self.next_beating(&|| ())
    }

    /// [`Queue::next`], calling `idle` every [`Queue::set_idle_beat`] while nothing is
    /// due (the engine thread's sign of life for the watchdog).
    pub fn next_beating(&self, idle: &dyn Fn()) -> Option<Work> {
        let mut g = self.lock();
        loop {
            if let Some(c) = g.commands.pop_front() {
                return Some(Work::Command(c));
            }
            let job = match g.interactive.pop_front() {
                Some(j) => Some(j),
                None => g.background.pop_front(),
            };
            if let Some(job) = job {
                g.running = Some(Running {
                    id: job.id,
                    peer_key: job.peer_key.clone(),
                    cancel: job.cancel.clone(),
                    size: job.size(),
                    since: Instant::now(),
                    generated: job.generated.clone(),
                });
                let seq = g.run_seq;
                g.run_seq += 1;
                return Some(Work::Job(Box::new(job), seq));
            }
            if g.stopped {
                return None;
            }
            match g.idle_beat {
                Some(every) => {
                    g = match self.cv.wait_timeout(g, every) {
                        Ok((g, _)) => g,
                        Err(p) => p.into_inner().0,
                    };
                    idle();
                }
                None => g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }

    /// The worker is done with `job`'s slot; `stats` when it ran to its end.
    pub fn finished(&self, id: u64, peer_key: &str, stats: Option<JobStats>) {
        let mut g = self.lock();
        if g.running.as_ref().is_some_and(|r| r.id == id) {
            g.running = None;
        }
        g.release_peer(peer_key);
        if let Some(s) = stats {
            g.rates.update(&s);
        }
    }

    /// The client of request `id` went away: drop it if it is still waiting. (A running
    /// request sees its cancel flag at the next decode step.)
    pub fn withdraw(&self, id: u64) {
        let mut g = self.lock();
        let pos_i = g.interactive.iter().position(|j| j.id == id);
        let job = match pos_i {
            Some(p) => g.interactive.remove(p),
            None => match g.background.iter().position(|j| j.id == id) {
                Some(p) => g.background.remove(p),
                None => None,
            },
        };
        if let Some(job) = job {
            g.release_peer(&job.peer_key);
            Counters::bump(&self.counters.cancelled);
            tracing::info!(request_id = id, peer = %job.peer_key, "request withdrawn while queued");
        }
    }

    /// Stops admitting new requests.
    pub fn stop_accepting(&self) {
        self.lock().accepting = false;
    }

    /// Ends every waiting request with `err` and cancels the running one (the engine
    /// thread ends it with the same kind of error). Returns how many were waiting.
    pub fn cancel_all(&self, err: &ServiceError) -> usize {
        let mut g = self.lock();
        let mut jobs: Vec<Job> = g.interactive.drain(..).collect();
        jobs.extend(g.background.drain(..));
        for j in &jobs {
            j.cancel.store(true, Ordering::Relaxed);
            let _ = j.tx.send(Event::Failed(err.clone()));
            g.release_peer(&j.peer_key);
            Counters::bump(&self.counters.cancelled);
        }
        if let Some(r) = &g.running {
            r.cancel.store(true, Ordering::Relaxed);
        }
        jobs.len()
    }

    /// Lets the worker exit once the queue is empty.
    pub fn stop(&self) {
        let mut g = self.lock();
        g.stopped = true;
        for c in g.commands.drain(..) {
            let _ = c.reply.send(Err(ServiceError::shutting_down()));
        }
        drop(g);
        self.cv.notify_all();
    }

    /// Nothing waiting, nothing running.
    pub fn is_idle(&self) -> bool {
        let g = self.lock();
        g.waiting() == 0 && g.running.is_none()
    }

    pub fn snapshot(&self) -> QueueSnapshot {
        let g = self.lock();
        QueueSnapshot {
            waiting_interactive: g.interactive.len(),
            waiting_background: g.background.len(),
            running: g.running.is_some(),
            depth: g.depth,
            per_peer: g.per_peer,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(peer: &str, class: Class) -> (Job, tokio::sync::mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let j = Job {
            id: 0,
            peer_key: peer.into(),
            class,
            request: gemmad_engine::GenerateRequest::new(gemmad_engine::Prompt::Ids(vec![2])),
            cancel: Arc::new(AtomicBool::new(false)),
            tx,
            received: Instant::now(),
            admitted: Instant::now(),
            generated: Arc::new(AtomicUsize::new(0)),
        };
        (j, rx)
    }

    #[test]
    fn interactive_before_background_fifo_within_class() {
        let q = Queue::new(10, 10);
        let mut rxs = Vec::new();
        let mut ids = Vec::new();
        for (p, c) in [
            ("a", Class::Background),
            ("b", Class::Interactive),
            ("a", Class::Background),
            ("c", Class::Interactive),
        ] {
            let (j, rx) = job(p, c);
            ids.push(q.admit(j).unwrap());
            rxs.push(rx);
        }
        let order: Vec<u64> = (0..4)
            .map(|_| {
                let Some(Work::Job(j, _)) = q.next() else {
                    panic!("expected a job")
                };
                q.finished(j.id, &j.peer_key, None);
                j.id
            })
            .collect();
        assert_eq!(order, vec![ids[1], ids[3], ids[0], ids[2]]);
        assert!(q.is_idle());
    }

    fn sized(peer: &str, class: Class, prompt: usize, max_tokens: usize) -> Job {
        let (mut j, _rx) = job(peer, class);
        j.request =
            gemmad_engine::GenerateRequest::new(gemmad_engine::Prompt::Ids(vec![2; prompt]));
        j.request.max_tokens = max_tokens;
        j
    }

    #[test]
    fn retry_hint_is_the_running_jobs_rest_plus_every_job_ahead() {
        let q = Queue::new(3, 2);
        // Measured: prefill 1000 tokens/s, decode 100 tokens/s, half of max_tokens
        // generated, no overhead.
        for _ in 0..200 {
            q.finished(
                0,
                "x",
                Some(JobStats {
                    prompt_tokens: 1000,
                    prefill: Duration::from_secs(1),
                    completion_tokens: 100,
                    decode: Duration::from_secs(1),
                    max_tokens: 200,
                    ignore_eos: false,
                    held: Duration::from_secs(2),
                }),
            );
        }
        // Running: 500 prompt tokens, max 400 (0.5 s + 2 s).
        q.admit(sized("a", Class::Interactive, 500, 400)).unwrap();
        let Some(Work::Job(running, _)) = q.next() else {
            panic!("expected a job")
        };
        // Waiting: interactive 1000/200 (1 s + 1 s); background 0/1000 (5 s);
        // interactive 2000/0 (2 s).
        q.admit(sized("b", Class::Interactive, 1000, 200)).unwrap();
        q.admit(sized("a", Class::Background, 0, 1000)).unwrap();
        q.admit(sized("c", Class::Interactive, 2000, 0)).unwrap();
        let g = q.lock();
        let since = g.running.as_ref().unwrap().since;
        let at = |s: f64| since + Duration::from_secs_f64(s);
        let secs = |d: Duration| (d.as_secs_f64() * 1000.0).round() / 1000.0;
        // 0.2 s into the running job: 0.3 s of prefill and 2 s of decode left.
        assert_eq!(
            secs(g.expected_wait(Class::Interactive, at(0.2))),
            2.3 + 2.0 + 2.0
        );
        // 1 s in, no token yet: prefill is over, the 200 expected tokens are left.
        assert_eq!(
            secs(g.expected_wait(Class::Interactive, at(1.0))),
            2.0 + 2.0 + 2.0
        );
        assert_eq!(
            secs(g.expected_wait(Class::Background, at(1.0))),
            2.0 + 2.0 + 2.0 + 5.0
        );
        // 150 tokens generated: 50 expected left (0.5 s).
        running.generated.store(150, Ordering::Relaxed);
        assert_eq!(
            secs(g.expected_wait(Class::Interactive, at(3.0))),
            0.5 + 4.0
        );
        // Peer "a" runs now; peer "c" is third.
        assert_eq!(secs(g.until_peer_frees("a", at(3.0))), 0.5);
        assert_eq!(secs(g.until_peer_frees("c", at(3.0))), 0.5 + 2.0 + 2.0);
        drop(g);
        // A full queue's refusal carries the hint: everything, for a background request.
        let e = q.admit(sized("d", Class::Background, 1, 1)).unwrap_err();
        let ServiceError::ResourceExhausted { retry_after, .. } = e else {
            panic!("{e:?}")
        };
        assert_eq!(secs(retry_after), 0.5 + 2.0 + 2.0 + 5.0);
    }

    #[test]
    fn depth_and_per_peer_limits_then_withdraw_frees_the_slot() {
        let q = Queue::new(2, 1);
        let (j1, _r1) = job("a", Class::Interactive);
        let id1 = q.admit(j1).unwrap();
        let (j2, _r2) = job("a", Class::Interactive);
        let e = q.admit(j2).unwrap_err();
        assert!(e.to_string().contains("queue.per_peer"), "{e}");
        let (j3, _r3) = job("b", Class::Interactive);
        q.admit(j3).unwrap();
        let (j4, _r4) = job("c", Class::Interactive);
        let e = q.admit(j4).unwrap_err();
        assert!(
            matches!(&e, ServiceError::ResourceExhausted { retry_after, .. } if !retry_after.is_zero()),
            "{e:?}"
        );
        q.withdraw(id1);
        let (j5, _r5) = job("a", Class::Interactive);
        q.admit(j5).unwrap();
        assert_eq!(q.counters.cancelled.load(Ordering::Relaxed), 1);
        assert_eq!(q.counters.rejected.load(Ordering::Relaxed), 2);
        q.stop_accepting();
        let (j6, _r6) = job("d", Class::Interactive);
        assert!(matches!(q.admit(j6), Err(ServiceError::Unavailable(_))));
        assert_eq!(q.cancel_all(&ServiceError::shutting_down()), 2);
        q.stop();
        assert!(q.next().is_none());
    }

    fn command(
        c: Control,
    ) -> (
        Command,
        tokio::sync::oneshot::Receiver<Result<EngineState, ServiceError>>,
    ) {
        let (reply, rx) = tokio::sync::oneshot::channel();
        (Command { control: c, reply }, rx)
    }

    #[test]
    fn commands_go_first_and_only_safe_ones_run_mid_request_in_order() {
        use gemmad_engine::Modality::Vision;
        let q = Queue::new(10, 10);
        let (j, _r) = job("a", Class::Interactive);
        q.admit(j).unwrap();
        let mut replies = Vec::new();
        for c in [
            Control::ReleasePlePages,
            Control::LimitContext(64),
            Control::UnloadTower(Vision),
        ] {
            let (cmd, rx) = command(c);
            q.command(cmd).unwrap();
            replies.push(rx);
        }
        // Between decode steps: the safe commands ahead of the first that must wait.
        let mid = q.take_mid_request_commands();
        assert_eq!(mid.len(), 1);
        assert_eq!(mid[0].control, Control::ReleasePlePages);
        // Between requests: the rest, in order, before the waiting job.
        let order: Vec<String> = (0..3)
            .map(|_| match q.next() {
                Some(Work::Command(c)) => c.control.to_string(),
                Some(Work::Job(..)) => "job".into(),
                None => "none".into(),
            })
            .collect();
        assert_eq!(
            order,
            [
                "limit the context to 64 tokens",
                "unload the vision tower",
                "job"
            ]
        );
        // Commands still waiting at stop are answered, not dropped.
        let (cmd, mut rx) = command(Control::LimitThreads(1));
        q.command(cmd).unwrap();
        q.stop();
        assert!(matches!(
            rx.try_recv(),
            Ok(Err(ServiceError::Unavailable(_)))
        ));
        let (cmd, _rx) = command(Control::LimitThreads(1));
        assert!(q.command(cmd).is_err());
    }
}
