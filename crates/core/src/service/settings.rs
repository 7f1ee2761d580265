//! Settings shared by several binaries, read from `FLASHSALE_*` variables.
//!
//! Each binary composes these pieces into its own typed config struct. The
//! defaults point at the local stack that `./scripts/demo` starts, so a
//! service started with no environment at all talks to it.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A setting that is present but cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{name}={value:?} is not valid: {problem}")]
pub struct SettingError {
    pub name: String,
    pub value: String,
    pub problem: String,
}

/// Where settings come from: the process environment, or a map in tests.
#[derive(Debug, Clone, Default)]
pub struct Env {
    overrides: Option<HashMap<String, String>>,
}

impl Env {
    pub fn process() -> Self {
        Self { overrides: None }
    }

    pub fn from_map(vars: HashMap<String, String>) -> Self {
        Self {
            overrides: Some(vars),
        }
    }

    /// Every `FLASHSALE_*` variable this environment holds.
    pub fn vars(&self) -> HashMap<String, String> {
        match &self.overrides {
            Some(map) => map.clone(),
            None => std::env::vars()
                .filter(|(k, _)| k.starts_with("FLASHSALE_"))
                .collect(),
        }
    }

    fn raw(&self, name: &str) -> Option<String> {
        match &self.overrides {
            Some(map) => map.get(name).cloned(),
            None => std::env::var(name).ok(),
        }
    }

    /// `FLASHSALE_<suffix>` parsed as `T`, or `default` when unset.
    pub fn get<T>(&self, suffix: &str, default: T) -> Result<T, SettingError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        let name = format!("FLASHSALE_{suffix}");
        match self.raw(&name) {
            None => Ok(default),
            Some(value) => value.trim().parse().map_err(|e: T::Err| SettingError {
                name,
                value,
                problem: e.to_string(),
            }),
        }
    }

    pub fn string(&self, suffix: &str, default: &str) -> String {
        self.raw(&format!("FLASHSALE_{suffix}"))
            .unwrap_or_else(|| default.to_owned())
    }

    /// `FLASHSALE_<suffix>`, or `None` when unset or empty (an empty
    /// value in a manifest means "not given").
    pub fn optional(&self, suffix: &str) -> Option<String> {
        Some(self.string(suffix, "")).filter(|v| !v.is_empty())
    }

    pub fn millis(&self, suffix: &str, default_ms: u64) -> Result<Duration, SettingError> {
        self.get(suffix, default_ms).map(Duration::from_millis)
    }

    /// A fraction in `[0, 1]`.
    pub fn fraction(&self, suffix: &str, default: f64) -> Result<f64, SettingError> {
        let value: f64 = self.get(suffix, default)?;
        if (0.0..=1.0).contains(&value) {
            Ok(value)
        } else {
            Err(SettingError {
                name: format!("FLASHSALE_{suffix}"),
                value: value.to_string(),
                problem: "must be between 0 and 1".into(),
            })
        }
    }
}

