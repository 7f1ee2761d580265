//! What every service exposes to its operators, and how it stops.
//!
//! `/healthz` says the process is up; `/readyz` runs the service's own
//! readiness check (are Kafka and Redis reachable?); `/metrics` renders the
//! service's Prometheus registry. Each service owns its registry, so several
//! services in one test process never share counters.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio_util::sync::CancellationToken;

/// A readiness check: `Ok` with what is worth knowing about a ready
/// service (empty if nothing), else what is down.
pub type ReadinessCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<String, String>> + Send>> + Send + Sync>;

#[derive(Clone)]
struct Ops {
    registry: Registry,
    ready: ReadinessCheck,
}

pub fn router<S: Clone + Send + Sync + 'static>(
    registry: Registry,
    ready: ReadinessCheck,
) -> Router<S> {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(Ops { registry, ready })
}

async fn readyz(State(ops): State<Ops>) -> Response {
    match (ops.ready)().await {
        Ok(detail) if detail.is_empty() => (StatusCode::OK, "ready\n").into_response(),
        Ok(detail) => (StatusCode::OK, format!("ready: {detail}\n")).into_response(),
        Err(down) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {down}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(ops): State<Ops>) -> Response {
    let mut body = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&ops.registry.gather(), &mut body) {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response()
}

/// Serves `app` on `listener` until `shutdown`, letting requests in flight
/// finish, inside the layers every service has (`layers::standard`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, crate::service::layers::standard(app))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// A token cancelled on SIGTERM or Ctrl-C, for a binary's `main`.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {},
            _ = term => {},
        }
        tracing::info!("shutdown requested");
        cancel.cancel();
    });
    token
}

/// The readiness check of a service that needs Kafka and Redis: a producer
/// that has not failed fatally (it is being replaced), metadata for one of
/// its topics, and a Redis `PING`.
pub fn kafka_and_redis_ready(
    producer: Arc<crate::bus::kafka::RenewableProducer>,
    topic: String,
    stock: crate::stock::StockStore,
) -> ReadinessCheck {
    Arc::new(move || {
        let (producer, topic, stock) = (producer.clone(), topic.clone(), stock.clone());
        Box::pin(async move {
            if let Some(fatal) = producer.fatal() {
                return Err(format!(
                    "the Kafka producer failed fatally ({fatal}); replacing it"
                ));
            }
            crate::bus::kafka::probe(&producer.current(), &topic)
                .await
                .map_err(|e| e.to_string())?;
            stock.ping().await.map_err(|e| e.to_string())?;
            Ok(String::new())
        })
    })
}

/// A worker's readiness: `check`, and its consumer doing its job (in its
/// group with partitions that deliver, or idle with nothing to read).
pub fn with_consumer(
    check: ReadinessCheck,
    health: crate::bus::consumer_health::ConsumerHealth,
) -> ReadinessCheck {
    Arc::new(move || {
        let (check, health) = (check.clone(), health.clone());
        Box::pin(async move {
            check().await?;
            match health.problem() {
                None => Ok(health.summary()),
                Some(problem) => Err(format!("consumer: {problem}")),
            }
        })
    })
}

/// The `main` of every service: `--help` prints `help`; otherwise set up
/// logging, read the typed config from the environment, log it, and hand it
/// to `run` with a token that SIGTERM or Ctrl-C cancels.
pub async fn service_main<C, Fut>(
    name: &str,
    help: &str,
    config: impl FnOnce(
        &crate::service::settings::Env,
    ) -> Result<C, crate::service::settings::SettingError>,
    run: impl FnOnce(C, CancellationToken) -> Fut,
) -> anyhow::Result<()>
where
    C: std::fmt::Debug,
    Fut: Future<Output = anyhow::Result<()>>,
{
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!("{help}");
        return Ok(());
    }
    init_tracing();
    let env = crate::service::settings::Env::process();
    let config = config(&env)?;
    tracing::info!(?config, "starting {name}");
    // `FLASHSALE_CLOCK_OFFSET_MS`: a skewed clock, for fault campaigns.
    let offset_ms: i64 = env.get("CLOCK_OFFSET_MS", 0)?;
    if offset_ms != 0 {
        tracing::warn!(offset_ms, "this process's clock is skewed");
        crate::clock::skew(offset_ms);
    }
    run(config, shutdown_on_signal()).await
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    // A second call (tests) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
