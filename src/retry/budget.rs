//! [`RetryBudget`]: retries allowed as a fraction of recent first tries, counted lock-free.

use super::config::BudgetConfig;
use crate::padded::CachePadded;
use crate::striped::StripedCounter;
use crate::ConfigError;
use std::fmt;
use std::sync::atomic::{fence, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::{sleep_until, Instant};

/// Buckets a `ttl` is cut into.
const BUCKETS_PER_TTL: u32 = 10;
/// Marks kept: one per bucket of the window, plus the bucket being filled.
const MARKS: usize = BUCKETS_PER_TTL as usize + 1;

/// No driver task exists (or it ended with its runtime).
const NO_DRIVER: u8 = 0;
/// A driver task ages the window.
const RUNNING: u8 = 1;
/// The driver sleeps until a deposit: the window is empty, there is nothing to age.
const PARKED: u8 = 2;

/// A shared allowance of retries: at most `ratio` × the first tries of the last `ttl`, plus
/// `min_per_sec` × `ttl`, counting retries that are still waiting out their backoff.
///
/// Every first try [deposits](Self::deposit); every retry (or hedge) must
/// [withdraw](Self::withdraw) before it is scheduled, and is refused once the window's
/// withdrawals reach the allowance. Clones share one budget.
///
/// Accounting is lock-free. A deposit is a plain store on a cache line that only the calling
/// thread writes (see the `striped` counter), so calls on many cores do not contend; a
/// withdrawal is one compare-and-swap. Time is cut into buckets of `ttl / 10`; a small task on
/// the tokio runtime of the first deposit marks each bucket's start, and parks while the
/// window is empty. The window therefore spans between `ttl` and `1.1 × ttl`.
///
/// It also implements tower's [`Budget`](tower::retry::budget::Budget), so it can bound a
/// plain `tower::retry::Retry` too.
///
/// ```
/// use meshkit::retry::{BudgetConfig, RetryBudget};
/// use std::time::Duration;
///
/// let budget = RetryBudget::new(BudgetConfig::Limited {
///     ratio: 0.5,
///     min_per_sec: 0,
///     ttl: Duration::from_secs(10),
/// })?;
/// for _ in 0..4 {
///     budget.deposit();
/// }
/// assert!(budget.withdraw());
/// assert!(budget.withdraw());
/// assert!(!budget.withdraw(), "four first tries at ratio 0.5 allow two retries");
/// let snapshot = budget.snapshot();
/// assert_eq!((snapshot.deposits, snapshot.withdrawals, snapshot.refusals), (4, 2, 1));
/// # Ok::<(), meshkit::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct RetryBudget {
    inner: Arc<Inner>,
}

/// Counts of a [`RetryBudget`] since it was created, and what it allows now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BudgetSnapshot {
    /// First tries recorded.
    pub deposits: u64,
    /// Retries and hedges allowed.
    pub withdrawals: u64,
    /// Retries and hedges refused.
    pub refusals: u64,
    /// Withdrawals the budget would allow right now; `None` when unlimited.
    pub available: Option<u64>,
}

/// A value on its own cache-line pair, at byte 64 of it.
///
/// Stripes sit at the start of 128-byte blocks. A load whose address matches a pending
/// store's in its low 12 bits is held back until the store completes ("4K aliasing"); the
/// stripes span 8 KiB, so a value at a multiple of 128 bytes always matches one of them. At
/// byte 64 it never does.
#[repr(C, align(128))]
struct OffStripe<T> {
    _before: [u8; 64],
    value: T,
}

impl<T> OffStripe<T> {
    fn new(value: T) -> Self {
        Self {
            _before: [0; 64],
            value,
        }
    }
}

impl<T> std::ops::Deref for OffStripe<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        &self.value
    }
}

struct Inner {
    deposits: StripedCounter,
    /// Read by every deposit, right after its store to a stripe: see [`OffStripe`].
    driver: OffStripe<AtomicU8>,
    withdrawals: CachePadded<AtomicU64>,
    refusals: AtomicU64,
    limit: Option<Limit>,
    wake: Arc<Notify>,
}