/// The Kafka cluster and the names of our topics on it.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `FLASHSALE_KAFKA_BOOTSTRAP`: `host:port[,host:port]`.
    pub bootstrap: String,
    /// `FLASHSALE_TOPIC_PREFIX`: prepended to every topic and consumer group,
    /// so several pipelines (or tests) can share one cluster.
    pub prefix: String,
    /// `FLASHSALE_KAFKA_PARTITIONS`: partitions of each topic we create.
    pub partitions: i32,
    /// `FLASHSALE_KAFKA_PRODUCE_TIMEOUT_MS`: how long a produce may wait for
    /// the broker's acknowledgement before we give up on it.
    pub produce_timeout: Duration,
    /// `FLASHSALE_CONSUMER_ASSIGNMENT`: the consumer groups' assignor
    /// (`partition.assignment.strategy`); `cooperative-sticky` moves only
    /// the partitions that must move on a rebalance. A group keeps the kind
    /// it began with (tansu 0.6 stores it and refuses members of the other
    /// kind for good): a member refused for it joins again speaking the
    /// group's (`consumer::run`).
    pub consumer_assignment: String,
    /// `FLASHSALE_KAFKA_TEST_FATAL_AFTER`: for tests only, a service's
    /// producer fails fatally (librdkafka's test hook) after this many
    /// records sent (`kafka::RenewableProducer`).
    pub test_fatal_after: Option<u64>,
    /// `FLASHSALE_KAFKA_DEBUG`: librdkafka's debug contexts (`cgrp,fetch`),
    /// logged at debug level under the `librdkafka` target, for finding out
    /// what a consumer group did.
    pub debug: Option<String>,
    /// `FLASHSALE_KAFKA_REPLICATION_FACTOR`: replicas of each topic we
    /// create (1 on the local broker; 3 on a cluster, with the topics'
    /// `min.insync.replicas` at 2, so that `acks=all` survives one broker).
    pub replication_factor: i32,
    /// How the clients authenticate and encrypt (`FLASHSALE_KAFKA_SECURITY_*`).
    pub security: KafkaSecurity,
}

/// Whether this build's librdkafka has TLS (and SCRAM, which needs
/// OpenSSL): the `kafka-tls` feature, off in local builds to keep
/// librdkafka's build short.
pub const KAFKA_TLS_BUILT: bool = cfg!(feature = "kafka-tls");

/// A managed cluster's security: TLS, and SASL PLAIN or SCRAM.
#[derive(Clone)]
pub struct KafkaSecurity {
    /// `FLASHSALE_KAFKA_SECURITY_PROTOCOL`: `plaintext` (default), `ssl`,
    /// `sasl_plaintext` or `sasl_ssl`.
    pub protocol: String,
    /// `FLASHSALE_KAFKA_SASL_MECHANISM`: `PLAIN`, `SCRAM-SHA-256` or
    /// `SCRAM-SHA-512` (MSK's SCRAM is `SCRAM-SHA-512`).
    pub sasl_mechanism: Option<String>,
    /// `FLASHSALE_KAFKA_SASL_USERNAME`, `FLASHSALE_KAFKA_SASL_PASSWORD`.
    pub sasl_username: Option<String>,
    pub sasl_password: Option<String>,
    /// `FLASHSALE_KAFKA_SSL_CA_LOCATION`: a CA bundle, when the system's
    /// does not vouch for the brokers.
    pub ssl_ca_location: Option<String>,
}

impl fmt::Debug for KafkaSecurity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSecurity")
            .field("protocol", &self.protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field(
                "sasl_password",
                &self.sasl_password.as_ref().map(|_| "<hidden>"),
            )
            .field("ssl_ca_location", &self.ssl_ca_location)
            .finish()
    }
}

impl Default for KafkaSecurity {
    fn default() -> Self {
        Self {
            protocol: "plaintext".to_owned(),
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            ssl_ca_location: None,
        }
    }
}

impl KafkaSecurity {
    pub fn from_env(env: &Env) -> Result<Self, SettingError> {
        let security = Self {
            protocol: env
                .string("KAFKA_SECURITY_PROTOCOL", "plaintext")
                .to_lowercase(),
            sasl_mechanism: env
                .optional("KAFKA_SASL_MECHANISM")
                .map(|m| m.to_uppercase()),
            sasl_username: env.optional("KAFKA_SASL_USERNAME"),
            sasl_password: env.optional("KAFKA_SASL_PASSWORD"),
            ssl_ca_location: env.optional("KAFKA_SSL_CA_LOCATION"),
        };
        security.check(KAFKA_TLS_BUILT)?;
        Ok(security)
    }

