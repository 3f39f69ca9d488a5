//! The background task that keeps health current: TTL expiry, `deregister_after` and active
//! checks, for every instance of one registry, on one task.

use super::instance::{Health, HealthCheck, InstanceId};
use super::memory::{Key, MemoryRegistry};
use crate::random::{RandomSource, SplitMix64};
use futures::future::AbortHandle;
use futures::stream::{FuturesUnordered, StreamExt};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use tokio::sync::Notify;
use tokio::time::{sleep_until, Instant};

/// Active checks in flight at once, per registry.
const MAX_PROBES_IN_FLIGHT: usize = 64;

/// What is due for an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Job {
    /// See whether a TTL instance missed its heartbeat.
    Ttl,
    /// Run its active check.
    Probe,
    /// Remove it if it has been critical for `deregister_after`.
    Expire,
}

type Due = Reverse<(Instant, u64, Key, Job)>;
/// A probe in flight; `None` when it was cancelled (its instance deregistered).
type Probe = Pin<Box<dyn Future<Output = Option<(Key, ProbeOutcome)>> + Send>>;

#[derive(Clone, Copy, Debug)]
enum ProbeOutcome {
    Passed,
    /// An HTTP check's 429: serving but degraded.
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    Warned,
    Failed,
}

/// The schedule of due jobs, and the flag that says whether the task runs.
#[derive(Default)]
pub(crate) struct Checker {
    queue: Mutex<BinaryHeap<Due>>,
    sequence: AtomicU64,
    wake: Arc<Notify>,
    running: Arc<AtomicBool>,
    /// Probes in flight, by instance, so that deregistering cancels them.
    in_flight: Mutex<HashMap<InstanceId, (u64, AbortHandle)>>,
}

impl Checker {
    /// Schedules `job` for the registration `key` at `at`, starting the task if needed.
    pub(crate) fn schedule(&self, registry: &MemoryRegistry, at: Instant, key: Key, job: Job) {
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Reverse((at, sequence, key, job)));
        self.wake.notify_one();
        self.ensure_running(registry);
    }

    /// Starts the task on the current tokio runtime if it is not running (registrations made
    /// outside a runtime start it from the next call inside one).
    pub(crate) fn ensure_running(&self, registry: &MemoryRegistry) {
        if self.running.load(Ordering::Acquire) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !self.running.swap(true, Ordering::AcqRel) {
            let running = Running(self.running.clone());
            let (registry, wake) = (registry.downgrade(), self.wake.clone());
            runtime.spawn(async move {
                let _running = running;
                run(registry, wake).await;
            });
        }
    }

    /// Cancels the probe in flight for `id`, if any.
    pub(crate) fn cancel(&self, id: &InstanceId) {
        if let Some((_, handle)) = self.in_flight().remove(id) {
            handle.abort();
        }
    }

    /// Forgets the probe of `key` once it finished (not a newer registration's).
    fn finished(&self, key: Key) {
        let mut in_flight = self.in_flight();
        if in_flight
            .get(&key.id)
            .is_some_and(|(g, _)| *g == key.generation)
        {
            in_flight.remove(&key.id);
        }
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<InstanceId, (u64, AbortHandle)>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a probe, cancellable by [`cancel`](Self::cancel).
    fn start_probe(
        &self,
        probes: &mut FuturesUnordered<Probe>,
        key: Key,
        probe: impl Future<Output = ProbeOutcome> + Send + 'static,
    ) {
        let (probe, handle) = futures::future::abortable(probe);
        self.in_flight().insert(key.id, (key.generation, handle));
        probes.push(Box::pin(async move {
            probe.await.ok().map(|outcome| (key, outcome))
        }));
    }

    pub(crate) fn wake_for_shutdown(&self) {
        self.wake.notify_one();
    }

    fn pop_due(&self, now: Instant) -> Result<(Key, Job), Option<Instant>> {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        match queue.peek() {
            Some(Reverse((at, _, _, _))) if *at <= now => {
                let Reverse((_, _, key, job)) = queue.pop().expect("peeked");
                Ok((key, job))
            }
            Some(Reverse((at, ..))) => Err(Some(*at)),
            None => Err(None),
        }
    }
}