/// The bound of a limited budget and its window of bucket marks.
struct Limit {
    ratio: f64,
    /// `min_per_sec × ttl`: retries allowed whatever the traffic.
    reserve: u64,
    origin: Instant,
    bucket: Duration,
    /// The bucket whose start was last marked.
    epoch: AtomicU64,
    /// Totals at the start of each recent bucket, indexed by `epoch % MARKS`.
    marks: [Mark; MARKS],
    /// Held only to mark buckets (deposits and withdrawals never take it): the totals at the
    /// last mark.
    marking: Mutex<(u64, u64)>,
}

/// The totals at the start of bucket `epoch`, written under a sequence stamp: `epoch` when
/// complete, [`WRITING`] while being overwritten. Readers check the stamp before and after,
/// so they never mix two buckets' totals or take a bucket for another.
#[derive(Default)]
struct Mark {
    epoch: AtomicU64,
    deposits: AtomicU64,
    withdrawals: AtomicU64,
}

const WRITING: u64 = u64::MAX;

impl Mark {
    fn write(&self, epoch: u64, deposits: u64, withdrawals: u64) {
        self.epoch.store(WRITING, Ordering::Relaxed);
        fence(Ordering::Release);
        self.deposits.store(deposits, Ordering::Relaxed);
        self.withdrawals.store(withdrawals, Ordering::Relaxed);
        self.epoch.store(epoch, Ordering::Release);
    }

    /// The totals if this mark is complete and for bucket `epoch`.
    fn read(&self, epoch: u64) -> Option<(u64, u64)> {
        let before = self.epoch.load(Ordering::Acquire);
        let totals = (
            self.deposits.load(Ordering::Relaxed),
            self.withdrawals.load(Ordering::Relaxed),
        );
        fence(Ordering::Acquire);
        let after = self.epoch.load(Ordering::Relaxed);
        (before == epoch && after == epoch).then_some(totals)
    }
}

impl RetryBudget {
    /// A budget as `config` describes.
    ///
    /// Needs no runtime: the task that ages the window starts with the first deposit made on
    /// a tokio runtime.
    ///
    /// # Errors
    /// A [`ConfigError`] naming `ratio`, `min_per_sec` or `ttl` when out of range.
    pub fn new(config: BudgetConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let limit = match config {
            BudgetConfig::Unlimited => None,
            BudgetConfig::Limited {
                ratio,
                min_per_sec,
                ttl,
            } => Some(Limit {
                ratio,
                reserve: (f64::from(min_per_sec) * ttl.as_secs_f64()) as u64,
                origin: Instant::now(),
                bucket: ttl / BUCKETS_PER_TTL,
                epoch: AtomicU64::new(0),
                marks: Default::default(),
                marking: Mutex::new((0, 0)),
            }),
        };
        let driver = if limit.is_some() { NO_DRIVER } else { RUNNING };
        Ok(Self {
            inner: Arc::new(Inner {
                deposits: StripedCounter::default(),
                driver: OffStripe::new(AtomicU8::new(driver)),
                withdrawals: CachePadded::default(),
                refusals: AtomicU64::new(0),
                limit,
                wake: Arc::new(Notify::new()),
            }),
        })
    }

    /// A budget that never refuses (it still counts).
    pub fn unlimited() -> Self {
        Self::new(BudgetConfig::Unlimited).expect("an unlimited budget is always valid")
    }

    /// Records one first try.
    #[inline]
    pub fn deposit(&self) {
        self.inner.deposits.increment();
        if self.inner.driver.load(Ordering::Relaxed) != RUNNING {
            start_driver(&self.inner);
        }
    }