    /// Whether these settings can work in a build with (or without) TLS.
    pub fn check(&self, tls_built: bool) -> Result<(), SettingError> {
        let refuse = |name: &str, value: &str, problem: &str| SettingError {
            name: format!("FLASHSALE_{name}"),
            value: value.to_owned(),
            problem: problem.to_owned(),
        };
        let (tls, sasl) = match self.protocol.as_str() {
            "plaintext" => (false, false),
            "ssl" => (true, false),
            "sasl_plaintext" => (false, true),
            "sasl_ssl" => (true, true),
            other => {
                return Err(refuse(
                    "KAFKA_SECURITY_PROTOCOL",
                    other,
                    "expected plaintext, ssl, sasl_plaintext or sasl_ssl",
                ));
            }
        };
        let mechanism = self.sasl_mechanism.as_deref();
        if sasl {
            match mechanism {
                Some("PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512") => {}
                other => {
                    return Err(refuse(
                        "KAFKA_SASL_MECHANISM",
                        other.unwrap_or(""),
                        "expected PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 with a sasl_ protocol",
                    ));
                }
            }
            if self.sasl_username.is_none() || self.sasl_password.is_none() {
                return Err(refuse(
                    "KAFKA_SASL_USERNAME",
                    self.sasl_username.as_deref().unwrap_or(""),
                    "a sasl_ protocol needs FLASHSALE_KAFKA_SASL_USERNAME and FLASHSALE_KAFKA_SASL_PASSWORD",
                ));
            }
        }
        let needs_openssl = tls || mechanism.is_some_and(|m| m.starts_with("SCRAM"));
        if needs_openssl && !tls_built {
            return Err(refuse(
                "KAFKA_SECURITY_PROTOCOL",
                &self.protocol,
                "this build has no TLS or SCRAM: build with `--features flashsale-core/kafka-tls`",
            ));
        }
        Ok(())
    }

    /// librdkafka's properties for these settings.
    pub fn client_properties(&self) -> Vec<(&'static str, String)> {
        let mut properties = vec![("security.protocol", self.protocol.clone())];
        let optional = [
            ("sasl.mechanism", &self.sasl_mechanism),
            ("sasl.username", &self.sasl_username),
            ("sasl.password", &self.sasl_password),
            ("ssl.ca.location", &self.ssl_ca_location),
        ];
        properties.extend(
            optional
                .into_iter()
                .filter_map(|(key, value)| value.clone().map(|v| (key, v))),
        );
        properties
    }
}

impl KafkaSettings {
    pub fn from_env(env: &Env) -> Result<Self, SettingError> {
        Ok(Self {
            bootstrap: env.string("KAFKA_BOOTSTRAP", "127.0.0.1:19092"),
            prefix: env.string("TOPIC_PREFIX", ""),
            partitions: env.get("KAFKA_PARTITIONS", 3)?,
            produce_timeout: env.millis("KAFKA_PRODUCE_TIMEOUT_MS", 5_000)?,
            consumer_assignment: env.string("CONSUMER_ASSIGNMENT", "cooperative-sticky"),
            test_fatal_after: match env.get("KAFKA_TEST_FATAL_AFTER", 0u64)? {
                0 => None,
                n => Some(n),
            },
            debug: env.optional("KAFKA_DEBUG"),
            replication_factor: env.get("KAFKA_REPLICATION_FACTOR", 1)?,
            security: KafkaSecurity::from_env(env)?,
        })
    }

    pub fn topic(&self, base: &str) -> String {
        format!("{}{base}", self.prefix)
    }

    pub fn group(&self, base: &str) -> String {
        format!("{}{base}", self.prefix)
    }
}

/// The key of the sales registry of a deployment whose topics carry
/// `topic_prefix` (see `RedisSettings::sales_key`).
pub fn sales_key(topic_prefix: &str) -> String {
    match topic_prefix.trim_end_matches('.') {
        "" => "fs:sales".to_owned(),
        prefix => format!("fs:sales:{prefix}"),
    }
}

