//! Which messages of each assigned partition are being worked on, and how
//! far each partition is done.
//!
//! A consumer may store the offset of the last message of an unbroken run,
//! from a partition's oldest message in flight, whose work succeeded: work
//! runs concurrently and finishes in any order, and a committed offset must
//! never pass a message whose effect is not durable. A message whose work
//! failed stays at the head of its partition for good, so nothing of that
//! partition is stored any more and the next owner starts again at it.
//!
//! Shared by the consumer loop, which stores offsets as work finishes, and
//! the rebalance callback, which runs inside the loop's poll: it waits for
//! the work of the partitions being revoked, stores and commits how far
//! they got, and forgets them, so that a completion arriving later cannot
//! store an offset for a partition another member now owns.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A topic and a partition of it.
pub type TopicPartition = (String, i32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Running,
    Succeeded,
    Failed,
}

#[derive(Debug, Default)]
pub struct PartitionWork {
    partitions: Mutex<HashMap<TopicPartition, BTreeMap<i64, Step>>>,
    changed: Condvar,
}

impl PartitionWork {
    fn lock(&self) -> MutexGuard<'_, HashMap<TopicPartition, BTreeMap<i64, Step>>> {
        // The map holds no invariant a panicking holder could break half-way.
        self.partitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Work on the message at `offset` began (messages of a partition
    /// begin in offset order).
    pub fn started(&self, partition: &TopicPartition, offset: i64) {
        self.lock()
            .entry(partition.clone())
            .or_default()
            .insert(offset, Step::Running);
    }

    /// Work on the message at `offset` ended. Ignored for a partition that
    /// was revoked (forgotten) meanwhile.
    pub fn finished(&self, partition: &TopicPartition, offset: i64, ok: bool) {
        let mut partitions = self.lock();
        if let Some(step) = partitions
            .get_mut(partition)
            .and_then(|steps| steps.get_mut(&offset))
        {
            *step = if ok { Step::Succeeded } else { Step::Failed };
        }
        drop(partitions);
        self.changed.notify_all();
    }

    /// The offset to store for `partition` now, if it moved: the last of
    /// the succeeded run at its head, which is then let go of.
    pub fn advance(&self, partition: &TopicPartition) -> Option<i64> {
        let mut partitions = self.lock();
        let steps = partitions.get_mut(partition)?;
        let mut last = None;
        while let Some(entry) = steps.first_entry() {
            if *entry.get() != Step::Succeeded {
                break;
            }
            last = Some(*entry.key());
            entry.remove();
        }
        last
    }

    /// Messages whose work has not ended, over every partition.
    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.lock()
            .values()
            .flat_map(|steps| steps.values())
            .filter(|step| **step == Step::Running)
            .count()
    }

    /// Blocks until no work of `partitions` is running, or `timeout`
    /// passed; `true` if none is. For the rebalance callback, which must
    /// return only once the revoked partitions are settled.
    pub fn wait_idle(&self, partitions: &[TopicPartition], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut guard = self.lock();
        loop {
            let running = partitions.iter().any(|partition| {
                guard
                    .get(partition)
                    .is_some_and(|steps| steps.values().any(|step| *step == Step::Running))
            });
            if !running {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            guard = self
                .changed
                .wait_timeout(guard, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Lets go of `partitions` (revoked): whatever of their work ends later
    /// is not stored by this member.
    pub fn forget(&self, partitions: &[TopicPartition]) {
        let mut guard = self.lock();
        for partition in partitions {
            guard.remove(partition);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: i32) -> TopicPartition {
        ("t".to_owned(), n)
    }

    #[test]
    fn a_partition_advances_over_its_succeeded_head_only() {
        let work = PartitionWork::default();
        for offset in 10..14 {
            work.started(&p(0), offset);
        }
        work.finished(&p(0), 11, true);
        assert_eq!(work.advance(&p(0)), None, "10 still runs");
        work.finished(&p(0), 10, true);
        assert_eq!(work.advance(&p(0)), Some(11));
        work.finished(&p(0), 12, false);
        work.finished(&p(0), 13, true);
        assert_eq!(work.advance(&p(0)), None, "12 failed: never passed");
        assert_eq!(work.in_flight(), 0);
    }

    #[test]
    fn a_forgotten_partition_stores_nothing_from_late_work() {
        let work = PartitionWork::default();
        work.started(&p(1), 5);
        work.started(&p(2), 7);
        assert!(!work.wait_idle(&[p(1)], Duration::from_millis(10)));
        work.forget(&[p(1)]);
        work.finished(&p(1), 5, true);
        assert_eq!(work.advance(&p(1)), None);
        assert!(work.wait_idle(&[p(1)], Duration::ZERO));
        assert_eq!(work.in_flight(), 1, "p2 still runs");
    }

    #[test]
    fn waiting_for_idle_wakes_when_the_work_ends() {
        let work = std::sync::Arc::new(PartitionWork::default());
        work.started(&p(0), 1);
        let other = work.clone();
        let finisher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            other.finished(&p(0), 1, true);
        });
        assert!(work.wait_idle(&[p(0)], Duration::from_secs(5)));
        finisher.join().expect("finisher");
        assert_eq!(work.advance(&p(0)), Some(1));
    }
}
