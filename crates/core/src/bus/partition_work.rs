//! Which messages of each assigned partition are being worked on, how far
//! each partition is done, and how far that was committed.
//!
//! A consumer may commit past the last message of an unbroken run, from a
//! partition's oldest message in flight, whose work succeeded: work runs
//! concurrently and finishes in any order, and a committed offset must
//! never pass a message whose effect is not durable. A message whose work
//! failed stays at the head of its partition for good, so nothing of that
//! partition is committed any more and the next owner starts again at it.
//!
//! Shared by the consumer loop, whose tasks record their ends here, the
//! committer, which commits what is done every so often, and the rebalance
//! callback, which runs inside the loop's poll: it waits for the work of
//! the partitions being revoked, commits how far they got, and forgets
//! them. Each assignment of a partition is an epoch of its own: the end of
//! work begun under an earlier one (a partition revoked, or lost, and given
//! back) never counts for the current one.

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

/// One assignment of a partition to this member.
#[derive(Debug)]
struct Assigned {
    epoch: u64,
    steps: BTreeMap<i64, Step>,
    /// The next offset to read after the succeeded run at the head: what
    /// a commit would say.
    done: Option<i64>,
    /// What this member last committed for it.
    committed: Option<i64>,
}

#[derive(Debug, Default)]
struct State {
    epochs: u64,
    partitions: HashMap<TopicPartition, Assigned>,
}

/// A message whose work began: what its end is recorded against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub partition: TopicPartition,
    pub offset: i64,
    epoch: u64,
}

#[derive(Debug, Default)]
pub struct PartitionWork {
    state: Mutex<State>,
    changed: Condvar,
    /// Held across a commit and the reading of what it commits, so that a
    /// commit under way finishes before a revocation forgets its partitions
    /// (and none begins for a partition already forgotten).
    committing: Mutex<()>,
}