/// The Redis that holds stock, reservations and purchase status.
#[derive(Clone)]
pub struct RedisSettings {
    /// `FLASHSALE_REDIS_URL`.
    pub url: String,
    /// `FLASHSALE_REQUEST_RETENTION_MS`: how long the record of a processed
    /// request (and a purchase's status) is kept; replays older than this are
    /// not recognised, so it must outlast the longest possible redelivery.
    pub retention: Duration,
    /// `FLASHSALE_REDIS_CLUSTER_NODES`: comma-separated `redis://` URLs of
    /// some nodes of a Redis Cluster; when set, the cluster is used and
    /// `FLASHSALE_REDIS_URL` is ignored.
    pub cluster_nodes: Vec<String>,
    /// The set of skus with a sale that this deployment's sweeps walk:
    /// `fs:sales`, or `fs:sales:<FLASHSALE_TOPIC_PREFIX>` when the
    /// deployment has a topic prefix. Several deployments may share one
    /// Redis (the tests do); each must sweep, and announce the line of,
    /// only its own sales, whose reservations go to its own topics.
    pub sales_key: String,
    /// Who the services are to Redis, and whom they trust over TLS.
    pub access: RedisAccess,
}

/// AUTH and TLS for a managed Redis (ElastiCache with in-transit
/// encryption and RBAC, Valkey with ACLs). TLS itself is the `rediss://`
/// scheme of the URLs; these say who we are and which CA signs the server.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RedisAccess {
    /// `FLASHSALE_REDIS_USERNAME`: an ACL user; unset means the URL's, or
    /// Redis's `default` user.
    pub username: Option<String>,
    /// `FLASHSALE_REDIS_PASSWORD`: kept out of the URL so that it can come
    /// from a Secret while the URL stays in the ConfigMap; overrides the
    /// URL's.
    pub password: Option<String>,
    /// `FLASHSALE_REDIS_CA_FILE`: a PEM bundle trusted instead of the
    /// system's roots (a private CA); ElastiCache's certificates need none.
    pub ca_file: Option<String>,
}

impl fmt::Debug for RedisAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisAccess")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &without_password(&self.url))
            .field("retention", &self.retention)
            .field("cluster_nodes", &self.cluster_nodes_shown())
            .field("sales_key", &self.sales_key)
            .field("access", &self.access)
            .finish()
    }
}

fn is_tls(url: &str) -> bool {
    url.starts_with("rediss://")
}

/// `url` with the password of its user info, if any, hidden: for logs and
/// messages.
fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((user_info, host)) => {
            let user = user_info
                .split_once(':')
                .map_or(user_info, |(user, _)| user);
            format!("{scheme}://{user}:<hidden>@{host}")
        }
        None => url.to_owned(),
    }
}

impl RedisSettings {
    pub fn from_env(env: &Env) -> Result<Self, SettingError> {
        let settings = Self {
            url: env.string("REDIS_URL", "redis://127.0.0.1:16379"),
            retention: env.millis("REQUEST_RETENTION_MS", 24 * 3600 * 1000)?,
            cluster_nodes: env
                .string("REDIS_CLUSTER_NODES", "")
                .split(',')
                .map(str::trim)
                .filter(|node| !node.is_empty())
                .map(str::to_owned)
                .collect(),
            sales_key: sales_key(&env.string("TOPIC_PREFIX", "")),
            access: RedisAccess {
                username: env.optional("REDIS_USERNAME"),
                password: env.optional("REDIS_PASSWORD"),
                ca_file: env.optional("REDIS_CA_FILE"),
            },
        };
        settings.check()?;
        Ok(settings)
    }

    /// The URLs connected to: the cluster's seed nodes, or the single URL.
    pub fn urls(&self) -> Vec<&str> {
        if self.cluster_nodes.is_empty() {
            vec![self.url.as_str()]
        } else {
            self.cluster_nodes.iter().map(String::as_str).collect()
        }
    }

    /// Whether the connections are TLS (`rediss://`).
    pub fn tls(&self) -> bool {
        self.urls().into_iter().any(is_tls)
    }