/// Clears the running flag when the task ends or its runtime drops it.
struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

async fn run(registry: Weak<super::memory::Inner>, wake: Arc<Notify>) {
    let mut probes = Probes::default();
    let random = SplitMix64::from_entropy();
    loop {
        let next = {
            let Some(inner) = registry.upgrade() else {
                return;
            };
            let registry = MemoryRegistry::from_inner(inner);
            loop {
                let now = Instant::now();
                match registry.checker().pop_due(now) {
                    Ok((key, job)) => run_job(&registry, key, job, now, &mut probes),
                    Err(next) => break next,
                }
            }
        };
        tokio::select! {
            () = async {
                match next {
                    Some(at) => sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
            () = wake.notified() => {}
            Some(finished) = probes.running.next(), if !probes.running.is_empty() => {
                let Some(inner) = registry.upgrade() else {
                    return;
                };
                let registry = MemoryRegistry::from_inner(inner);
                if let Some((key, outcome)) = finished {
                    registry.checker().finished(key);
                    apply_probe(&registry, key, outcome, &random);
                }
                // A slot is free: start the longest-waiting probe still registered.
                while let Some(key) = probes.waiting.pop_front() {
                    let before = probes.running.len();
                    run_job(&registry, key, Job::Probe, Instant::now(), &mut probes);
                    if probes.running.len() > before {
                        break;
                    }
                }
            }
        }
    }
}

/// Probes in flight (at most [`MAX_PROBES_IN_FLIGHT`]) and, in order, those due meanwhile.
#[derive(Default)]
struct Probes {
    running: FuturesUnordered<Probe>,
    waiting: std::collections::VecDeque<Key>,
}

impl Probes {
    /// Whether a probe can start now; if not, `key` waits for a free slot.
    fn admit(&mut self, key: Key) -> bool {
        if self.running.len() < MAX_PROBES_IN_FLIGHT {
            true
        } else {
            self.waiting.push_back(key);
            false
        }
    }
}

fn run_job(registry: &MemoryRegistry, key: Key, job: Job, now: Instant, probes: &mut Probes) {
    let inner = registry.inner();
    let Some((check, deregister_after, authority)) = inner.read(key, |entry| {
        (
            entry.instance.check.clone(),
            entry.instance.deregister_after,
            entry.instance.authority(),
        )
    }) else {
        return; // deregistered or replaced: nothing more to do for this registration
    };
    match (job, &check) {
        (Job::Expire, _) => {
            if let Some(after) = deregister_after {
                inner.expire(key, after, now);
            }
        }
        (Job::Ttl, HealthCheck::Ttl { ttl }) => {
            // Decided under the lock a heartbeat takes, so a fresh heartbeat always wins.
            let mut next = now + *ttl;
            let after = inner.transition(key, |entry| match entry.ttl_deadline {
                Some(deadline) if deadline > now => {
                    next = deadline;
                    None
                }
                _ => Some((Health::Critical, "missed its heartbeat")),
            });
            let Some((health, critical_since)) = after else {
                return;
            };
            if let (Health::Critical, Some(after), Some(since)) =
                (health, deregister_after, critical_since)
            {
                inner
                    .checker
                    .schedule(registry, since + after, key, Job::Expire);
            }
            // While critical, look again one ttl later (a heartbeat revives it at once).
            inner.checker.schedule(registry, next, key, Job::Ttl);
        }
        (Job::Probe, HealthCheck::Tcp { timeout, .. }) => {
            if !probes.admit(key) {
                return;
            }
            let timeout = *timeout;
            inner
                .checker
                .start_probe(&mut probes.running, key, async move {
                    let connect = tokio::net::TcpStream::connect(authority);
                    match tokio::time::timeout(timeout, connect).await {
                        Ok(Ok(_)) => ProbeOutcome::Passed,
                        _ => ProbeOutcome::Failed,
                    }
                });
        }
        #[cfg(feature = "http")]
        (Job::Probe, HealthCheck::Http { path, timeout, .. }) => {
            if !probes.admit(key) {
                return;
            }
            let (path, timeout) = (path.clone(), *timeout);
            inner
                .checker
                .start_probe(&mut probes.running, key, async move {
                    let get = super::http_check::get(&authority, &path);
                    // 2xx passing, 429 warning, anything else (or no answer) critical: as Consul.
                    match tokio::time::timeout(timeout, get).await {
                        Ok(Ok(status)) if (200..300).contains(&status) => ProbeOutcome::Passed,
                        Ok(Ok(429)) => ProbeOutcome::Warned,
                        _ => ProbeOutcome::Failed,
                    }
                });
        }
        _ => {}
    }
}

fn apply_probe(registry: &MemoryRegistry, key: Key, outcome: ProbeOutcome, random: &SplitMix64) {
    let inner = registry.inner();
    let mut interval = None;
    let applied = inner.transition(key, |entry| {
        let (every, to_critical, to_passing) = match entry.instance.check {
            HealthCheck::Tcp {
                interval,
                failures_before_critical,
                successes_before_passing,
                ..
            }
            | HealthCheck::Http {
                interval,
                failures_before_critical,
                successes_before_passing,
                ..
            } => (interval, failures_before_critical, successes_before_passing),
            _ => return None,
        };
        interval = Some(every);
        match outcome {
            ProbeOutcome::Passed | ProbeOutcome::Warned => {
                entry.successes = entry.successes.saturating_add(1);
                entry.failures = 0;
                let ready = entry.successes >= to_passing
                    || matches!(entry.instance.health, Health::Passing | Health::Warning);
                let healthy = match outcome {
                    ProbeOutcome::Warned => (Health::Warning, "check warned"),
                    _ => (Health::Passing, "check passed"),
                };
                ready.then_some(healthy)
            }
            ProbeOutcome::Failed => {
                entry.failures = entry.failures.saturating_add(1);
                entry.successes = 0;
                (entry.failures >= to_critical).then_some((Health::Critical, "check failed"))
            }
        }
    });
    let deregister_after = inner
        .read(key, |entry| entry.instance.deregister_after)
        .flatten();
    if let (Some((Health::Critical, Some(since))), Some(after)) = (applied, deregister_after) {
        inner
            .checker
            .schedule(registry, since + after, key, Job::Expire);
    }
    if let (Some(_), Some(interval)) = (applied, interval) {
        // Up to 10 % either way, so instances registered together do not probe together.
        let jitter = interval.mul_f64(0.2 * random.next_f64());
        let next = Instant::now() + interval.mul_f64(0.9) + jitter;
        inner.checker.schedule(registry, next, key, Job::Probe);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cancelling_an_instance_drops_its_probe_in_flight() {
        let checker = Checker::default();
        let mut probes: FuturesUnordered<Probe> = FuturesUnordered::new();
        let key = |id| Key { id, generation: 1 };
        let (kept, cancelled) = (InstanceId::new(), InstanceId::new());
        checker.start_probe(&mut probes, key(cancelled), std::future::pending());
        checker.start_probe(&mut probes, key(kept), async { ProbeOutcome::Passed });
        checker.cancel(&cancelled);
        let mut finished = Vec::new();
        while let Some(result) = probes.next().await {
            finished.push(result.map(|(key, _)| key.id));
        }
        assert_eq!(
            finished.len(),
            2,
            "the cancelled probe ended instead of hanging"
        );
        assert!(finished.contains(&None));
        assert!(finished.contains(&Some(kept)));
    }
}