    /// Takes one retry from the budget: `true` if allowed (and counted), `false` if refused
    /// (also counted).
    pub fn withdraw(&self) -> bool {
        let inner = &*self.inner;
        let Some(limit) = &inner.limit else {
            inner.withdrawals.fetch_add(1, Ordering::AcqRel);
            return true;
        };
        if inner.driver.load(Ordering::Relaxed) != RUNNING {
            start_driver(&self.inner);
        }
        let Some((allowed, base_withdrawals)) = inner.allowance(limit, Instant::now()) else {
            inner.refusals.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        let mut withdrawals = inner.withdrawals.load(Ordering::Acquire);
        loop {
            if withdrawals.saturating_sub(base_withdrawals) >= allowed {
                inner.refusals.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            match inner.withdrawals.compare_exchange_weak(
                withdrawals,
                withdrawals + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(actual) => withdrawals = actual,
            }
        }
    }

    /// Counts since creation and the allowance right now.
    pub fn snapshot(&self) -> BudgetSnapshot {
        let inner = &*self.inner;
        let withdrawals = inner.withdrawals.load(Ordering::Acquire);
        let available = inner.limit.as_ref().map(|limit| {
            inner
                .allowance(limit, Instant::now())
                .map_or(0, |(allowed, base)| {
                    allowed.saturating_sub(withdrawals.saturating_sub(base))
                })
        });
        BudgetSnapshot {
            deposits: inner.deposits.sum(),
            withdrawals,
            refusals: inner.refusals.load(Ordering::Relaxed),
            available,
        }
    }
}

impl Inner {
    /// Withdrawals the window allows, and the withdrawal total at the window's start; `None`
    /// (treated as a refusal) if the window kept moving under the reader.
    fn allowance(&self, limit: &Limit, now: Instant) -> Option<(u64, u64)> {
        let (base_deposits, base_withdrawals) = self.window_base(limit, now)?;
        let recent = self.deposits.sum().saturating_sub(base_deposits);
        let allowed = (limit.ratio * recent as f64) as u64 + limit.reserve;
        Some((allowed, base_withdrawals))
    }

    /// The totals at the start of the window: the mark of the bucket `MARKS - 1` before the
    /// current one (all zero before that many buckets have passed).
    fn window_base(&self, limit: &Limit, now: Instant) -> Option<(u64, u64)> {
        for _ in 0..4 {
            let epoch = self.mark(limit, now);
            let first = epoch.saturating_sub(MARKS as u64 - 1);
            if let Some(totals) = limit.marks[(epoch as usize + 1) % MARKS].read(first) {
                return Some(totals);
            }
        }
        None
    }

    /// Marks the start of every bucket begun since the last mark; returns the current bucket.
    ///
    /// On time (the driver marks each bucket as it starts), a bucket's mark is the totals now.
    /// After a gap (the driver parked, or none runs), nothing says when in the gap the calls
    /// since the last mark happened: they are dated to the current bucket, which keeps them in
    /// the window as long as possible (never banks old first tries as fresh allowance for
    /// longer than one `ttl` past their time, and never lets a retry leave early).
    fn mark(&self, limit: &Limit, now: Instant) -> u64 {
        let target = limit.epoch_at(now);
        let current = limit.epoch.load(Ordering::Acquire);
        if target <= current {
            return current;
        }
        let Ok(mut last) = limit.marking.try_lock() else {
            return current;
        };
        let current = limit.epoch.load(Ordering::Acquire);
        if target <= current {
            return current;
        }
        let totals = (
            self.deposits.sum(),
            self.withdrawals.load(Ordering::Acquire),
        );
        let (deposits, withdrawals) = if target == current + 1 { totals } else { *last };
        *last = totals;
        let first = (current + 1).max(target.saturating_sub(MARKS as u64 - 1));
        for epoch in first..=target {
            limit.marks[epoch as usize % MARKS].write(epoch, deposits, withdrawals);
        }
        limit.epoch.store(target, Ordering::Release);
        target
    }

    /// Whether nothing was deposited or withdrawn within the window.
    fn window_is_empty(&self, limit: &Limit, now: Instant) -> bool {
        self.window_base(limit, now)
            .is_some_and(|(deposits, withdrawals)| {
                self.deposits.sum() == deposits
                    && self.withdrawals.load(Ordering::Acquire) == withdrawals
            })
    }

    /// Ages the window; returns when to do it next, and whether to park until then (or until
    /// a deposit wakes the driver, whichever comes first).
    fn drive(&self, now: Instant) -> Option<(Instant, bool)> {
        let limit = self.limit.as_ref()?;
        let epoch = self.mark(limit, now);
        if self.window_is_empty(limit, now) {
            self.driver.store(PARKED, Ordering::SeqCst);
            // A deposit that saw `RUNNING` just before the store above is usually caught here;
            // one that is not is marked when the park times out, one `ttl` later.
            if self.window_is_empty(limit, now) {
                return Some((now + limit.bucket * BUCKETS_PER_TTL, true));
            }
            self.driver.store(RUNNING, Ordering::SeqCst);
        }
        Some((limit.start_of(epoch + 1), false))
    }
}

impl Limit {
    fn epoch_at(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(elapsed / self.bucket.as_nanos()).unwrap_or(u64::MAX)
    }

    fn start_of(&self, epoch: u64) -> Instant {
        let nanos = self.bucket.as_nanos().saturating_mul(u128::from(epoch));
        self.origin + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Lets a parked driver notice that the budget is gone and exit.
        self.wake.notify_one();
    }
}

#[cold]
#[inline(never)]
fn start_driver(inner: &Arc<Inner>) {
    match inner.driver.load(Ordering::Acquire) {
        PARKED
            if inner
                .driver
                .compare_exchange(PARKED, RUNNING, Ordering::SeqCst, Ordering::Acquire)
                .is_ok() =>
        {
            inner.wake.notify_one();
        }
        NO_DRIVER => {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return;
            };
            if inner
                .driver
                .compare_exchange(NO_DRIVER, RUNNING, Ordering::SeqCst, Ordering::Acquire)
                .is_ok()
            {
                let alive = Alive(Arc::downgrade(inner));
                let (budget, wake) = (Arc::downgrade(inner), inner.wake.clone());
                runtime.spawn(async move {
                    let _alive = alive;
                    drive(budget, wake).await;
                });
            }
        }
        _ => {}
    }
}

async fn drive(budget: Weak<Inner>, wake: Arc<Notify>) {
    loop {
        // Hold the budget only while marking, so that dropping it ends this task.
        let next = match budget.upgrade() {
            Some(inner) => inner.drive(Instant::now()),
            None => return,
        };
        match next {
            Some((at, false)) => sleep_until(at).await,
            Some((at, true)) => {
                tokio::select! {
                    () = sleep_until(at) => {}
                    () = wake.notified() => {}
                }
            }
            None => return,
        }
    }
}

/// Marks the driver gone when its task ends or its runtime drops it, so that the next deposit
/// starts another.
struct Alive(Weak<Inner>);

impl Drop for Alive {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            inner.driver.store(NO_DRIVER, Ordering::SeqCst);
        }
    }
}

