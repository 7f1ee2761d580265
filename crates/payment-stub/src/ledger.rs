//! The ledger: every charge and refund, appended to a file and flushed to
//! disk before it is answered, and replayed at start, so a restarted stub
//! still knows every charge it ever answered.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use flashsale_core::payment::{Charge, ChargeRequest, Refund};
use flashsale_core::service::problem::Problem;
use serde::{Deserialize, Serialize};

/// One line of the ledger file. Each lives only while it is written or
/// replayed, so the size of the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Entry {
    Charge {
        request: ChargeRequest,
        charge: Charge,
    },
    Refund {
        refund: Refund,
    },
}

pub(crate) struct Ledger {
    /// By idempotency key: the request as first sent, and its charge.
    pub(crate) charges: HashMap<String, (ChargeRequest, Charge)>,
    pub(crate) key_of_charge: HashMap<String, String>,
    pub(crate) refunds: HashMap<String, Refund>,
    pub(crate) next: u64,
    pub(crate) file: Option<Arc<Mutex<std::fs::File>>>,
}

impl Ledger {
    pub(crate) fn apply(&mut self, entry: Entry) {
        match entry {
            Entry::Charge { request, charge } => {
                let number = charge
                    .id
                    .trim_start_matches("ch_")
                    .parse::<u64>()
                    .unwrap_or(0);
                self.next = self.next.max(number + 1);
                self.key_of_charge
                    .insert(charge.id.clone(), charge.idempotency_key.clone());
                self.charges
                    .insert(charge.idempotency_key.clone(), (request, charge));
            }
            Entry::Refund { refund } => {
                if let Some((_, charge)) = self
                    .key_of_charge
                    .get(&refund.charge_id)
                    .and_then(|key| self.charges.get_mut(key))
                {
                    charge.refunded = true;
                }
                self.refunds.insert(refund.charge_id.clone(), refund);
            }
        }
    }

    /// Reads the ledger file back, or starts one.
    pub(crate) fn open(path: Option<&std::path::Path>) -> std::io::Result<Self> {
        let mut ledger = Self {
            charges: HashMap::new(),
            key_of_charge: HashMap::new(),
            refunds: HashMap::new(),
            next: 1,
            file: None,
        };
        let Some(path) = path else {
            return Ok(ledger);
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        match std::fs::read_to_string(path) {
            Ok(text) => {
                for (n, line) in text.lines().enumerate() {
                    match serde_json::from_str::<Entry>(line) {
                        Ok(entry) => ledger.apply(entry),
                        // A line cut short by a crash mid-write was never
                        // answered: nobody knows of it.
                        Err(error) => {
                            tracing::warn!(line = n + 1, %error, "skipping a torn ledger line")
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        ledger.file = Some(Arc::new(Mutex::new(file)));
        tracing::info!(path = %path.display(), charges = ledger.charges.len(), "payment ledger loaded");
        Ok(ledger)
    }

    /// Writes `entry` to the ledger file and flushes it to disk: nothing is
    /// answered that a restart would forget.
    pub(crate) async fn persist(&self, entry: &Entry) -> Result<(), Problem> {
        let Some(file) = self.file.clone() else {
            return Ok(());
        };
        let mut line = serde_json::to_vec(entry).map_err(|e| ledger_down(e.to_string()))?;
        line.push(b'\n');
        let written = tokio::task::spawn_blocking(move || {
            let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
            file.write_all(&line)?;
            file.sync_data()
        })
        .await;
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ledger_down(e.to_string())),
            Err(e) => Err(ledger_down(e.to_string())),
        }
    }
}

pub(crate) fn ledger_down(error: String) -> Problem {
    tracing::error!(%error, "cannot write the payment ledger");
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the payment ledger is unavailable",
    )
    .retry_after(1)
}
