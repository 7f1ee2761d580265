//! The gateway against a careless or hostile client: whatever the method,
//! path, query, headers or body, the answer is below 500 (a problem the
//! client can read) and the handler never panics. The router runs in
//! process, connected to the real stack, and no generated request names a
//! sale, so nothing reaches Kafka.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure here is the test's answer

use std::sync::OnceLock;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use flashsale_testkit::env_with;
use flashsale_testkit::flashsale_gateway::{self, Config};
use proptest::prelude::*;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// One gateway for every case: its runtime, and its application.
fn gateway() -> &'static (tokio::runtime::Runtime, Router) {
    static GATEWAY: OnceLock<(tokio::runtime::Runtime, Router)> = OnceLock::new();
    GATEWAY.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let prefix = format!("z{}.", &uuid::Uuid::now_v7().simple().to_string()[20..]);
        let env = env_with(&[
            ("FLASHSALE_TOPIC_PREFIX", prefix),
            ("FLASHSALE_GATEWAY_ADDR", "127.0.0.1:0".into()),
            // Long-polls answer at once, and no limit sheds a case.
            ("FLASHSALE_GATEWAY_MAX_WAIT_S", "0".into()),
            ("FLASHSALE_GATEWAY_MAX_RPS", "0".into()),
            ("FLASHSALE_GATEWAY_USER_RPS", "0".into()),
        ]);
        let config = Config::from_env(&env).expect("settings");
        let app = runtime
            .block_on(flashsale_gateway::app(&config, CancellationToken::new()))
            .expect("the gateway connects to the stack");
        (runtime, app)
    })
}

/// Sends one request through the router; its status and body.
fn send(request: Request<Body>) -> (StatusCode, String) {
    let (runtime, app) = gateway();
    runtime.block_on(async {
        let response = app.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        (status, body)
    })
}

/// GET a purchase's status with `?wait=<wait>`.
fn wait_for(wait: &str) -> (StatusCode, String) {
    let request = Request::get(format!(
        "/v1/purchases/01a22c0a-9723-7208-a300-7cb39cf3a438?wait={wait}"
    ))
    .body(Body::empty())
    .expect("a request");
    send(request)
}

#[test]
fn a_wait_too_long_for_a_duration_is_capped_not_a_panic() {
    for wait in ["1e20", "1.8e19", "1e308", "18446744073709551616"] {
        let (status, body) = wait_for(wait);
        assert_eq!(status, StatusCode::NOT_FOUND, "wait={wait}: {body}");
    }
    for wait in ["-1", "NaN", "inf", "soon", ""] {
        let (status, body) = wait_for(wait);
        assert_eq!(status, StatusCode::BAD_REQUEST, "wait={wait}: {body}");
        assert!(body.contains("\"type\""), "a problem body: {body}");
    }
}

