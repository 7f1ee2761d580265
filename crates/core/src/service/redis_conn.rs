//! One connection type for a single Redis and for a Redis Cluster.
//!
//! Every key of a sku shares its `{sku}` hash tag, so each stock script
//! touches one slot and runs unchanged on either; the stores hold a
//! `RedisConn` and never ask which one it is.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::AsyncConnectionConfig;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{
    Cmd, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, RedisResult, TlsCertificates, Value,
};

use crate::service::settings::{RedisAccess, RedisSettings};

const CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one call may take in all, waiting for a reconnection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(6);
/// How long building a fresh connection manager may take: its first
/// connection and that connection's handshake.
const REPLACE_TIMEOUT: Duration = Duration::from_secs(5);

/// A reconnecting connection to a single Redis or to a cluster.
#[derive(Clone)]
pub enum RedisConn {
    Single(Arc<Single>),
    Cluster(ClusterConnection),
}

/// A single Redis, through a `ConnectionManager` that is replaced when it
/// stops answering.
///
/// Why not the manager alone: redis-rs 0.32's manager reconnects through
/// one shared future, and when its connections are cut (accepted, then
/// closed at once: a proxy or node going down mid-handshake) that future
/// can hang for good, so every later call waits forever even after Redis
/// is back (`chaos::a_redis_connection_answers_again_soon_after_a_cut_heals`;
/// redis-rs issues 1556 and 1717). Bounding each call and starting a fresh
/// manager after a connection-level failure recovers within seconds of
/// Redis answering again.
pub struct Single {
    client: redis::Client,
    current: Mutex<Generation>,
    /// One replacement at a time; the others wait for it and use it.
    replacing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Single {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Single")
            .field("generation", &self.current().number)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct Generation {
    number: u64,
    /// `None` once it failed and could not be replaced yet.
    manager: Option<ConnectionManager>,
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(CONNECTION_TIMEOUT)
        .set_response_timeout(RESPONSE_TIMEOUT)
        .set_number_of_retries(3)
}

fn timed_out(what: &str, within: Duration) -> RedisError {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("redis: no answer to {what} within {within:?}"),
    )
    .into()
}

/// Whether an error says the connection, not the command, failed: such a
/// connection is not to be trusted again.
fn breaks_the_connection(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_timeout()
        || error.is_unrecoverable_error()
        || error.is_connection_dropped()
}

impl Single {
    async fn new(client: redis::Client) -> RedisResult<Self> {
        // The manager retries its first connection itself and, for some
        // failures (a certificate nobody vouches for), never stops: one
        // plain connection first fails fast and says why, so a service
        // started with a wrong CA logs the reason instead of hanging.
        let first = AsyncConnectionConfig::new()
            .set_connection_timeout(CONNECTION_TIMEOUT)
            .set_response_timeout(RESPONSE_TIMEOUT);
        tokio::time::timeout(
            REPLACE_TIMEOUT,
            client.get_multiplexed_async_connection_with_config(&first),
        )
        .await
        .map_err(|_| timed_out("a first connection", REPLACE_TIMEOUT))??;
        let manager = tokio::time::timeout(
            REPLACE_TIMEOUT,
            ConnectionManager::new_with_config(client.clone(), manager_config()),
        )
        .await
        .map_err(|_| timed_out("a new connection", REPLACE_TIMEOUT))??;
        Ok(Self {
            client,
            current: Mutex::new(Generation {
                number: 0,
                manager: Some(manager),
            }),
            replacing: tokio::sync::Mutex::new(()),
        })
    }

