//! What every service's HTTP server does around its handlers (tower-http's
//! layers): an id for each request (`x-request-id`: the caller's, or a
//! fresh one), echoed in the answer and carried by the request's span; and
//! a handler that panics answered with a problem (`500 internal-error`),
//! not a dropped connection.
//!
//! Not tower-http's timeout or body limit: a purchase's timeout is its own
//! (it must void what the broker did not take, and answers a problem with
//! `Retry-After`), and axum's `DefaultBodyLimit` makes the JSON extractor
//! answer a body too large as a problem, where `RequestBodyLimitLayer`
//! answers a plain-text 413 of its own.

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::http::{HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;

use crate::service::problem::Problem;

/// The header a request's id travels in, both ways.
pub const REQUEST_ID: &str = "x-request-id";

/// Wraps a service's whole router (see the module's text).
///
/// One `Router::layer` call for all of them: each call boxes every route's
/// service and future once more, per request.
pub fn standard(router: Router) -> Router {
    let trace = TraceLayer::new_for_http()
        .make_span_with(|request: &Request<_>| {
            let id = request
                .headers()
                .get(REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            tracing::info_span!("http", method = %request.method(), path = request.uri().path(), x_request_id = id)
        })
        // A 5xx is not logged once per request here: in a flood every
        // shed buyer gets a 503; what failed is logged where it failed.
        .on_failure(());
    router.layer(
        ServiceBuilder::new()
            .layer(SetRequestIdLayer::x_request_id(Sequential::new()))
            .layer(PropagateRequestIdLayer::x_request_id())
            .layer(trace)
            .layer(catch_panics()),
    )
}

/// Request ids for requests that came without one: this process's random
/// prefix and a counter. Not tower-http's `MakeRequestUuid`: a v4 UUID
/// asks the kernel for randomness on every request (about 0.3 us more per
/// request, measured in process, on a refusal path of about 15 us); a
/// counter is as good for finding a request's lines in this process's log.
#[derive(Debug, Clone)]
struct Sequential {
    prefix: Arc<str>,
    next: Arc<AtomicU64>,
}

impl Sequential {
    fn new() -> Self {
        let prefix = uuid::Uuid::new_v4().simple().to_string();
        Self {
            prefix: prefix[..12].into(),
            next: Arc::new(AtomicU64::new(1)),
        }
    }
}

impl MakeRequestId for Sequential {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        HeaderValue::try_from(format!("{}-{n}", self.prefix))
            .ok()
            .map(RequestId::new)
    }
}

/// A handler's panic answered as a problem. A router that counts its
/// answers puts this inside its counter, so that these are counted too.
pub fn catch_panics() -> CatchPanicLayer<fn(Box<dyn Any + Send + 'static>) -> Response> {
    CatchPanicLayer::custom(panicked as fn(Box<dyn Any + Send + 'static>) -> Response)
}

fn panicked(payload: Box<dyn Any + Send + 'static>) -> Response {
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    tracing::error!(panic = %message, "a handler panicked");
    Problem::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal-error",
        "the service failed while answering this request (a bug, and logged); \
         a purchase sent with an Idempotency-Key can be sent again to learn what became of it",
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    use super::*;

    async fn call(router: Router, request: Request<Body>) -> Response {
        router.oneshot(request).await.expect("infallible")
    }

    fn request(id: Option<&str>) -> Request<Body> {
        let mut request = Request::get("/boom");
        if let Some(id) = id {
            request = request.header(REQUEST_ID, id);
        }
        request.body(Body::empty()).expect("a request")
    }

    #[tokio::test]
    async fn a_handler_that_panics_is_answered_with_a_problem() {
        let router = standard(Router::new().route(
            "/boom",
            get(|| async {
                if true {
                    panic!("a bug");
                }
                "unreachable"
            }),
        ));
        let response = call(router, request(Some("abc-1"))).await;
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let headers = response.headers();
        assert_eq!(
            headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some(crate::service::problem::CONTENT_TYPE)
        );
        assert_eq!(
            headers.get(REQUEST_ID).and_then(|v| v.to_str().ok()),
            Some("abc-1"),
            "the caller's id comes back"
        );
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .expect("a body");
        let problem: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(problem["type"], "internal-error");
    }

    #[tokio::test]
    async fn every_answer_carries_a_request_id() {
        let router = standard(Router::new().route("/boom", get(|| async { "fine" })));
        let response = call(router.clone(), request(None)).await;
        let id = response.headers().get(REQUEST_ID).expect("an id");
        let other = call(router, request(None)).await;
        assert_ne!(Some(id), other.headers().get(REQUEST_ID), "ids differ");
    }
}
