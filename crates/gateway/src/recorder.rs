//! Recording the gateway's arrivals to a trace file, so that a load test
//! can send a real surge again (`flashsale surge --replay FILE`), as
//! GoReplay does with traffic.
//!
//! One JSON line per well-formed purchase that arrived (refused or not):
//! `{"offset_ms": 12.345, "sku": "tv", "user": "ann", "quantity": 1,
//! "keyed": true}`, the offset from the first recorded arrival. Only the
//! ids the gateway already has; never a token, never a key.
//!
//! The request path only hands a line to a bounded queue; a thread of its
//! own writes it. A full queue drops the line (counted in
//! `gateway_trace_dropped_total`) rather than slow a buyer down.

use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use flashsale_core::arrival_trace::TraceLine;
use prometheus::IntCounter;

use crate::decision::Purchase;

/// How many lines may wait for the writer.
const QUEUE: usize = 65_536;

#[derive(Debug)]
pub struct Recorder {
    /// `None` asks the writer to flush now.
    lines: SyncSender<Option<TraceLine>>,
    first: OnceLock<Instant>,
    dropped: IntCounter,
}

impl Recorder {
    /// Appends to `path` (created if need be) until the recorder is
    /// dropped, when what is queued is written and the file flushed.
    pub fn open(path: &Path, dropped: IntCounter) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let (lines, queue) = mpsc::sync_channel::<Option<TraceLine>>(QUEUE);
        std::thread::Builder::new()
            .name("trace-writer".into())
            .spawn(move || write_lines(file, queue))?;
        Ok(Self {
            lines,
            first: OnceLock::new(),
            dropped,
        })
    }

    pub fn arrived(&self, purchase: &Purchase) {
        let first = *self.first.get_or_init(Instant::now);
        let offset = first.elapsed();
        let line = TraceLine {
            offset_ms: (offset.as_micros() as f64) / 1000.0,
            sku: purchase.sku.to_string(),
            user: purchase.user.to_string(),
            quantity: purchase.quantity.get(),
            keyed: purchase.keyed,
        };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.lines.try_send(Some(line))
        {
            self.dropped.inc();
        }
    }

    /// Flushes the file when `shutdown` comes, so that a gateway stopped
    /// leaves its whole trace.
    pub fn flush_on(&self, shutdown: tokio_util::sync::CancellationToken) {
        let lines = self.lines.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            let _ = tokio::task::spawn_blocking(move || lines.send(None)).await;
        });
    }
}

fn write_lines(file: std::fs::File, queue: mpsc::Receiver<Option<TraceLine>>) {
    let mut out = std::io::BufWriter::new(file);
    loop {
        match queue.recv_timeout(Duration::from_millis(200)) {
            Ok(None) => {
                let _ = out.flush();
            }
            Ok(Some(line)) => {
                if let Err(error) = serde_json::to_writer(&mut out, &line)
                    .map_err(std::io::Error::from)
                    .and_then(|()| out.write_all(b"\n"))
                {
                    tracing::warn!(%error, "the trace file cannot be written");
                }
            }
            // Quiet for a moment: what is written becomes readable.
            Err(RecvTimeoutError::Timeout) => {
                let _ = out.flush();
            }
            Err(RecvTimeoutError::Disconnected) => {
                let _ = out.flush();
                return;
            }
        }
    }
}