    /// Refuses what would connect in a way nobody meant: a CA for plain
    /// connections (the operator expects TLS and would not get it), or a
    /// cluster half TLS and half plain.
    pub fn check(&self) -> Result<(), SettingError> {
        let tls = self.tls();
        if tls && !self.urls().into_iter().all(is_tls) {
            return Err(SettingError {
                name: "FLASHSALE_REDIS_CLUSTER_NODES".to_owned(),
                value: self.cluster_nodes.join(","),
                problem: "every node must be rediss:// or every node redis://".to_owned(),
            });
        }
        if let Some(ca_file) = &self.access.ca_file
            && !tls
        {
            return Err(SettingError {
                name: "FLASHSALE_REDIS_CA_FILE".to_owned(),
                value: ca_file.clone(),
                problem: "a CA is only used over TLS: give the Redis URLs as rediss://".to_owned(),
            });
        }
        Ok(())
    }

    /// The cluster's seed nodes without their passwords, to be shown.
    fn cluster_nodes_shown(&self) -> Vec<String> {
        self.cluster_nodes
            .iter()
            .map(|n| without_password(n))
            .collect()
    }

    /// Where Redis is, for messages to a person (no password).
    pub fn describe(&self) -> String {
        if self.cluster_nodes.is_empty() {
            without_password(&self.url)
        } else {
            format!("the cluster at {}", self.cluster_nodes_shown().join(","))
        }
    }
}

/// DynamoDB: AWS's, or DynamoDB Local when an endpoint is given.
#[derive(Debug, Clone)]
pub struct DynamoSettings {
    /// `FLASHSALE_DYNAMODB_ENDPOINT`: empty means "use the AWS configuration
    /// chain as it is" (real DynamoDB, or `AWS_ENDPOINT_URL_DYNAMODB`).
    pub endpoint: Option<String>,
    /// `FLASHSALE_TABLE_PREFIX`: prepended to `orders` and `inventory`.
    pub table_prefix: String,
}

impl DynamoSettings {
    pub fn from_env(env: &Env) -> Result<Self, SettingError> {
        let endpoint = env.string("DYNAMODB_ENDPOINT", "http://127.0.0.1:18000");
        Ok(Self {
            endpoint: (!endpoint.trim().is_empty()).then_some(endpoint),
            table_prefix: env.string("TABLE_PREFIX", "flashsale-"),
        })
    }
}

