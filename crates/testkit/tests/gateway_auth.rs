//! Who is buying: a gateway that verifies bearer tokens sells to the
//! token's subject only, and refuses every token it should (expired, for
//! another audience or issuer, signed with another key, tampered with,
//! `alg: none`, an algorithm its key does not have) with `401` and an RFC
//! 6750 challenge, before anything reaches Kafka. The tests sign their own
//! tokens with the test keys in `fixtures/auth`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure here is the test's answer

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use flashsale_testkit::flashsale_cli::surge::{self, Arrival, SkuPlan, SurgeOptions, TokenSigner};
use flashsale_testkit::flashsale_core::bus::kafka::topic;
use flashsale_testkit::flashsale_core::clock;
use flashsale_testkit::flashsale_core::status::PurchaseStatus;
use flashsale_testkit::{Answer, Pipeline, PipelineOptions};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const ISSUER: &str = "https://id.flashsale.test";
const AUDIENCE: &str = "flashsale-gateway";
const SECRET: &str = "a-test-secret-of-more-than-32-bytes!";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/auth")
        .join(name)
}

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).expect("a test key")
}

/// Claims for `sub`, expiring `expires_in_s` from now (negative: already
/// expired, by more than the gateway's leeway).
fn claims(sub: &str, expires_in_s: i64) -> Value {
    let now = (clock::now_ms() / 1000) as i64;
    json!({"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + expires_in_s})
}

fn sign(algorithm: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut header = Header::new(algorithm);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).expect("signs")
}

fn hs256(claims: &Value, secret: &str) -> String {
    sign(
        Algorithm::HS256,
        None,
        claims,
        &EncodingKey::from_secret(secret.as_bytes()).expect("a secret"),
    )
}

fn es256(claims: &Value, private_pem: &str) -> String {
    sign(
        Algorithm::ES256,
        None,
        claims,
        &EncodingKey::from_ec_pem(&pem(private_pem)).expect("an EC key"),
    )
}

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).expect("json"))
}

/// `token` with its claims replaced, its signature kept.
fn tampered(token: &str, claims: &Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    format!("{}.{}.{}", parts[0], b64(claims), parts[2])
}

/// An unsigned token (`alg: none`), which must never be taken.
fn unsigned(claims: &Value) -> String {
    format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(claims)
    )
}

