//! What every service is built on: its settings (`settings`), its Redis
//! connection (`redis_conn`), the endpoints operators use and how it stops
//! (`ops`), retrying with a deadline (`retry`), and the problem answers of
//! its HTTP errors (`problem`).

pub mod ops;
pub mod problem;
pub mod redis_conn;
pub mod retry;
pub mod settings;
