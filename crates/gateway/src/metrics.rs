//! The gateway's Prometheus metrics: what it answered, what it shed and
//! why, and how long the broker took to acknowledge.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    pub responses: IntCounterVec,
    pub shed: IntCounterVec,
    pub produce_seconds: Histogram,
    pub in_flight: IntGauge,
}

impl Metrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let metrics = Self {
            responses: IntCounterVec::new(
                Opts::new("gateway_responses_total", "Responses by route and status"),
                &["route", "status"],
            )?,
            shed: IntCounterVec::new(
                Opts::new(
                    "gateway_shed_total",
                    "Purchases refused before Kafka, by reason",
                ),
                &["reason"],
            )?,
            produce_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "gateway_produce_seconds",
                    "Time until the broker acknowledged a purchase",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
                ]),
            )?,
            in_flight: IntGauge::new("gateway_in_flight_produces", "Produces awaiting the broker")?,
        };
        registry.register(Box::new(metrics.responses.clone()))?;
        registry.register(Box::new(metrics.shed.clone()))?;
        registry.register(Box::new(metrics.produce_seconds.clone()))?;
        registry.register(Box::new(metrics.in_flight.clone()))?;
        Ok(metrics)
    }
}
