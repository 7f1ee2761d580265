//! flashsale-core: what the gateway, the workers, the payment stub and the
//! `flashsale` command share, one folder per concept (ARCHITECTURE.md has
//! the map):
//!
//! * `ids`: identifiers and quantities that cannot hold invalid data;
//! * `stock`: the stock of each sku in Redis, changed only by its Lua
//!   scripts, and telling buyers what a script decided (`herald`);
//! * `dynamo`: the DynamoDB tables, `orders` and `inventory`;
//! * `bus`: Kafka: producing, the consumer loop both workers run, the
//!   records on the topics, reading a topic as data, group lag and health;
//! * `status`: the purchase state machine and the board buyers read;
//! * `payment`: the payment service's API and client;
//! * `arrival_trace`: the trace of a surge's arrivals the gateway records
//!   and `flashsale surge --replay` sends again;
//! * `service`: what every service is built on: settings, the Redis
//!   connection, health and metrics endpoints, retries, problem answers,
//!   the start-up skeleton.
//!
//! The audit and the rebuild after a lost Redis, which only people run,
//! live with the `flashsale` command (`crates/cli`).

pub mod arrival_trace;
pub mod bus;
pub mod clock;
pub mod dynamo;
pub mod ids;
pub mod payment;
pub mod service;
pub mod status;
pub mod stock;
