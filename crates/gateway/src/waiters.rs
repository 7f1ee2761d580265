//! Long-polls waiting for a purchase's status to change, woken by the
//! changes the workers publish (`board::STATUS_CHANNEL`, followed by
//! `flags::follow` on the gateway's one subscription) instead of each
//! reading Redis again and again. Their number is bounded: beyond it a
//! long-poll is refused (`429`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use flashsale_core::ids::RequestId;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

pub struct Waiters {
    /// One wake-up per purchase waited on, shared by its long-polls, with
    /// how many there are.
    waiting: Mutex<HashMap<RequestId, (Arc<Notify>, usize)>>,
    room: Arc<Semaphore>,
    gauge: prometheus::IntGauge,
}

/// One long-poll's registration; unregisters when dropped.
pub struct Waiter {
    waiters: Arc<Waiters>,
    id: RequestId,
    notify: Arc<Notify>,
    _permit: OwnedSemaphorePermit,
}

impl Waiters {
    /// At most `limit` long-polls at once, counted in `gauge`.
    pub fn new(limit: usize, gauge: prometheus::IntGauge) -> Arc<Self> {
        Arc::new(Self {
            waiting: Mutex::new(HashMap::new()),
            room: Arc::new(Semaphore::new(limit)),
            gauge,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RequestId, (Arc<Notify>, usize)>> {
        // Counts and wake-ups only: a holder that panicked left them whole.
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a long-poll on `id`; `None` when as many wait as allowed.
    pub fn wait_on(self: &Arc<Self>, id: RequestId) -> Option<Waiter> {
        let permit = self.room.clone().try_acquire_owned().ok()?;
        let mut waiting = self.lock();
        let entry = waiting
            .entry(id)
            .or_insert_with(|| (Arc::new(Notify::new()), 0));
        entry.1 += 1;
        self.gauge.inc();
        Some(Waiter {
            waiters: self.clone(),
            id,
            notify: entry.0.clone(),
            _permit: permit,
        })
    }

    /// The status of `id` changed: its long-polls read it again.
    pub fn wake(&self, id: RequestId) {
        if let Some((notify, _)) = self.lock().get(&id) {
            notify.notify_waiters();
        }
    }

    /// Changes may have been missed (the subscription was down): every
    /// long-poll reads its status again.
    pub fn wake_all(&self) {
        for (notify, _) in self.lock().values() {
            notify.notify_waiters();
        }
    }
}

impl Waiter {
    /// The wake-up to arm before reading the status, so that a change
    /// between the read and the wait is not missed.
    pub fn notify(&self) -> &Notify {
        &self.notify
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.waiters.gauge.dec();
        let mut waiting = self.waiters.lock();
        if let Some(entry) = waiting.get_mut(&self.id) {
            entry.1 -= 1;
            if entry.1 == 0 {
                waiting.remove(&self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_change_wakes_its_waiters_and_the_bound_holds() {
        let gauge = prometheus::IntGauge::new("w", "w").expect("gauge");
        let waiters = Waiters::new(2, gauge.clone());
        let id = RequestId::fresh();
        let first = waiters.wait_on(id).expect("room");
        let second = waiters.wait_on(id).expect("room");
        assert!(waiters.wait_on(RequestId::fresh()).is_none(), "bounded");
        assert_eq!(gauge.get(), 2);
        {
            let woken = first.notify().notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            waiters.wake(RequestId::fresh());
            waiters.wake(id);
            woken.await;
        }
        drop(first);
        drop(second);
        assert_eq!(gauge.get(), 0);
        assert!(waiters.lock().is_empty(), "nothing left behind");
        assert!(waiters.wait_on(id).is_some(), "room again");
    }
}
