//! A surge's progress while it runs: buyers sent, answered, accepted, shed
//! and decided, and the current rate. On a terminal, a live line
//! (indicatif); otherwise a plain line every few seconds, so a log or a CI
//! run shows the surge moving too.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The counts the surge's tasks bump as buyers go.
#[derive(Debug, Default)]
pub struct Counts {
    pub sent: AtomicU64,
    pub answered: AtomicU64,
    pub accepted: AtomicU64,
    pub shed: AtomicU64,
    pub decided: AtomicU64,
}

impl Counts {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn line(&self, rate: f64, buyers: u64) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "sent {}/{buyers}  {rate:.0}/s  answered {}  accepted {}  shed {}  decided {}",
            get(&self.sent),
            get(&self.answered),
            get(&self.accepted),
            get(&self.shed),
            get(&self.decided),
        )
    }
}

const TERMINAL_EVERY: Duration = Duration::from_millis(250);
const PLAIN_EVERY: Duration = Duration::from_secs(2);

/// Shows `counts` until `stop`, on stderr; `buyers`: the crowd's size.
pub fn show(
    counts: Arc<Counts>,
    buyers: u64,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let terminal = std::io::stderr().is_terminal();
        let bar = terminal.then(|| {
            let bar = ProgressBar::new(buyers);
            bar.set_style(
                ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar
        });
        let every = if terminal {
            TERMINAL_EVERY
        } else {
            PLAIN_EVERY
        };
        let started = Instant::now();
        let mut ticks = tokio::time::interval(every);
        let (mut last_sent, mut last_at) = (0u64, Instant::now());
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = ticks.tick() => {}
            }
            let sent = counts.sent.load(Ordering::Relaxed);
            let rate = (sent - last_sent) as f64 / last_at.elapsed().as_secs_f64().max(1e-3);
            (last_sent, last_at) = (sent, Instant::now());
            let line = counts.line(rate, buyers);
            match &bar {
                Some(bar) => {
                    bar.set_position(sent);
                    bar.set_message(line);
                }
                None => eprintln!("[surge {:>5.1}s] {line}", started.elapsed().as_secs_f64()),
            }
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_says_where_the_crowd_is() {
        let counts = Counts::default();
        Counts::bump(&counts.sent);
        Counts::bump(&counts.sent);
        Counts::bump(&counts.accepted);
        assert_eq!(
            counts.line(1500.0, 10),
            "sent 2/10  1500/s  answered 0  accepted 1  shed 0  decided 0"
        );
    }
}
