//! Where a queued purchase stands: how many purchases of its partition the
//! shop-workers have still to answer before it. The record's offset comes
//! from the broker's acknowledgement (kept on the status board); the
//! shop-workers' progress is their group's committed offset, read at most
//! every `MAX_AGE` however many buyers ask.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use flashsale_core::bus::kafka::KafkaFailure;
use flashsale_core::bus::topic_reader::GroupProgress;
use tokio::sync::Mutex;

const MAX_AGE: Duration = Duration::from_millis(250);

pub struct QueueWatch {
    progress: GroupProgress,
    last: Mutex<Option<(Instant, HashMap<i32, i64>)>>,
}

impl QueueWatch {
    pub fn new(progress: GroupProgress) -> Self {
        Self {
            progress,
            last: Mutex::new(None),
        }
    }

    /// 1 when the purchase's record is the next one a shop-worker takes
    /// from its partition; `None` when the progress cannot be read.
    pub async fn position(&self, partition: i32, offset: i64) -> Option<u64> {
        let mut last = self.last.lock().await;
        let fresh = matches!(&*last, Some((at, _)) if at.elapsed() < MAX_AGE);
        if !fresh {
            match self.read().await {
                Ok(committed) => *last = Some((Instant::now(), committed)),
                Err(error) => {
                    tracing::debug!(%error, "shop-worker progress unreadable");
                    return None;
                }
            }
        }
        // Nothing committed on the partition yet: no way to tell.
        let next = last
            .as_ref()
            .and_then(|(_, committed)| committed.get(&partition).copied())?;
        Some((offset - next + 1).max(1) as u64)
    }

    async fn read(&self) -> Result<HashMap<i32, i64>, KafkaFailure> {
        Ok(self
            .progress
            .committed()
            .await?
            .into_iter()
            .filter_map(|(partition, offset)| offset.map(|o| (partition, o)))
            .collect())
    }
}
