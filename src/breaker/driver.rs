//! The background task that moves a breaker through time even when no call arrives: it ends
//! open periods, times out probes and ticks time windows (parking when there is nothing to age).

use super::shared::Shared;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use tokio::sync::Notify;
use tokio::time::{sleep_until, Instant};

/// Marks the driver gone when its task ends or is dropped unpolled (runtime shut down), so
/// that the next slow-path call starts a new one and, meanwhile, no success skips the lock.
struct Alive(Weak<Shared>);

impl Drop for Alive {
    fn drop(&mut self) {
        if let Some(shared) = self.0.upgrade() {
            // Never takes the machine lock: this may run inside a spawn made under it.
            shared.driver_alive.store(false, Ordering::Release);
            shared.clear_fast();
            // Gate waiters were counting on this driver; let them poll again, which starts a
            // driver on their own runtime.
            shared.wake_waiters();
        }
    }
}

pub(crate) fn spawn(runtime: &tokio::runtime::Handle, shared: Weak<Shared>, notify: Arc<Notify>) {
    let alive = Alive(shared.clone());
    runtime.spawn(async move {
        let _alive = alive;
        run(shared, notify).await;
    });
}

async fn run(shared: Weak<Shared>, notify: Arc<Notify>) {
    loop {
        // Hold the breaker only while driving it, so that dropping it ends this task.
        let next = match shared.upgrade() {
            Some(shared) => shared.drive(Instant::now()),
            None => return,
        };
        match next {
            Some(deadline) => {
                tokio::select! {
                    () = sleep_until(deadline) => {}
                    () = notify.notified() => {}
                }
            }
            None => notify.notified().await,
        }
    }
}