fn auth_env(key: (&'static str, String)) -> Vec<(&'static str, String)> {
    vec![
        key,
        ("FLASHSALE_GATEWAY_AUTH_ISSUER", ISSUER.into()),
        ("FLASHSALE_GATEWAY_AUTH_AUDIENCE", AUDIENCE.into()),
        ("FLASHSALE_GATEWAY_AUTH_LEEWAY_S", "5".into()),
        ("FLASHSALE_GATEWAY_USER_RPS", "0".into()),
    ]
}

/// POSTs one unit of `sku` with `token` (if any) and `body_user` (if any).
async fn post(
    http: &reqwest::Client,
    base: &str,
    sku: &str,
    token: Option<&str>,
    body_user: Option<&str>,
) -> Answer {
    let mut body = json!({"sku": sku, "quantity": 1});
    if let Some(user) = body_user {
        body["user_id"] = json!(user);
    }
    let mut request = http.post(format!("{base}/v1/purchases")).json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    Answer::of(request.send().await.expect("the gateway answers"))
        .await
        .expect("an answer")
}

async fn get(http: &reqwest::Client, base: &str, id: &str, token: Option<&str>) -> Answer {
    let mut request = http.get(format!("{base}/v1/purchases/{id}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    Answer::of(request.send().await.expect("the gateway answers"))
        .await
        .expect("an answer")
}

fn assert_challenged(answer: &Answer, case: &str, error: Option<&str>) {
    assert_eq!(answer.status, 401, "{case}: {:?}", answer.body);
    let challenge = answer.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.starts_with("Bearer realm=\"flashsale\""),
        "{case}: challenge {challenge:?}"
    );
    match error {
        Some(error) => assert!(
            challenge.contains(&format!("error=\"{error}\"")),
            "{case}: challenge {challenge:?}"
        ),
        None => assert!(!challenge.contains("error="), "{case}: {challenge:?}"),
    }
    assert!(
        answer.kind().ends_with("token"),
        "{case}: {:?}",
        answer.body
    );
}

/// A pipeline, and the base URL of a gateway of it that verifies HS256
/// tokens signed with `SECRET` (its first gateway verifies none).
async fn pipeline_with_a_gateway_keyed_by_the_secret() -> (Pipeline, String) {
    let mut p = Pipeline::start(PipelineOptions::default())
        .await
        .expect("pipeline starts");
    let base = p
        .add_gateway(&auth_env((
            "FLASHSALE_GATEWAY_AUTH_HS256_SECRET",
            SECRET.into(),
        )))
        .await
        .expect("a gateway that verifies tokens");
    (p, base)
}

/// HS256 with a shared secret: the subject buys, nobody else does, and a
/// buyer reads only their own purchases.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_that_verifies_tokens_sells_to_the_tokens_subject_only() {
    let (p, base) = pipeline_with_a_gateway_keyed_by_the_secret().await;
    let sku = p.sku("auth");
    p.create_sale(&sku, 10, 1).await.expect("a sale");
    let http = reqwest::Client::new();
    let alice = hs256(&claims("alice", 300), SECRET);

    let mut other_audience = claims("alice", 300);
    other_audience["aud"] = json!("another-service");
    let mut other_issuer = claims("alice", 300);
    other_issuer["iss"] = json!("https://evil.example");
    let mut no_subject = claims("alice", 300);
    no_subject.as_object_mut().expect("an object").remove("sub");
    let mut not_yet = claims("alice", 300);
    not_yet["nbf"] = json!((clock::now_ms() / 1000) + 120);
    let answer = post(&http, &base, sku.as_str(), None, None).await;
    assert_challenged(&answer, "no token", None);
    let another_key = "another-secret-also-32-bytes-long!!";
    let invalid = [
        ("expired", hs256(&claims("alice", -60), SECRET)),
        ("another audience", hs256(&other_audience, SECRET)),
        ("another issuer", hs256(&other_issuer, SECRET)),
        ("no subject", hs256(&no_subject, SECRET)),
        ("not valid yet", hs256(&not_yet, SECRET)),
        ("another key", hs256(&claims("alice", 300), another_key)),
        (
            "bob's claims, alice's signature",
            tampered(&alice, &claims("bob", 300)),
        ),
        ("alg none", unsigned(&claims("alice", 300))),
        (
            "ES256, not the key's algorithm",
            es256(&claims("alice", 300), "es256-private.pem"),
        ),
        ("garbage", "not.a.jwt".to_owned()),
    ];
    for (case, token) in &invalid {
        let answer = post(&http, &base, sku.as_str(), Some(token), None).await;
        assert_challenged(&answer, case, Some("invalid_token"));
    }
    // Not a bearer token at all.
    let answer = Answer::of(
        http.post(format!("{base}/v1/purchases"))
            .basic_auth("alice", Some("password"))
            .json(&json!({"sku": sku.as_str(), "quantity": 1}))
            .send()
            .await
            .expect("answers"),
    )
    .await
    .expect("an answer");
    assert_challenged(&answer, "basic auth", Some("invalid_request"));

    // Buying for someone else with a valid token.
    let answer = post(&http, &base, sku.as_str(), Some(&alice), Some("bob")).await;
    assert_eq!(answer.status, 403, "{:?}", answer.body);
    assert_eq!(answer.kind(), "user-mismatch");

    // Nothing refused reached Kafka.
    let purchases = p.topic(topic::PURCHASE_REQUESTS);
    assert_eq!(p.records_in(&purchases).await.expect("watermarks"), 0);

    // The subject buys, naming themselves or not.
    let bob = hs256(&claims("bob", 300), SECRET);
    let answer = post(&http, &base, sku.as_str(), Some(&alice), None).await;
    assert_eq!(answer.status, 202, "{:?}", answer.body);
    let alices = answer.body["request_id"]
        .as_str()
        .expect("an id")
        .to_owned();
    let answer = post(&http, &base, sku.as_str(), Some(&bob), Some("bob")).await;
    assert_eq!(answer.status, 202, "{:?}", answer.body);
    assert_eq!(p.records_in(&purchases).await.expect("watermarks"), 2);

    // Confirmed, as alice's; read by alice, never by bob or by nobody.
    let status: PurchaseStatus = flashsale_testkit::eventually(
        "alice's purchase confirmed",
        Duration::from_secs(60),
        || async {
            let answer = get(&http, &base, &alices, Some(&alice)).await;
            serde_json::from_value::<PurchaseStatus>(answer.body)
                .ok()
                .filter(|s| s.status.is_terminal())
        },
    )
    .await;
    assert_eq!(status.status.as_str(), "confirmed");
    assert_eq!(status.user_id, "alice");
    let answer = get(&http, &base, &alices, Some(&bob)).await;
    assert_eq!(
        answer.status, 404,
        "bob reads alice's purchase: {:?}",
        answer.body
    );
    let answer = get(&http, &base, &alices, None).await;
    assert_challenged(&answer, "a status read without a token", None);

    // The gateway that does not verify tokens still needs a user_id.
    let answer = post(&http, &p.gateway_url, sku.as_str(), None, None).await;
    assert_eq!(answer.status, 422, "{:?}", answer.body);
    assert_eq!(answer.kind(), "invalid-user-id");
    p.stop().await;
}

/// ES256 with a PEM public key, and RS256 from a JWKS chosen by `kid`:
/// only tokens signed with the trusted keys, in the keys' own algorithm.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_signed_with_a_public_key_or_a_key_set_are_verified() {
    let mut p = Pipeline::start(PipelineOptions::default())
        .await
        .expect("pipeline starts");
    let sku = p.sku("authpk");
    p.create_sale(&sku, 10, 1).await.expect("a sale");
    let http = reqwest::Client::new();

    let es_gateway = p
        .add_gateway(&auth_env((
            "FLASHSALE_GATEWAY_AUTH_PUBLIC_KEY_FILE",
            fixture("es256-public.pem").display().to_string(),
        )))
        .await
        .expect("a gateway with an EC public key");
    let answer = post(
        &http,
        &es_gateway,
        sku.as_str(),
        Some(&es256(&claims("carol", 300), "es256-private.pem")),
        None,
    )
    .await;
    assert_eq!(answer.status, 202, "{:?}", answer.body);
    let answer = post(
        &http,
        &es_gateway,
        sku.as_str(),
        Some(&es256(&claims("carol", 300), "es256-other-private.pem")),
        None,
    )
    .await;
    assert_challenged(&answer, "ES256, another key", Some("invalid_token"));
    // The public key, which anyone has, used as an HMAC secret.
    let confused = hs256(
        &claims("carol", 300),
        &String::from_utf8(pem("es256-public.pem")).expect("PEM is text"),
    );
    let answer = post(&http, &es_gateway, sku.as_str(), Some(&confused), None).await;
    assert_challenged(
        &answer,
        "HS256 keyed with the public key",
        Some("invalid_token"),
    );

    // A key set with the RSA key under kid "k1" and the EC one under "k2".
    let rsa = EncodingKey::from_rsa_pem(&pem("rs256-private.pem")).expect("an RSA key");
    let ec = EncodingKey::from_ec_pem(&pem("es256-private.pem")).expect("an EC key");
    let mut k1 = Jwk::from_encoding_key(&rsa, Algorithm::RS256).expect("a JWK");
    k1.common.key_id = Some("k1".into());
    let mut k2 = Jwk::from_encoding_key(&ec, Algorithm::ES256).expect("a JWK");
    k2.common.key_id = Some("k2".into());
    let jwks = std::env::temp_dir().join(format!("{}-jwks.json", p.prefix));
    std::fs::write(
        &jwks,
        serde_json::to_vec(&JwkSet { keys: vec![k1, k2] }).expect("json"),
    )
    .expect("the key set is written");
    let set_gateway = p
        .add_gateway(&auth_env((
            "FLASHSALE_GATEWAY_AUTH_JWKS_FILE",
            jwks.display().to_string(),
        )))
        .await
        .expect("a gateway with a key set");
    let by_rsa = sign(Algorithm::RS256, Some("k1"), &claims("dave", 300), &rsa);
    let answer = post(&http, &set_gateway, sku.as_str(), Some(&by_rsa), None).await;
    assert_eq!(answer.status, 202, "{:?}", answer.body);
    let by_ec = sign(Algorithm::ES256, Some("k2"), &claims("erin", 300), &ec);
    let answer = post(&http, &set_gateway, sku.as_str(), Some(&by_ec), None).await;
    assert_eq!(answer.status, 202, "{:?}", answer.body);
    for (case, token) in [
        (
            "no kid",
            sign(Algorithm::RS256, None, &claims("dave", 300), &rsa),
        ),
        (
            "unknown kid",
            sign(Algorithm::RS256, Some("k9"), &claims("dave", 300), &rsa),
        ),
        (
            "the EC key under the RSA kid",
            sign(Algorithm::ES256, Some("k1"), &claims("dave", 300), &ec),
        ),
        ("tampered", tampered(&by_rsa, &claims("mallory", 300))),
        (
            "expired",
            sign(Algorithm::RS256, Some("k1"), &claims("dave", -60), &rsa),
        ),
    ] {
        let answer = post(&http, &set_gateway, sku.as_str(), Some(&token), None).await;
        assert_challenged(&answer, case, Some("invalid_token"));
    }
    let purchases = p.topic(topic::PURCHASE_REQUESTS);
    assert_eq!(p.records_in(&purchases).await.expect("watermarks"), 3);
    let _ = std::fs::remove_file(&jwks);
    p.stop().await;
}

