//! flashsale-core: what the gateway, the workers, the payment stub and the
//! `flashsale` command share.
//!
//! Types that cannot hold invalid data (`ids`), the messages on the topics
//! (`messages`), the purchase state machine (`status`), settings, the Lua
//! stock scripts behind `stock`, the DynamoDB tables (`orders`,
//! `inventory`), the payment API, the consumer loop both workers run, and
//! the audit of DESIGN.md's invariants.

pub mod audit;
pub mod clock;
pub mod consume;
pub mod consumer_health;
pub mod dynamo;
pub mod ids;
pub mod inventory;
pub mod kafka;
pub mod lag;
pub mod line;
pub mod members;
pub mod messages;
pub mod ops;
pub mod orders;
pub mod partition_work;
pub mod payment;
pub mod problem;
pub mod recovery;
pub mod redis_conn;
pub mod retry;
pub mod settings;
pub mod status;
pub mod status_board;
pub mod stock;
pub mod topic_reader;
