//! Registering a service's Prometheus metrics: each is made and registered
//! in one call, so none can be made and then left out of `/metrics`, and
//! every service registers its metrics the same way.

use prometheus::core::Collector;
use prometheus::{
    Counter, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry,
};

/// Makes metrics into one registry.
#[derive(Debug, Clone, Copy)]
pub struct Registrar<'a>(&'a Registry);

impl<'a> Registrar<'a> {
    pub fn new(registry: &'a Registry) -> Self {
        Self(registry)
    }

    fn add<C: Collector + Clone + 'static>(&self, metric: C) -> Result<C, prometheus::Error> {
        self.0.register(Box::new(metric.clone()))?;
        Ok(metric)
    }

    pub fn counter(&self, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
        self.add(IntCounter::new(name, help)?)
    }

    pub fn counters(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntCounterVec, prometheus::Error> {
        self.add(IntCounterVec::new(Opts::new(name, help), labels)?)
    }

    /// Counters by one label whose values are known up front, each shown
    /// at 0 from the start: a series that first appears at 1 has no
    /// increase, so an alert on the counter's increase would miss the first
    /// event.
    pub fn counters_from_zero(
        &self,
        name: &str,
        help: &str,
        label: &str,
        values: &[impl AsRef<str>],
    ) -> Result<IntCounterVec, prometheus::Error> {
        let counters = self.counters(name, help, &[label])?;
        for value in values {
            counters.with_label_values(&[value.as_ref()]);
        }
        Ok(counters)
    }

    pub fn gauge(&self, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
        self.add(IntGauge::new(name, help)?)
    }

    pub fn gauges(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntGaugeVec, prometheus::Error> {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels)?)
    }

    /// A counter of seconds, or of anything not whole.
    pub fn float_counter(&self, name: &str, help: &str) -> Result<Counter, prometheus::Error> {
        self.add(Counter::new(name, help)?)
    }

    pub fn float_gauge(&self, name: &str, help: &str) -> Result<Gauge, prometheus::Error> {
        self.add(Gauge::new(name, help)?)
    }

    pub fn float_gauges(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<GaugeVec, prometheus::Error> {
        self.add(GaugeVec::new(Opts::new(name, help), labels)?)
    }

    pub fn histogram(
        &self,
        name: &str,
        help: &str,
        buckets: Vec<f64>,
    ) -> Result<Histogram, prometheus::Error> {
        self.add(Histogram::with_opts(
            HistogramOpts::new(name, help).buckets(buckets),
        )?)
    }

    pub fn histograms(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: Vec<f64>,
    ) -> Result<HistogramVec, prometheus::Error> {
        self.add(HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets),
            labels,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_made_is_exported_and_made_once() {
        let registry = Registry::new();
        let make = Registrar::new(&registry);
        let sold = make.counters("sold_total", "Units sold", &["sku"]).unwrap();
        sold.with_label_values(&["tv"]).inc();
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|family| family.name().to_owned())
            .collect();
        assert_eq!(names, ["sold_total"]);
        assert!(
            make.counter("sold_total", "again").is_err(),
            "a second metric of one name is refused"
        );
    }
}
