//! The store: runs the stock scripts (`lua/`) against a sku's keys, and
//! nothing else changes a sku's stock.

use super::*;

macro_rules! script {
    ($name:ident, $file:literal) => {
        static $name: std::sync::LazyLock<redis::Script> =
            std::sync::LazyLock::new(|| redis::Script::new(include_str!($file)));
    };
    // A script that shares helpers with others gets them prepended: the
    // ones that publish a flip of a sku's flags (see `FLAGS_CHANNEL`), and
    // the line's (`lua/line.lua`), which need the former.
    ($name:ident, $file:literal, with flags) => {
        static $name: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(concat!(include_str!("lua/flags.lua"), include_str!($file)))
        });
    };
    ($name:ident, $file:literal, with line) => {
        static $name: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(concat!(
                include_str!("lua/flags.lua"),
                include_str!("lua/line.lua"),
                include_str!($file)
            ))
        });
    };
}

script!(OPEN, "lua/open.lua", with line);
script!(RESERVE, "lua/reserve.lua", with line);
script!(COMMIT, "lua/commit.lua", with line);
script!(RELEASE, "lua/release.lua", with line);
script!(EXPIRE, "lua/expire.lua", with line);
script!(RESTOCK, "lua/restock.lua", with line);
script!(CLOSE, "lua/close.lua", with flags);
script!(STATUS, "lua/status.lua", with line);
script!(ADMIT, "lua/admit.lua", with line);
script!(SERVE, "lua/serve.lua", with line);
script!(LINE_PLACE, "lua/line_place.lua", with line);
script!(WITHDRAW, "lua/withdraw.lua");
script!(VOID, "lua/void.lua", with line);
script!(RESTORE, "lua/restore.lua", with line);

/// How long a sweep remembers what it released, for a retry after a lost
/// reply; sweeps are retried within seconds.
pub(crate) const SWEEP_MARKER_MS: u64 = 10 * 60 * 1000;

/// Opens a connection as the settings say (single Redis or cluster).
pub async fn connect(settings: &RedisSettings) -> Result<RedisConn, StockError> {
    Ok(redis_conn::connect(settings).await?)
}

#[derive(Debug, Clone)]
pub struct StockStore {
    conn: RedisConn,
    retention_ms: u64,
    /// The set of skus with a sale: what the sweep walks
    /// (`RedisSettings::sales_key`). Outside any sku's hash tag, and written
    /// only by plain `SADD`, never by a script.
    sales_key: String,
}

impl StockStore {
    /// The connection the store uses, for what shares its Redis.
    pub fn connection(&self) -> &RedisConn {
        &self.conn
    }
}

impl StockStore {
    pub fn new(conn: RedisConn, settings: &RedisSettings) -> Self {
        Self {
            conn,
            retention_ms: settings.retention.as_millis() as u64,
            sales_key: settings.sales_key.clone(),
        }
    }

