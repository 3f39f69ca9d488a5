//! The background task that keeps health current: TTL expiry, `deregister_after` and active
//! checks, for every instance of one registry, on one task.

use super::instance::{Health, HealthCheck, InstanceId};
use super::memory::{Inner, MemoryRegistry};
use crate::random::{RandomSource, SplitMix64};
use futures::future::AbortHandle;
use futures::stream::{FuturesUnordered, StreamExt};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
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

type Due = Reverse<(Instant, u64, InstanceId, Job)>;
/// A probe in flight; `None` when it was cancelled (its instance deregistered).
type Probe = Pin<Box<dyn Future<Output = Option<(InstanceId, ProbeOutcome)>> + Send>>;

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
    in_flight: Mutex<HashMap<InstanceId, AbortHandle>>,
}

impl Checker {
    /// Schedules `job` for instance `id` at `at`, starting the task if needed.
    pub(crate) fn schedule(
        &self,
        registry: &MemoryRegistry,
        at: Instant,
        id: InstanceId,
        job: Job,
    ) {
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Reverse((at, sequence, id, job)));
        self.wake.notify_one();
        if !self.running.load(Ordering::Acquire) {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                if !self.running.swap(true, Ordering::AcqRel) {
                    let running = Running(self.running.clone());
                    let (registry, wake) = (registry.downgrade(), self.wake.clone());
                    runtime.spawn(async move {
                        let _running = running;
                        run(registry, wake).await;
                    });
                }
            }
        }
    }

    /// Cancels the probe in flight for `id`, if any.
    pub(crate) fn cancel(&self, id: &InstanceId) {
        if let Some(handle) = self.in_flight().remove(id) {
            handle.abort();
        }
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<InstanceId, AbortHandle>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a probe, cancellable by [`cancel`](Self::cancel).
    fn start_probe(
        &self,
        probes: &mut FuturesUnordered<Probe>,
        id: InstanceId,
        probe: impl Future<Output = ProbeOutcome> + Send + 'static,
    ) {
        let (probe, handle) = futures::future::abortable(probe);
        self.in_flight().insert(id, handle);
        probes.push(Box::pin(async move {
            probe.await.ok().map(|outcome| (id, outcome))
        }));
    }

    pub(crate) fn wake_for_shutdown(&self) {
        self.wake.notify_one();
    }

    fn pop_due(&self, now: Instant) -> Result<(InstanceId, Job), Option<Instant>> {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        match queue.peek() {
            Some(Reverse((at, _, _, _))) if *at <= now => {
                let Reverse((_, _, id, job)) = queue.pop().expect("peeked");
                Ok((id, job))
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

async fn run(registry: Weak<Inner>, wake: Arc<Notify>) {
    let mut probes: FuturesUnordered<Probe> = FuturesUnordered::new();
    let random = SplitMix64::from_entropy();
    loop {
        let next = {
            let Some(inner) = registry.upgrade() else {
                return;
            };
            let registry = MemoryRegistry::from_inner(inner);
            loop {
                let now = Instant::now();
                match registry_checker(&registry).pop_due(now) {
                    Ok((id, job)) => run_job(&registry, id, job, now, &mut probes),
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
            Some(finished) = probes.next(), if !probes.is_empty() => {
                let Some(inner) = registry.upgrade() else {
                    return;
                };
                if let Some((id, outcome)) = finished {
                    let registry = MemoryRegistry::from_inner(inner);
                    registry.checker().in_flight().remove(&id);
                    apply_probe(&registry, id, outcome, &random);
                }
            }
        }
    }
}

fn registry_checker(registry: &MemoryRegistry) -> &Checker {
    registry.checker()
}

fn run_job(
    registry: &MemoryRegistry,
    id: InstanceId,
    job: Job,
    now: Instant,
    probes: &mut FuturesUnordered<Probe>,
) {
    let inner = registry.inner();
    // What the entry says, read under the lock; acted on after it.
    let Ok((check, deadline, critical_since, authority)) = inner.with_entry(&id, |_, entry| {
        (
            entry.instance.check.clone(),
            entry.ttl_deadline,
            entry.critical_since,
            entry.instance.authority(),
        )
    }) else {
        return; // deregistered: nothing more to do for it
    };
    match (job, &check) {
        (
            Job::Ttl,
            HealthCheck::Ttl {
                ttl,
                deregister_after,
            },
        ) => {
            let deadline = deadline.unwrap_or(now);
            if deadline > now {
                inner.checker.schedule(registry, deadline, id, Job::Ttl);
                return;
            }
            if inner.set_health(&id, Health::Critical, "missed its heartbeat") {
                if let Some(after) = deregister_after {
                    inner
                        .checker
                        .schedule(registry, now + *after, id, Job::Expire);
                }
            }
            // Look again one ttl later (a heartbeat revives it at once in any case).
            inner.checker.schedule(registry, now + *ttl, id, Job::Ttl);
        }
        (
            Job::Expire,
            HealthCheck::Ttl {
                deregister_after: Some(after),
                ..
            },
        ) => match critical_since {
            Some(since) if now >= since + *after => inner.expire(&id),
            Some(since) => inner
                .checker
                .schedule(registry, since + *after, id, Job::Expire),
            None => {}
        },
        (Job::Probe, HealthCheck::Tcp { timeout, .. }) => {
            if probes.len() >= MAX_PROBES_IN_FLIGHT {
                inner
                    .checker
                    .schedule(registry, now + Duration::from_millis(100), id, Job::Probe);
                return;
            }
            let timeout = *timeout;
            inner.checker.start_probe(probes, id, async move {
                let connect = tokio::net::TcpStream::connect(authority);
                match tokio::time::timeout(timeout, connect).await {
                    Ok(Ok(_)) => ProbeOutcome::Passed,
                    _ => ProbeOutcome::Failed,
                }
            });
        }
        #[cfg(feature = "http")]
        (Job::Probe, HealthCheck::Http { path, timeout, .. }) => {
            if probes.len() >= MAX_PROBES_IN_FLIGHT {
                inner
                    .checker
                    .schedule(registry, now + Duration::from_millis(100), id, Job::Probe);
                return;
            }
            let (path, timeout) = (path.clone(), *timeout);
            inner.checker.start_probe(probes, id, async move {
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

fn apply_probe(
    registry: &MemoryRegistry,
    id: InstanceId,
    outcome: ProbeOutcome,
    random: &SplitMix64,
) {
    let inner = registry.inner();
    let Ok((next_health, interval)) = inner.with_entry(&id, |_, entry| {
        let (interval, to_critical, to_passing) = match entry.instance.check {
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
            _ => return (None, None),
        };
        let next = match outcome {
            ProbeOutcome::Passed | ProbeOutcome::Warned => {
                entry.successes = entry.successes.saturating_add(1);
                entry.failures = 0;
                let healthy = if matches!(outcome, ProbeOutcome::Warned) {
                    Health::Warning
                } else {
                    Health::Passing
                };
                let ready = entry.successes >= to_passing
                    || matches!(entry.instance.health, Health::Passing | Health::Warning);
                ready.then_some(healthy)
            }
            ProbeOutcome::Failed => {
                entry.failures = entry.failures.saturating_add(1);
                entry.successes = 0;
                (entry.failures >= to_critical).then_some(Health::Critical)
            }
        };
        (next, Some(interval))
    }) else {
        return; // deregistered while the probe ran
    };
    if let Some(health) = next_health {
        let why = match outcome {
            ProbeOutcome::Passed => "check passed",
            ProbeOutcome::Warned => "check warned",
            ProbeOutcome::Failed => "check failed",
        };
        inner.set_health(&id, health, why);
    }
    if let Some(interval) = interval {
        // Up to 10 % either way, so instances registered together do not probe together.
        let jitter = interval.mul_f64(0.2 * random.next_f64());
        let next = Instant::now() + interval.mul_f64(0.9) + jitter;
        inner.checker.schedule(registry, next, id, Job::Probe);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cancelling_an_instance_drops_its_probe_in_flight() {
        let checker = Checker::default();
        let mut probes: FuturesUnordered<Probe> = FuturesUnordered::new();
        let (kept, cancelled) = (InstanceId::new(), InstanceId::new());
        checker.start_probe(&mut probes, cancelled, std::future::pending());
        checker.start_probe(&mut probes, kept, async { ProbeOutcome::Passed });
        checker.cancel(&cancelled);
        let mut finished = Vec::new();
        while let Some(result) = probes.next().await {
            finished.push(result.map(|(id, _)| id));
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
