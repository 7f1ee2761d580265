//! The skeleton both workers stand on: the start-up tail and the shutdown
//! that a shop-worker and an order-worker share, so that each says only
//! what is its own (its handler, its readiness, its background tasks).
//!
//! Started, a worker serves `/healthz`, `/readyz` and `/metrics`, keeps its
//! producer renewed, notes itself alive in its group, and runs the consumer
//! loop; when the loop ends (shutdown, or a message it could not process)
//! everything else is stopped too, and the task ends once all has.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::{IntGauge, Registry};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::bus::consumer::{self, Abandoned, ConsumerOptions, Handler};
use crate::bus::kafka::RenewableProducer;
use crate::bus::members::Membership;
use crate::service::ops;
use crate::service::redis_conn::RedisConn;
use crate::service::start::{StartError, bind};

/// A running worker.
#[derive(Debug)]
pub struct RunningWorker {
    /// Where its `/healthz`, `/readyz` and `/metrics` answer.
    pub metrics_addr: SocketAddr,
    /// Ends when the worker has left its group: `Err` if it stopped because
    /// a message could not be processed (its offset stays uncommitted).
    pub task: JoinHandle<Result<(), Abandoned>>,
}

/// What a worker brings to the skeleton.
pub struct WorkerParts<H> {
    /// `shop-worker` or `order-worker`: in logs and in its group's notes.
    pub name: &'static str,
    pub handler: H,
    pub consumer: ConsumerOptions,
    pub metrics_addr: SocketAddr,
    pub registry: Registry,
    /// Its own readiness; the consumer's is added to it.
    pub ready: ops::ReadinessCheck,
    pub producer: Arc<RenewableProducer>,
    /// Follows how many producers were replaced.
    pub producer_renewals: IntGauge,
    /// Where it notes itself alive in its group.
    pub redis: RedisConn,
    /// Its own tasks beside the loop (the sweep), awaited at the end.
    pub background: Vec<JoinHandle<()>>,
}

impl<H> std::fmt::Debug for WorkerParts<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerParts")
            .field("name", &self.name)
            .field("group", &self.consumer.group)
            .field("metrics_addr", &self.metrics_addr)
            .finish_non_exhaustive()
    }
}

/// Serves, renews, notes, and runs the consumer loop until `shutdown`.
pub async fn start<H: Handler>(
    parts: WorkerParts<H>,
    shutdown: CancellationToken,
) -> Result<RunningWorker, StartError> {
    let WorkerParts {
        name,
        handler,
        consumer: options,
        metrics_addr,
        registry,
        ready,
        producer,
        producer_renewals,
        redis,
        background,
    } = parts;
    let consumer = consumer::consumer(&options)?;
    let (listener, metrics_addr) = bind(metrics_addr).await?;
    let app = ops::router(registry, ops::with_consumer(ready, options.health.clone()));
    let ops_task = tokio::spawn(ops::serve(listener, app, shutdown.clone()));
    tracing::info!(%metrics_addr, group = %options.group, "{name} started");
    let renewing = tokio::spawn(producer.keep_renewed(producer_renewals, shutdown.clone()));
    let membership =
        tokio::spawn(Membership::new(redis, &options.group, name).run(shutdown.clone()));
    let task = tokio::spawn(async move {
        let stopped = consumer::run(consumer, handler, &options, shutdown.clone()).await;
        // The worker is of no use any more: stop answering probes too.
        shutdown.cancel();
        for task in background {
            let _ = task.await;
        }
        let _ = ops_task.await;
        let _ = renewing.await;
        let _ = membership.await;
        stopped
    });
    Ok(RunningWorker { metrics_addr, task })
}