    fn current(&self) -> Generation {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The manager to use, building a new one if the last one was dropped.
    async fn manager(&self) -> RedisResult<(u64, ConnectionManager)> {
        let now = self.current();
        if let Some(manager) = now.manager {
            return Ok((now.number, manager));
        }
        let _one_at_a_time = self.replacing.lock().await;
        let now = self.current();
        if let Some(manager) = now.manager {
            return Ok((now.number, manager));
        }
        let built = tokio::time::timeout(
            REPLACE_TIMEOUT,
            ConnectionManager::new_with_config(self.client.clone(), manager_config()),
        )
        .await
        .map_err(|_| timed_out("a new connection", REPLACE_TIMEOUT))??;
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        current.number += 1;
        current.manager = Some(built.clone());
        tracing::info!(generation = current.number, "redis: connected again");
        Ok((current.number, built))
    }

    /// Drops generation `number`, unless it was replaced already.
    fn forget(&self, number: u64, error: &RedisError) {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.number == number && current.manager.is_some() {
            tracing::warn!(%error, "redis: dropping the connection; the next call makes a new one");
            current.manager = None;
        }
    }

    /// Runs `call` on the current manager, bounded, and drops the manager
    /// when the connection failed under it.
    async fn call<T, F>(&self, what: &str, call: F) -> RedisResult<T>
    where
        F: AsyncFnOnce(&mut ConnectionManager) -> RedisResult<T>,
    {
        let result = tokio::time::timeout(CALL_TIMEOUT, async {
            // A manager that could not be built has nothing to forget.
            let (number, mut manager) = self.manager().await.map_err(|e| (None, e))?;
            call(&mut manager)
                .await
                .map_err(|error| (Some(number), error))
        })
        .await;
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err((number, error))) => {
                if let Some(number) = number.filter(|_| breaks_the_connection(&error)) {
                    self.forget(number, &error);
                }
                Err(error)
            }
            Err(_) => {
                let error = timed_out(what, CALL_TIMEOUT);
                self.forget(self.current().number, &error);
                Err(error)
            }
        }
    }
}

/// Connects as the settings say: to the cluster when seed nodes are given,
/// else to the single Redis at the URL.
///
/// TLS is the URLs' `rediss://`; the access settings add the user, the
/// password and the CA to trust instead of the system's roots.
pub async fn connect(settings: &RedisSettings) -> Result<RedisConn, redis::RedisError> {
    if settings.cluster_nodes.is_empty() {
        let client = client(settings, &settings.url)?;
        Ok(RedisConn::Single(Arc::new(Single::new(client).await?)))
    } else {
        let access = &settings.access;
        let mut builder = redis::cluster::ClusterClientBuilder::new(settings.cluster_nodes.clone())
            .connection_timeout(CONNECTION_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .retries(3);
        if let Some(username) = &access.username {
            builder = builder.username(username.clone());
        }
        if let Some(password) = &access.password {
            builder = builder.password(password.clone());
        }
        if let Some(certificates) = trusted_ca(access)? {
            builder = builder.certs(certificates);
        }
        Ok(RedisConn::Cluster(
            builder.build()?.get_async_connection().await?,
        ))
    }
}

/// A client of the one node at `url` (the single Redis, or a cluster node
/// for a subscription) with the settings' user, password and CA: what
/// every connection to Redis is made from.
pub fn client(settings: &RedisSettings, url: &str) -> Result<redis::Client, RedisError> {
    let access = &settings.access;
    let mut info = url.into_connection_info()?;
    if let Some(username) = &access.username {
        info.redis.username = Some(username.clone());
    }
    if let Some(password) = &access.password {
        info.redis.password = Some(password.clone());
    }
    match trusted_ca(access)? {
        Some(certificates) => redis::Client::build_with_tls(info, certificates),
        None => redis::Client::open(info),
    }
}

/// The PEM bundle of `FLASHSALE_REDIS_CA_FILE`, read at each connection
/// (a rotated CA is picked up by the next one).
fn trusted_ca(access: &RedisAccess) -> Result<Option<TlsCertificates>, RedisError> {
    let Some(path) = &access.ca_file else {
        return Ok(None);
    };
    let trusted = |root_cert| TlsCertificates {
        client_tls: None,
        root_cert: Some(root_cert),
    };
    std::fs::read(path).map(trusted).map(Some).map_err(|error| {
        std::io::Error::new(
            error.kind(),
            format!("FLASHSALE_REDIS_CA_FILE {path} cannot be read: {error}"),
        )
        .into()
    })
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Single(_) => "RedisConn::Single",
            Self::Cluster(_) => "RedisConn::Cluster",
        })
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => Box::pin(async move {
                c.call("a command", async |m| m.req_packed_command(cmd).await)
                    .await
            }),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => Box::pin(async move {
                c.call("a pipeline", async |m| {
                    m.req_packed_commands(pipeline, offset, count).await
                })
                .await
            }),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.client.get_connection_info().redis.db,
            Self::Cluster(c) => c.get_db(),
        }
    }
}