/// The load generator signs its buyers' tokens with a test key, so a surge
/// goes through the same check real buyers do; without tokens, it sells
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_surge_with_tokens_goes_through_the_token_check() {
    let (p, base) = pipeline_with_a_gateway_keyed_by_the_secret().await;
    let options = |sku, tokens| SurgeOptions {
        gateway_url: base.clone(),
        skus: SkuPlan::only(sku, 20),
        buyers: 200,
        arrival: Arrival::Burst,
        per_user_limit: 1,
        overbook: 1.5,
        payment_decline_rate: 0.0,
        payment_latency_ms: 5,
        connections: 32,
        max_retries: 0,
        settle_timeout: Duration::from_secs(120),
        tokens,
        opens_in: Duration::ZERO,
        thresholds: Vec::new(),
        shard: None,
        start_at_unix_ms: None,
        lag_from: None,
        progress: false,
        behaviour: surge::Behaviour::default(),
    };
    let signer = TokenSigner {
        secret: SECRET.into(),
        issuer: ISSUER.into(),
        audience: AUDIENCE.into(),
    };
    let report = surge::run(&p.stores, &options(p.sku("surgeauth"), Some(signer)))
        .await
        .expect("the surge runs");
    println!("{}", report.human());
    assert_eq!(report.shed.invalid, 0, "tokens refused: {report:?}");
    assert_eq!(report.errors, 0);
    assert_eq!(report.units_sold, 20, "{report:?}");
    assert_eq!(report.unsettled, 0);
    assert!(report.audit_ok);

    let report = surge::run(&p.stores, &options(p.sku("surgenoauth"), None))
        .await
        .expect("the surge runs");
    assert_eq!(report.shed.invalid, 200, "{report:?}");
    assert_eq!(report.accepted, 0);
    p.stop().await;
}