    /// Whether Redis answers: the readiness probe.
    pub async fn ping(&self) -> Result<(), StockError> {
        redis::cmd("PING")
            .query_async::<String>(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Opens a fresh sale of `sku`, replacing whatever Redis held for it.
    pub async fn open_sale(&self, sku: &Sku, rules: &SaleRules) -> Result<OpenOutcome, StockError> {
        let mut conn = self.conn.clone();
        // Registered first: a sku in the registry without stock is skipped
        // by the sweep, while stock without registration would never expire.
        conn.sadd::<_, _, ()>(&self.sales_key, sku.as_str()).await?;
        let keys = SkuKeys::new(sku);
        let mut open = OPEN.key(keys.stock());
        open.key(keys.users()).key(keys.deadlines());
        let reply: Vec<String> = rule_args(&mut open, rules)
            // The draw among early buyers is fair only if nobody can
            // compute tickets: a random salt, never shown.
            .arg(uuid::Uuid::new_v4().simple().to_string())
            .arg(self.retention_ms)
            .invoke_async(&mut conn)
            .await?;
        match reply.first().map(String::as_str) {
            Some("opened") => Ok(OpenOutcome::Opened),
            Some("unchanged") => Ok(OpenOutcome::Unchanged),
            _ => unexpected(&reply),
        }
    }

    /// Every sku that has had a sale here: what the sweep walks.
    pub async fn sale_skus(&self) -> Result<Vec<Sku>, StockError> {
        let raw: Vec<String> = self.conn.clone().smembers(&self.sales_key).await?;
        Ok(raw.iter().filter_map(|s| Sku::parse(s).ok()).collect())
    }

    pub async fn status(&self, sku: &Sku, now_ms: u64) -> Result<Option<SkuStatus>, StockError> {
        let keys = SkuKeys::new(sku);
        let reply: Vec<String> = STATUS
            .key(keys.stock())
            .key(keys.deadlines())
            .key(keys.admitted())
            .arg(now_ms)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(SkuStatus::from_reply(reply))
    }

    pub async fn levels(&self, sku: &Sku) -> Result<Option<StockLevels>, StockError> {
        Ok(self
            .status(sku, crate::clock::now_ms())
            .await?
            .map(|status| status.levels))
    }

    /// The sku's flags, `None` when Redis holds no stock for it: what a
    /// gateway rereads when it may have missed a published change.
    pub async fn flags(&self, sku: &Sku) -> Result<Option<SkuFlags>, StockError> {
        let mut conn = self.conn.clone();
        let read: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(SkuKeys::new(sku).stock())
            .arg(&["total", "sold_out", "closed", "line_full", "ends_at_ms"])
            .query_async(&mut conn)
            .await?;
        let field = |i: usize| read.get(i).and_then(|v| v.as_deref());
        let set = |i: usize| field(i) == Some("1");
        Ok(field(0).map(|_| SkuFlags {
            sold_out: set(1),
            closed: set(2),
            line_full: set(3),
            ends_at_ms: field(4).and_then(|v| v.parse().ok()).unwrap_or(0),
        }))
    }

    /// Every request id the gateways admitted in the sku's current sale.
    pub async fn admitted_ever(&self, sku: &Sku) -> Result<Vec<RequestId>, StockError> {
        let raw: Vec<String> = self
            .conn
            .clone()
            .smembers(SkuKeys::new(sku).admitted_ever())
            .await?;
        Ok(raw
            .iter()
            .filter_map(|id| RequestId::parse(id).ok())
            .collect())
    }

    /// Lets request `id` into the sku's line if there is room
    /// (`admit.lua`). `lease_ms`: how long an admitted request may stay
    /// unseen by a shop-worker before the line forgets it. `now_ms`: `None`
    /// for Redis's own clock (what gateways use: theirs may disagree).
    pub async fn admit(
        &self,
        sku: &Sku,
        id: RequestId,
        now_ms: Option<u64>,
        lease_ms: u64,
    ) -> Result<Admission, StockError> {
        let keys = SkuKeys::new(sku);
        let reply: Vec<String> = ADMIT
            .key(keys.stock())
            .key(keys.admitted())
            .key(keys.processed(id))
            .arg(id.to_string())
            .arg(now_ms.map(|n| n.to_string()).unwrap_or_default())
            .arg(lease_ms)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Admission::from_reply(sku, reply)
    }

    /// Makes sure purchase `id`, whose buyer is to be answered with a
    /// failure, is never processed later (`void.lua`), unless a
    /// shop-worker answered it already: `Ok(None)` when voided, else its
    /// answer.
    pub async fn void(
        &self,
        sku: &Sku,
        id: RequestId,
        now_ms: u64,
    ) -> Result<Option<ReserveOutcome>, StockError> {
        let keys = SkuKeys::new(sku);
        let reply: Vec<String> = VOID
            .key(keys.stock())
            .key(keys.processed(id))
            .arg(id.to_string())
            .arg(now_ms)
            .arg(self.retention_ms)
            .invoke_async(&mut self.conn.clone())
            .await?;
        match reply.as_slice() {
            [kind] if kind == "voided" => Ok(None),
            [kind, answer] if kind == "processed" => {
                match serde_json::from_str::<Vec<String>>(answer) {
                    Ok(answer) => Ok(Some(ReserveOutcome::from_reply(sku, answer)?)),
                    Err(_) => unexpected(&reply),
                }
            }
            _ => unexpected(&reply),
        }
    }

    /// Gives back the place of an admitted request that never reached
    /// Kafka (the produce failed).
    pub async fn unadmit(&self, sku: &Sku, id: RequestId) -> Result<(), StockError> {
        self.conn
            .clone()
            .zrem::<_, _, ()>(SkuKeys::new(sku).admitted(), id.to_string())
            .await?;
        Ok(())
    }

    /// The keys and arguments of `reserve.lua` for one request.
    fn reserve_call(
        &self,
        request: &PurchaseRequest,
        now_ms: u64,
        max_queue_age_ms: u64,
    ) -> ([String; 6], [String; 8]) {
        let keys = SkuKeys::new(&request.sku);
        let id = request.request_id;
        (
            [
                keys.stock(),
                keys.users(),
                keys.processed(id),
                keys.reservation(id),
                keys.deadlines(),
                keys.admitted(),
            ],
            [
                id.to_string(),
                request.user_id.to_string(),
                request.quantity.get().to_string(),
                now_ms.to_string(),
                request.accepted_at_ms.to_string(),
                max_queue_age_ms.to_string(),
                self.retention_ms.to_string(),
                SERVE_LIMIT.to_string(),
            ],
        )
    }

    pub async fn reserve(
        &self,
        request: &PurchaseRequest,
        now_ms: u64,
        max_queue_age_ms: u64,
    ) -> Result<Answered<ReserveOutcome>, StockError> {
        let (keys, args) = self.reserve_call(request, now_ms, max_queue_age_ms);
        let reply = RESERVE
            .key(&keys)
            .arg(&args)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Answered::parse(&request.sku, reply, |answer| {
            ReserveOutcome::from_reply(&request.sku, answer)
        })
    }

    /// Reserves many requests in one round trip (`EVALSHA`s in a pipeline,
    /// the script loaded first). Each is still its own atomic script, run in
    /// order; on a cluster, all requests must be of one sku.
    pub async fn reserve_pipelined(
        &self,
        requests: &[PurchaseRequest],
        now_ms: u64,
        max_queue_age_ms: u64,
    ) -> Result<Vec<Result<Answered<ReserveOutcome>, StockError>>, StockError> {
        let mut conn = self.conn.clone();
        RESERVE.prepare_invoke().load_async(&mut conn).await?;
        let mut pipe = redis::pipe();
        for request in requests {
            let (keys, args) = self.reserve_call(request, now_ms, max_queue_age_ms);
            pipe.cmd("EVALSHA")
                .arg(RESERVE.get_hash())
                .arg(keys.len())
                .arg(&keys)
                .arg(&args);
        }
        let replies: Vec<(Vec<String>, Vec<String>)> = pipe.query_async(&mut conn).await?;
        Ok(requests
            .iter()
            .zip(replies)
            .map(|(request, reply)| {
                Answered::parse(&request.sku, reply, |answer| {
                    ReserveOutcome::from_reply(&request.sku, answer)
                })
            })
            .collect())
    }

    pub async fn commit(
        &self,
        sku: &Sku,
        id: RequestId,
        now_ms: u64,
    ) -> Result<Answered<CommitOutcome>, StockError> {
        let keys = SkuKeys::new(sku);
        let reply = COMMIT
            .key(keys.stock())
            .key(keys.deadlines())
            .key(keys.reservation(id))
            .arg(id.to_string())
            .arg(now_ms)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Answered::parse(sku, reply, |answer| CommitOutcome::from_reply(sku, answer))
    }

    /// Settles reservation `id` as never to be sold, unless it was sold
    /// already (`withdraw.lua`).
    pub async fn withdraw(
        &self,
        sku: &Sku,
        id: RequestId,
        reason: &str,
    ) -> Result<WithdrawOutcome, StockError> {
        let keys = SkuKeys::new(sku);
        let reply: Vec<String> = WITHDRAW
            .key(keys.stock())
            .key(keys.reservation(id))
            .arg(reason)
            .invoke_async(&mut self.conn.clone())
            .await?;
        WithdrawOutcome::from_reply(sku, reply)
    }

    pub async fn release(
        &self,
        sku: &Sku,
        id: RequestId,
        reason: &str,
        now_ms: u64,
    ) -> Result<Answered<ReleaseOutcome>, StockError> {
        let keys = SkuKeys::new(sku);
        let reply = RELEASE
            .key(keys.stock())
            .key(keys.users())
            .key(keys.deadlines())
            .key(keys.reservation(id))
            .arg(id.to_string())
            .arg(reason)
            .arg(now_ms)
            .arg(SERVE_LIMIT)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Answered::parse(sku, reply, |answer| ReleaseOutcome::from_reply(sku, answer))
    }

    /// Releases up to `limit` reservations whose deadline is before `now`.
    /// Retry a failed call with the same `sweep_id`: a sweep whose reply was
    /// lost answers the same list again.
    pub async fn expire(
        &self,
        sku: &Sku,
        sweep_id: &str,
        now_ms: u64,
        limit: usize,
    ) -> Result<Answered<Vec<Expired>>, StockError> {
        let keys = SkuKeys::new(sku);
        let reply = EXPIRE
            .key(keys.stock())
            .key(keys.users())
            .key(keys.deadlines())
            .key(keys.sweep(sweep_id))
            .arg(now_ms)
            .arg(limit)
            .arg(keys.reservation_prefix())
            .arg(SWEEP_MARKER_MS)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Answered::parse(sku, reply, expired_from_reply)
    }

    /// The sweep's round over the sku's line (`serve.lua`): turns away
    /// waiters whose buyer has not asked for `patience_ms`, serves the
    /// head, trims the tail, and returns what is to be announced.
    pub async fn serve(
        &self,
        sku: &Sku,
        now_ms: u64,
        patience_ms: u64,
        limit: usize,
    ) -> Result<Vec<Announcement>, StockError> {
        let reply: Vec<String> = SERVE
            .key(SkuKeys::new(sku).stock())
            .arg(now_ms)
            .arg(patience_ms)
            .arg(limit.max(1))
            .invoke_async(&mut self.conn.clone())
            .await?;
        announcements(sku, reply)
    }

    /// Marks announced waiters done, so the sweep does not announce them
    /// again.
    pub async fn ack(&self, sku: &Sku, ids: &[RequestId]) -> Result<(), StockError> {
        if ids.is_empty() {
            return Ok(());
        }
        let keys = SkuKeys::new(sku);
        let ids: Vec<String> = ids.iter().map(RequestId::to_string).collect();
        redis::pipe()
            .zrem(keys.line_out(), &ids)
            .ignore()
            .hdel(keys.line_who(), &ids)
            .ignore()
            .query_async::<()>(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Where purchase `id` stands in the sku's line, `None` when it is not
    /// in it. Asking keeps its place (`line_place.lua`).
    pub async fn line_place(
        &self,
        sku: &Sku,
        id: RequestId,
        now_ms: u64,
    ) -> Result<Option<LinePlace>, StockError> {
        let reply: Vec<String> = LINE_PLACE
            .key(SkuKeys::new(sku).stock())
            .arg(id.to_string())
            .arg(now_ms)
            .invoke_async(&mut self.conn.clone())
            .await?;
        match reply.as_slice() {
            [] => Ok(None),
            [position, units, last] => match (position.parse(), units.parse()) {
                (Ok(position), Ok(units_may_return)) => Ok(Some(LinePlace {
                    position,
                    units_may_return,
                    decided_by_ms: last.parse::<f64>().ok().map(|ms| ms as u64),
                })),
                _ => unexpected(&reply),
            },
            _ => unexpected(&reply),
        }
    }

    /// Adds `units`; replaying `operation_id` answers the first result.
    pub async fn restock(
        &self,
        sku: &Sku,
        operation_id: &str,
        units: u64,
        now_ms: u64,
    ) -> Result<Restocked, StockError> {
        let keys = SkuKeys::new(sku);
        let reply: Vec<String> = RESTOCK
            .key(keys.stock())
            .key(keys.restock(operation_id))
            .arg(units)
            .arg(self.retention_ms)
            .arg(now_ms)
            .arg(SERVE_LIMIT)
            .invoke_async(&mut self.conn.clone())
            .await?;
        match reply.as_slice() {
            [kind, total, available] if kind == "restocked" => {
                match (total.parse(), available.parse()) {
                    (Ok(total), Ok(available)) => Ok(Restocked { total, available }),
                    _ => unexpected(&reply),
                }
            }
            [kind] if kind == "unloaded" => Err(StockError::Unloaded(sku.clone())),
            _ => unexpected(&reply),
        }
    }

    pub async fn close(&self, sku: &Sku) -> Result<(), StockError> {
        let reply: Vec<String> = CLOSE
            .key(SkuKeys::new(sku).stock())
            .invoke_async(&mut self.conn.clone())
            .await?;
        match reply.first().map(String::as_str) {
            Some("closed") => Ok(()),
            Some("unloaded") => Err(StockError::Unloaded(sku.clone())),
            _ => unexpected(&reply),
        }
    }

    /// Forgets the sku's stock: every script then answers `unloaded` and
    /// waits, as after a lost Redis. Recovery starts with this.
    pub async fn unload(&self, sku: &Sku) -> Result<(), StockError> {
        let keys = SkuKeys::new(sku);
        let mut conn = self.conn.clone();
        conn.del::<_, ()>(keys.stock()).await?;
        conn.del::<_, ()>(&[keys.users(), keys.deadlines()]).await?;
        Ok(())
    }

    /// Writes back a sku's state after Redis was lost (`lua/restore.lua`,
    /// so that the layout of a sku's keys has one author, the scripts):
    /// reservation records, processed markers (so a redelivered request is
    /// not reserved again), per-user counts and deadlines first, and the
    /// stock hash last, which is what makes the sku usable again. Call
    /// `unload` first: a sku Redis holds is never written over (`Loaded`).
    pub async fn restore(
        &self,
        sku: &Sku,
        rules: &SaleRules,
        closed: bool,
        reservations: &[RestoredReservation],
    ) -> Result<StockLevels, StockError> {
        let stock = SkuKeys::new(sku).stock();
        let mut conn = self.conn.clone();
        let loaded = |reply: &[String]| reply.first().is_some_and(|r| r == "loaded");
        let (mut reserved, mut sold) = (0i64, 0i64);
        let record_life = rules.reservation_ttl_ms + self.retention_ms;
        for chunk in reservations.chunks(500) {
            let mut call = RESTORE.key(&stock);
            call.arg("reservations")
                .arg(&rules.sale_id)
                .arg(self.retention_ms)
                .arg(record_life);
            for r in chunk {
                let qty = i64::from(r.quantity.get());
                let (state, reason) = match &r.state {
                    RestoredState::Reserved => {
                        reserved += qty;
                        ("reserved", "")
                    }
                    RestoredState::Committed => {
                        sold += qty;
                        ("committed", "")
                    }
                    RestoredState::Released { reason } => ("released", reason.as_str()),
                };
                call.arg(r.id.to_string())
                    .arg(r.user.as_str())
                    .arg(qty)
                    .arg(r.expires_at_ms)
                    .arg(state)
                    .arg(reason)
                    .arg(r.amount_cents);
            }
            let reply: Vec<String> = call.invoke_async(&mut conn).await?;
            if loaded(&reply) {
                return Err(StockError::Loaded(sku.clone()));
            }
        }
        let total = rules.total as i64;
        let mut call = RESTORE.key(&stock);
        call.arg("stock");
        let reply: Vec<String> = rule_args(&mut call, rules)
            .arg(reserved)
            .arg(sold)
            .arg(self.retention_ms)
            .arg(if closed { "1" } else { "0" })
            .invoke_async(&mut conn)
            .await?;
        let levels = match reply.as_slice() {
            [restored, available, sold_out, _] if restored == "restored" => StockLevels {
                sale_id: rules.sale_id.clone(),
                total,
                available: available
                    .parse()
                    .map_err(|_| StockError::UnexpectedReply(reply.clone()))?,
                reserved,
                sold,
                sold_out: sold_out == "1",
            },
            _ if loaded(&reply) => return Err(StockError::Loaded(sku.clone())),
            _ => return unexpected(&reply),
        };
        conn.sadd::<_, _, ()>(&self.sales_key, sku.as_str()).await?;
        Ok(levels)
    }
}

/// A sale's rules as `open.lua` and `restore.lua` take them, in this
/// order: sale id, total, per-user limit, price, reservation TTL, start,
/// end, overbook.
fn rule_args<'a, 'b>(
    call: &'b mut redis::ScriptInvocation<'a>,
    rules: &SaleRules,
) -> &'b mut redis::ScriptInvocation<'a> {
    call.arg(&rules.sale_id)
        .arg(rules.total)
        .arg(rules.per_user_limit)
        .arg(rules.price_cents)
        .arg(rules.reservation_ttl_ms)
        .arg(rules.starts_at_ms)
        .arg(rules.ends_at_ms)
        .arg(rules.overbook)
}