/// Any JSON value, nested a little.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        any::<u64>().prop_map(|n| serde_json::json!(n)),
        any::<f64>().prop_map(|n| serde_json::json!(n)),
        "\\PC{0,40}".prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(2, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::btree_map("\\PC{0,8}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A purchase body whose fields may each be anything, or missing.
fn purchase_body() -> impl Strategy<Value = Vec<u8>> {
    let field = || prop::option::of(json_value());
    (field(), field(), field(), json_value()).prop_map(|(sku, user, quantity, extra)| {
        let mut body = serde_json::Map::new();
        if let Some(sku) = sku {
            body.insert("sku".into(), sku);
        }
        if let Some(user) = user {
            body.insert("user_id".into(), user);
        }
        if let Some(quantity) = quantity {
            body.insert("quantity".into(), quantity);
        }
        body.insert("extra".into(), extra);
        serde_json::to_vec(&body).expect("serializable")
    })
}

/// A purchase that may well pass validation: it then meets the line in
/// Redis, which knows no such sale.
fn plausible_purchase() -> impl Strategy<Value = Vec<u8>> {
    ("[a-z0-9-]{1,20}", "[a-zA-Z0-9_.@-]{1,30}", -3i64..20).prop_map(|(sku, user, quantity)| {
        serde_json::to_vec(
            &serde_json::json!({ "sku": sku, "user_id": user, "quantity": quantity }),
        )
        .expect("serializable")
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        plausible_purchase(),
        purchase_body(),
        prop::collection::vec(any::<u8>(), 0..200),
        json_value().prop_map(|v| serde_json::to_vec(&v).expect("serializable")),
    ]
}

fn path() -> impl Strategy<Value = String> {
    let segment = "[a-zA-Z0-9%._~-]{0,40}";
    prop_oneof![
        Just("/v1/purchases".to_owned()),
        segment.prop_map(|s| format!("/v1/purchases/{s}")),
        segment.prop_map(|s| format!("/v1/skus/{s}")),
        Just("/healthz".to_owned()),
        Just("/readyz".to_owned()),
        "/[ -~]{0,60}",
    ]
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::GET),
        Just(Method::POST),
        Just(Method::PUT),
        Just(Method::DELETE),
        Just(Method::PATCH),
        Just(Method::HEAD),
        Just(Method::OPTIONS),
    ]
}

/// Sends a generated request (if an HTTP client could send it: a URI and
/// headers that parse) and checks the answer.
fn answers_below_500(
    method: Method,
    uri: String,
    key: Option<Vec<u8>>,
    content_type: Option<String>,
    traceparent: Option<String>,
    body: Vec<u8>,
) -> Result<(), TestCaseError> {
    let Ok(uri) = uri.parse::<axum::http::Uri>() else {
        return Ok(());
    };
    let mut request = Request::builder().method(method.clone()).uri(uri);
    if let Some(key) = key
        && let Ok(value) = axum::http::HeaderValue::from_bytes(&key)
    {
        request = request.header("idempotency-key", value);
    }
    if let Some(content_type) = content_type
        && let Ok(value) = axum::http::HeaderValue::from_str(&content_type)
    {
        request = request.header("content-type", value);
    }
    if let Some(traceparent) = traceparent
        && let Ok(value) = axum::http::HeaderValue::from_str(&traceparent)
    {
        request = request.header("traceparent", value);
    }
    let Ok(request) = request.body(Body::from(body)) else {
        return Ok(());
    };
    let (status, answer) = send(request);
    prop_assert!(status.as_u16() < 500, "{status}: {answer}");
    // A HEAD answer carries no body, problem or not.
    if status.is_client_error()
        && method != Method::HEAD
        && status != StatusCode::METHOD_NOT_ALLOWED
    {
        prop_assert!(
            answer.contains("\"type\""),
            "{status} without a problem body: {answer}"
        );
    }
    Ok(())
}

fn key() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop::option::of(prop_oneof![
        "[ -~]{0,40}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..300),
    ])
}

fn content_type() -> impl Strategy<Value = Option<String>> {
    prop::option::of(prop_oneof![
        Just("application/json".to_owned()),
        Just("application/json; charset=utf-8".to_owned()),
        Just("text/plain".to_owned()),
        "[ -~]{0,30}",
    ])
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 600,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn no_request_gets_a_5xx_or_a_panic(
        method in method(),
        path in path(),
        query in prop::option::of("[ -~]{0,40}"),
        key in key(),
        content_type in content_type(),
        traceparent in prop::option::of("[ -~]{0,60}"),
        body in body(),
    ) {
        let uri = match query {
            Some(query) => format!("{path}?{query}"),
            None => path,
        };
        answers_below_500(method, uri, key, content_type, traceparent, body)?;
    }

    #[test]
    fn no_purchase_gets_a_5xx_or_a_panic(
        key in key(),
        content_type in content_type(),
        traceparent in prop::option::of("[ -~]{0,60}"),
        body in body(),
    ) {
        answers_below_500(
            Method::POST,
            "/v1/purchases".to_owned(),
            key,
            content_type,
            traceparent,
            body,
        )?;
    }
}
