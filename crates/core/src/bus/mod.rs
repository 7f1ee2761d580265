//! Kafka, the pipeline's bus: the producer every stage sends with and the
//! topics it creates (`kafka`), the records on them (`messages`), the
//! consumer loop both workers run (`consumer`, with `partition_work` for
//! how far each partition is done, `frozen` for a member that was stopped
//! and `consumer_health` for whether a member does its job), who is in a group (`members`), and reading a
//! topic as data (`topic_reader`, `lag`).

pub mod consumer;
pub mod consumer_health;
pub mod frozen;
pub mod kafka;
pub mod lag;
pub mod members;
pub mod messages;
pub mod partition_work;
pub mod topic_reader;
