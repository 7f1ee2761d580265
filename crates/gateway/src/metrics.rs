//! The gateway's Prometheus metrics: what it answered, what it shed and
//! why, how admission went, how long the broker took to acknowledge, and
//! whether its copy of the sku flags is following Redis.

use flashsale_core::service::metrics::Registrar;
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, Registry};

#[derive(Clone)]
pub struct Metrics {
    pub responses: IntCounterVec,
    pub shed: IntCounterVec,
    pub admissions: IntCounterVec,
    pub redis_calls: IntCounterVec,
    pub produce_seconds: Histogram,
    pub in_flight: IntGauge,
    pub flag_messages: IntCounter,
    pub flag_rereads: IntCounter,
    pub flags_subscribed: IntGauge,
    pub limited_users: IntGauge,
    /// Long-polls waiting for a status change.
    pub long_polls: IntGauge,
    /// Producers replaced after a fatal error.
    pub producer_renewals: IntGauge,
    /// Arrivals the trace recorder could not keep up with.
    pub trace_dropped: IntCounter,
}

impl Metrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let make = Registrar::new(registry);
        Ok(Self {
            responses: make.counters(
                "gateway_responses_total",
                "Responses by route and status",
                &["route", "status"],
            )?,
            shed: make.counters_from_zero(
                "gateway_shed_total",
                "Purchases refused before Kafka, by reason",
                "reason",
                &crate::refusal::STORE_FAILURE_REASONS,
            )?,
            admissions: make.counters(
                "gateway_admissions_total",
                "Answers of the shared admission window, by outcome",
                &["outcome"],
            )?,
            redis_calls: make.counters(
                "gateway_purchase_redis_calls_total",
                "Redis calls made while answering a POST, by call (status, admit): \
                 a refusal answered from memory makes none",
                &["call"],
            )?,
            produce_seconds: make.histogram(
                "gateway_produce_seconds",
                "Time until the broker acknowledged a purchase",
                vec![
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
                ],
            )?,
            in_flight: make.gauge("gateway_in_flight_produces", "Produces awaiting the broker")?,
            flag_messages: make.counter(
                "gateway_flag_messages_total",
                "Sku flag changes (sold out, closed, line full) heard from Redis",
            )?,
            flag_rereads: make.counter(
                "gateway_flag_rereads_total",
                "Full rereads of every sku's flags (after subscribing, then periodically)",
            )?,
            flags_subscribed: make.gauge(
                "gateway_flags_subscribed",
                "1 while subscribed to flag changes, 0 while reconnecting",
            )?,
            limited_users: make.gauge(
                "gateway_rate_limited_users",
                "Buyers whose rate-limit bucket is not full",
            )?,
            long_polls: make.gauge(
                "gateway_long_polls",
                "Long-polls waiting for a purchase's status to change",
            )?,
            producer_renewals: make.gauge(
                "gateway_producer_renewals",
                "Kafka producers replaced after a fatal error (an alert should fire on any)",
            )?,
            trace_dropped: make.counter(
                "gateway_trace_dropped_total",
                "Arrivals not recorded to the trace file: its writer fell behind",
            )?,
        })
    }
}