impl tower::retry::budget::Budget for RetryBudget {
    fn deposit(&self) {
        RetryBudget::deposit(self);
    }

    fn withdraw(&self) -> bool {
        RetryBudget::withdraw(self)
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let snapshot = self.snapshot();
        f.debug_struct("RetryBudget")
            .field("deposits", &snapshot.deposits)
            .field("withdrawals", &snapshot.withdrawals)
            .field("refusals", &snapshot.refusals)
            .field("available", &snapshot.available)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(ratio: f64, min_per_sec: u32, ttl_secs: u64) -> RetryBudget {
        RetryBudget::new(BudgetConfig::Limited {
            ratio,
            min_per_sec,
            ttl: Duration::from_secs(ttl_secs),
        })
        .unwrap()
    }

    fn withdraw_all(budget: &RetryBudget) -> u64 {
        let mut n = 0;
        while budget.withdraw() {
            n += 1;
        }
        n
    }

    #[tokio::test(start_paused = true)]
    async fn reserve_alone_allows_min_per_sec_times_ttl() {
        let budget = budget(0.2, 3, 10);
        assert_eq!(withdraw_all(&budget), 30);
        assert_eq!(budget.snapshot().refusals, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn withdrawals_leave_the_window_after_ttl() {
        let budget = budget(0.0, 1, 10);
        assert_eq!(withdraw_all(&budget), 10);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(withdraw_all(&budget), 0, "the first ten still count");
        tokio::time::sleep(Duration::from_millis(6_500)).await;
        assert_eq!(withdraw_all(&budget), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_leave_the_window_after_ttl() {
        let budget = budget(1.0, 0, 10);
        for _ in 0..5 {
            budget.deposit();
        }
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert_eq!(budget.snapshot().available, Some(5));
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        assert_eq!(budget.snapshot().available, Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_quiet_spell_does_not_bank_old_deposits() {
        let budget = budget(0.5, 0, 10);
        for _ in 0..1000 {
            budget.deposit();
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
        budget.deposit();
        budget.deposit();
        assert_eq!(withdraw_all(&budget), 1);
    }

    #[test]
    fn unlimited_never_refuses_but_counts() {
        let budget = RetryBudget::unlimited();
        budget.deposit();
        for _ in 0..100 {
            assert!(budget.withdraw());
        }
        let snapshot = budget.snapshot();
        assert_eq!(snapshot.withdrawals, 100);
        assert_eq!(snapshot.available, None);
    }

    #[derive(Clone, Debug)]
    enum Step {
        Deposit(u32),
        Withdraw(u32),
        Sleep(u64),
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            (1u32..40).prop_map(Step::Deposit),
            (1u32..15).prop_map(Step::Withdraw),
            (0u64..2_500).prop_map(Step::Sleep),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// Against a log of what happened and when: a withdrawal is never allowed beyond the
        /// allowance of the window (which spans `ttl` to `1.1 × ttl`), and never refused while
        /// well within it.
        #[test]
        fn withdrawals_stay_within_the_sliding_allowance(
            ratio in proptest::sample::select(vec![0.0, 0.1, 0.5, 1.0, 2.0]),
            min_per_sec in 0u32..4,
            ttl_secs in 1u64..5,
            steps in proptest::collection::vec(step(), 1..60),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .unwrap();
            runtime.block_on(async move {
                let ttl = Duration::from_secs(ttl_secs);
                let bucket = ttl / BUCKETS_PER_TTL;
                let reserve = u64::from(min_per_sec) * ttl_secs;
                let budget = budget(ratio, min_per_sec, ttl_secs);
                let start = Instant::now();
                let (mut deposits, mut withdrawals): (Vec<Duration>, Vec<Duration>) = (vec![], vec![]);
                let count = |log: &[Duration], now: Duration, span: Duration| {
                    log.iter().filter(|at| now.saturating_sub(**at) < span).count() as u64
                };
                for step in steps {
                    match step {
                        Step::Deposit(n) => {
                            for _ in 0..n {
                                budget.deposit();
                                deposits.push(start.elapsed());
                            }
                        }
                        Step::Withdraw(n) => {
                            for _ in 0..n {
                                let now = start.elapsed();
                                let allowed = budget.withdraw();
                                let wide = ttl + bucket * 2;
                                let narrow = ttl.saturating_sub(bucket);
                                let ceiling = (ratio * count(&deposits, now, wide) as f64) as u64 + reserve;
                                let floor = (ratio * count(&deposits, now, narrow) as f64) as u64 + reserve;
                                if allowed {
                                    assert!(
                                        count(&withdrawals, now, ttl) < ceiling,
                                        "allowed beyond the allowance at {now:?}"
                                    );
                                    withdrawals.push(now);
                                } else {
                                    assert!(
                                        count(&withdrawals, now, wide) >= floor,
                                        "refused within the allowance at {now:?}"
                                    );
                                }
                            }
                        }
                        Step::Sleep(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                    }
                }
            });
        }
    }
}