/// `FLASHSALE_PAYMENT_URL`: base URL of the payment service.
pub fn payment_url(env: &Env) -> String {
    env.string("PAYMENT_URL", "http://127.0.0.1:18081")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        Env::from_map(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn redis_access_comes_from_its_own_settings_and_no_password_is_shown() {
        let r = RedisSettings::from_env(&env(&[
            (
                "FLASHSALE_REDIS_URL",
                "rediss://:in-the-url@cache.example:6379",
            ),
            ("FLASHSALE_REDIS_USERNAME", "flashsale"),
            ("FLASHSALE_REDIS_PASSWORD", "from-a-secret"),
            ("FLASHSALE_REDIS_CA_FILE", "/etc/flashsale/redis-ca.pem"),
        ]))
        .unwrap();
        assert!(r.tls());
        assert_eq!(
            r.access,
            RedisAccess {
                username: Some("flashsale".into()),
                password: Some("from-a-secret".into()),
                ca_file: Some("/etc/flashsale/redis-ca.pem".into()),
            }
        );
        let shown = format!("{r:?} {}", r.describe());
        assert!(
            !shown.contains("from-a-secret") && !shown.contains("in-the-url"),
            "{shown}"
        );
        assert!(
            shown.contains("rediss://:<hidden>@cache.example:6379"),
            "{shown}"
        );
        assert!(!RedisSettings::from_env(&env(&[])).unwrap().tls());
    }

    #[test]
    fn redis_settings_that_would_not_do_what_they_say_are_refused() {
        let ca_without_tls = RedisSettings::from_env(&env(&[(
            "FLASHSALE_REDIS_CA_FILE",
            "/etc/flashsale/redis-ca.pem",
        )]))
        .unwrap_err();
        assert_eq!(ca_without_tls.name, "FLASHSALE_REDIS_CA_FILE");
        let half_tls = RedisSettings::from_env(&env(&[(
            "FLASHSALE_REDIS_CLUSTER_NODES",
            "rediss://10.0.0.1:6379,redis://10.0.0.2:6379",
        )]))
        .unwrap_err();
        assert_eq!(half_tls.name, "FLASHSALE_REDIS_CLUSTER_NODES");
        let cluster_tls = RedisSettings::from_env(&env(&[
            (
                "FLASHSALE_REDIS_CLUSTER_NODES",
                "rediss://10.0.0.1:6379,rediss://10.0.0.2:6379",
            ),
            ("FLASHSALE_REDIS_CA_FILE", "/etc/flashsale/redis-ca.pem"),
        ]))
        .unwrap();
        assert!(cluster_tls.tls());
    }

    #[test]
    fn defaults_and_overrides() {
        let k = KafkaSettings::from_env(&env(&[])).unwrap();
        assert_eq!(k.bootstrap, "127.0.0.1:19092");
        let k = KafkaSettings::from_env(&env(&[
            ("FLASHSALE_TOPIC_PREFIX", "t1."),
            ("FLASHSALE_KAFKA_PARTITIONS", "6"),
        ]))
        .unwrap();
        assert_eq!(k.topic("reservations"), "t1.reservations");
        assert_eq!(k.partitions, 6);
    }

    #[test]
    fn a_managed_cluster_s_security_becomes_librdkafka_s_properties() {
        let k = KafkaSettings::from_env(&env(&[
            ("FLASHSALE_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT"),
            ("FLASHSALE_KAFKA_SASL_MECHANISM", "plain"),
            ("FLASHSALE_KAFKA_SASL_USERNAME", "shop"),
            ("FLASHSALE_KAFKA_SASL_PASSWORD", "s3cret"),
        ]))
        .unwrap();
        assert_eq!(
            k.security.client_properties(),
            vec![
                ("security.protocol", "sasl_plaintext".to_owned()),
                ("sasl.mechanism", "PLAIN".to_owned()),
                ("sasl.username", "shop".to_owned()),
                ("sasl.password", "s3cret".to_owned()),
            ]
        );
        assert!(
            !format!("{k:?}").contains("s3cret"),
            "the password is not logged"
        );
        let plain = KafkaSettings::from_env(&env(&[])).unwrap();
        assert_eq!(
            plain.security.client_properties(),
            vec![("security.protocol", "plaintext".to_owned())]
        );
    }

    #[test]
    fn security_that_cannot_work_is_refused_with_what_to_do() {
        let scram = KafkaSecurity {
            protocol: "sasl_ssl".into(),
            sasl_mechanism: Some("SCRAM-SHA-512".into()),
            sasl_username: Some("u".into()),
            sasl_password: Some("p".into()),
            ssl_ca_location: None,
        };
        assert!(scram.check(true).is_ok());
        let err = scram.check(false).unwrap_err().to_string();
        assert!(err.contains("--features flashsale-core/kafka-tls"), "{err}");
        let no_password = KafkaSecurity {
            sasl_password: None,
            ..scram.clone()
        };
        let err = no_password.check(true).unwrap_err().to_string();
        assert!(err.contains("FLASHSALE_KAFKA_SASL_PASSWORD"), "{err}");
        let err = KafkaSettings::from_env(&env(&[("FLASHSALE_KAFKA_SECURITY_PROTOCOL", "tls")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("FLASHSALE_KAFKA_SECURITY_PROTOCOL"), "{err}");
    }

    #[test]
    fn bad_values_name_the_variable() {
        let err = KafkaSettings::from_env(&env(&[("FLASHSALE_KAFKA_PARTITIONS", "many")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("FLASHSALE_KAFKA_PARTITIONS"), "{err}");
        assert!(env(&[("FLASHSALE_X", "1.5")]).fraction("X", 0.0).is_err());
        let d = DynamoSettings::from_env(&env(&[("FLASHSALE_DYNAMODB_ENDPOINT", "")])).unwrap();
        assert_eq!(d.endpoint, None);
    }
}
