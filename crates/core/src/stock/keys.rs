//! Where a sku's stock lives in Redis: the keys of one sku, all under its
//! `{sku}` hash tag, and the channels its changes are published on.

use super::*;

/// Where the scripts publish "<sku> <sold_out> <closed> <line_full>
/// <ends_at_ms>" (flags `0` or `1`) whenever one of a sku's flags changes
/// (`lua/flags.lua`).
/// Outside any hash tag: Redis Cluster forwards a publish to every node.
pub const FLAGS_CHANNEL: &str = "fs:sku-flags";

/// Where `admit.lua` publishes "<sku> <request id>" for every purchase it
/// lets in, and `open.lua` "<sku> *" when a new sale starts afresh: what
/// lets a gateway answer a repeated POST for a full sku from memory.
pub const ADMITTED_CHANNEL: &str = "fs:admitted";

/// The keys of one sku. `{sku}` is the Redis Cluster hash tag.
#[derive(Debug)]
pub struct SkuKeys(String);

impl SkuKeys {
    pub fn new(sku: &Sku) -> Self {
        Self(format!("fs:{{{sku}}}"))
    }
    pub fn stock(&self) -> String {
        format!("{}:stock", self.0)
    }
    pub fn users(&self) -> String {
        format!("{}:users", self.0)
    }
    /// Sorted set of reserved request ids, scored by deadline.
    pub fn deadlines(&self) -> String {
        format!("{}:deadlines", self.0)
    }
    pub fn processed(&self, id: RequestId) -> String {
        format!("{}:req:{id}", self.0)
    }
    pub fn reservation_prefix(&self) -> String {
        format!("{}:res:", self.0)
    }
    pub fn reservation(&self, id: RequestId) -> String {
        format!("{}{id}", self.reservation_prefix())
    }
    pub fn sweep(&self, sweep_id: &str) -> String {
        format!("{}:sweep:{sweep_id}", self.0)
    }
    pub fn restock(&self, operation_id: &str) -> String {
        format!("{}:restock:{operation_id}", self.0)
    }
    /// Sorted set of request ids the gateways let into the queue and no
    /// shop-worker has answered yet, scored by when (`admit.lua`).
    pub fn admitted(&self) -> String {
        format!("{}:admitted", self.0)
    }
    /// Every request id admitted in this sale (`lua/line.lua` derives the
    /// line's keys from the stock hash's name the same way).
    pub fn admitted_ever(&self) -> String {
        format!("{}:admitted:ever", self.0)
    }
    /// Sorted set of the request ids waiting in the sku's line, by place.
    pub fn line(&self) -> String {
        format!("{}:line", self.0)
    }
    /// Request id -> "<user> <quantity>" of a waiter, until announced.
    pub fn line_who(&self) -> String {
        format!("{}:line:who", self.0)
    }
    /// Request id -> when its buyer last asked for it (ms).
    pub fn line_seen(&self) -> String {
        format!("{}:line:seen", self.0)
    }
    /// Decided waiters still to be announced, by when the sweep should.
    pub fn line_out(&self) -> String {
        format!("{}:line:out", self.0)
    }
}