impl PartitionWork {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The map holds no invariant a panicking holder could break half-way.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Work on the message at `offset` began (messages of a partition
    /// begin in offset order).
    pub fn started(&self, partition: &TopicPartition, offset: i64) -> Ticket {
        let mut state = self.lock();
        let State { epochs, partitions } = &mut *state;
        let assigned = partitions.entry(partition.clone()).or_insert_with(|| {
            *epochs += 1;
            Assigned {
                epoch: *epochs,
                steps: BTreeMap::new(),
                done: None,
                committed: None,
            }
        });
        assigned.steps.insert(offset, Step::Running);
        Ticket {
            partition: partition.clone(),
            offset,
            epoch: assigned.epoch,
        }
    }

    /// Work on a message ended. `false` if it began under an assignment
    /// of its partition that has ended since (the end is ignored).
    pub fn finished(&self, ticket: &Ticket, ok: bool) -> bool {
        let mut state = self.lock();
        let current = match state
            .partitions
            .get_mut(&ticket.partition)
            .filter(|assigned| assigned.epoch == ticket.epoch)
            .and_then(|assigned| assigned.steps.get_mut(&ticket.offset))
        {
            Some(step) => {
                *step = if ok { Step::Succeeded } else { Step::Failed };
                true
            }
            None => false,
        };
        drop(state);
        self.changed.notify_all();
        current
    }

    /// Commits, with `commit`, how far each partition (of `only`, or all)
    /// is done where that is past what was committed; `commit` says
    /// whether it went through. Returns the number of partitions committed.
    pub fn commit_done(
        &self,
        only: Option<&[TopicPartition]>,
        commit: impl FnOnce(&[(TopicPartition, i64)]) -> bool,
    ) -> usize {
        let _one_at_a_time = self
            .committing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let due = self.due(only);
        if due.is_empty() || !commit(&due) {
            return 0;
        }
        let mut state = self.lock();
        for (partition, offset) in &due {
            if let Some(assigned) = state.partitions.get_mut(partition) {
                assigned.committed = Some(*offset);
            }
        }
        due.len()
    }

    /// The next offset to read of each partition (of `only`, or all) whose
    /// succeeded head moved past what was committed.
    fn due(&self, only: Option<&[TopicPartition]>) -> Vec<(TopicPartition, i64)> {
        let mut state = self.lock();
        let mut due = Vec::new();
        for (partition, assigned) in state.partitions.iter_mut() {
            if only.is_some_and(|only| !only.contains(partition)) {
                continue;
            }
            while let Some(entry) = assigned.steps.first_entry() {
                if *entry.get() != Step::Succeeded {
                    break;
                }
                assigned.done = Some(*entry.key() + 1);
                entry.remove();
            }
            if let Some(done) = assigned.done
                && assigned.committed < Some(done)
            {
                due.push((partition.clone(), done));
            }
        }
        due.sort();
        due
    }

    /// Messages whose work has not ended, over every partition.
    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.lock()
            .partitions
            .values()
            .flat_map(|assigned| assigned.steps.values())
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
                guard.partitions.get(partition).is_some_and(|assigned| {
                    assigned.steps.values().any(|step| *step == Step::Running)
                })
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

    /// Lets go of `partitions` (revoked or lost): whatever of their work
    /// ends later counts for nothing, and nothing of them is committed.
    pub fn forget(&self, partitions: &[TopicPartition]) {
        let _no_commit_under_way = self
            .committing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut state = self.lock();
        for partition in partitions {
            state.partitions.remove(partition);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: i32) -> TopicPartition {
        ("t".to_owned(), n)
    }

    /// What `commit_done` would commit now (and then counts committed).
    fn commit(work: &PartitionWork) -> Vec<(TopicPartition, i64)> {
        let mut seen = Vec::new();
        work.commit_done(None, |due| {
            seen = due.to_vec();
            true
        });
        seen
    }

    #[test]
    fn a_partition_is_committed_over_its_succeeded_head_only() {
        let work = PartitionWork::default();
        let tickets: Vec<Ticket> = (10..14).map(|offset| work.started(&p(0), offset)).collect();
        work.finished(&tickets[1], true);
        assert_eq!(commit(&work), vec![], "10 still runs");
        work.finished(&tickets[0], true);
        assert_eq!(commit(&work), vec![(p(0), 12)], "the next offset to read");
        assert_eq!(commit(&work), vec![], "already committed");
        work.finished(&tickets[2], false);
        work.finished(&tickets[3], true);
        assert_eq!(commit(&work), vec![], "12 failed: never passed");
        assert_eq!(work.in_flight(), 0);
    }

    #[test]
    fn a_commit_that_did_not_go_through_is_made_again() {
        let work = PartitionWork::default();
        let ticket = work.started(&p(0), 3);
        work.finished(&ticket, true);
        assert_eq!(work.commit_done(None, |_| false), 0);
        assert_eq!(commit(&work), vec![(p(0), 4)]);
    }

    #[test]
    fn only_the_partitions_asked_for_are_committed() {
        let work = PartitionWork::default();
        for n in 0..2 {
            let ticket = work.started(&p(n), 0);
            work.finished(&ticket, true);
        }
        let mut seen = Vec::new();
        work.commit_done(Some(&[p(1)]), |due| {
            seen = due.to_vec();
            true
        });
        assert_eq!(seen, vec![(p(1), 1)]);
        assert_eq!(commit(&work), vec![(p(0), 1)]);
    }

    #[test]
    fn a_forgotten_partition_commits_nothing_from_late_work() {
        let work = PartitionWork::default();
        let late = work.started(&p(1), 5);
        work.started(&p(2), 7);
        assert!(!work.wait_idle(&[p(1)], Duration::from_millis(10)));
        work.forget(&[p(1)]);
        assert!(!work.finished(&late, true), "its partition was let go of");
        assert_eq!(commit(&work), vec![]);
        assert!(work.wait_idle(&[p(1)], Duration::ZERO));
        assert_eq!(work.in_flight(), 1, "p2 still runs");
    }

    #[test]
    fn work_begun_before_a_partition_came_back_does_not_count_for_it() {
        let work = PartitionWork::default();
        let old = work.started(&p(0), 5);
        work.forget(&[p(0)]);
        // Given back, the partition is read again from its committed offset.
        let new = work.started(&p(0), 5);
        assert!(!work.finished(&old, false), "the old assignment's failure");
        assert_eq!(work.in_flight(), 1, "the new run of 5 still runs");
        assert!(work.finished(&new, true));
        assert_eq!(commit(&work), vec![(p(0), 6)]);
    }

    #[test]
    fn waiting_for_idle_wakes_when_the_work_ends() {
        let work = std::sync::Arc::new(PartitionWork::default());
        let ticket = work.started(&p(0), 1);
        let other = work.clone();
        let finisher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            other.finished(&ticket, true);
        });
        assert!(work.wait_idle(&[p(0)], Duration::from_secs(5)));
        finisher.join().expect("finisher");
        assert_eq!(commit(&work), vec![(p(0), 2)]);
    }
}
