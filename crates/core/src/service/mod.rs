//! What every service is built on: its settings (`settings`), its Redis
//! connection (`redis_conn`), the endpoints operators use and how it stops
//! (`ops`), retrying with a deadline (`retry`), the problem answers of
//! its HTTP errors (`problem`), the layers around every HTTP server
//! (`layers`: request ids, request spans, panics answered), what its start
//! can fail on (`start`), and the skeleton both workers stand on (`worker`).

pub mod layers;
pub mod metrics;
pub mod ops;
pub mod problem;
pub mod redis_conn;
pub mod retry;
pub mod settings;
pub mod start;
pub mod worker;
