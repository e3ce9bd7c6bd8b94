//! The table a collector walks: a family is a row (its name, help text,
//! kind and how it reads its value from one item), and a table encodes
//! each of its families over the items its label names. Values keep their
//! type (a gauge's float, a counter's integer or seconds), so the text of
//! every sample is what a hand-written encoder would write.

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

/// One sample's value, typed as its family encodes it.
#[derive(Debug, Clone, Copy)]
pub(super) enum Value {
    /// A gauge.
    Gauge(f64),
    /// A counter of events.
    Counter(u64),
    /// A counter of seconds.
    Seconds(f64),
}

impl Value {
    fn metric_type(self) -> MetricType {
        match self {
            Value::Gauge(_) => MetricType::Gauge,
            Value::Counter(_) | Value::Seconds(_) => MetricType::Counter,
        }
    }

    fn encode(self, m: MetricEncoder) -> Result<(), std::fmt::Error> {
        match self {
            Value::Gauge(v) => ConstGauge::new(v).encode(m),
            Value::Counter(v) => ConstCounter::new(v).encode(m),
            Value::Seconds(v) => ConstCounter::new(v).encode(m),
        }
    }
}

/// How a family reads its samples from one item of its table.
pub(super) enum Read<T> {
    /// A gauge.
    Gauge(fn(&T) -> f64),
    /// A gauge that only some items have.
    GaugeIf(fn(&T) -> Option<f64>),
    /// A counter of events.
    Counter(fn(&T) -> u64),
    /// A counter of seconds.
    Seconds(fn(&T) -> f64),
    /// Counters by one more label: its name, and each of its values with
    /// the count.
    CountersBy(&'static str, fn(&T) -> Vec<(&'static str, u64)>),
}

/// A sample's own label (after the table's), if any, and its value.
type Sample = (Option<(&'static str, &'static str)>, Value);

impl<T> Read<T> {
    fn metric_type(&self) -> MetricType {
        match self {
            Read::Gauge(_) | Read::GaugeIf(_) => MetricType::Gauge,
            Read::Counter(_) | Read::Seconds(_) | Read::CountersBy(..) => MetricType::Counter,
        }
    }

    fn samples(&self, item: &T) -> Vec<Sample> {
        match self {
            Read::Gauge(f) => vec![(None, Value::Gauge(f(item)))],
            Read::GaugeIf(f) => f(item)
                .map(|v| (None, Value::Gauge(v)))
                .into_iter()
                .collect(),
            Read::Counter(f) => vec![(None, Value::Counter(f(item)))],
            Read::Seconds(f) => vec![(None, Value::Seconds(f(item)))],
            Read::CountersBy(label, f) => f(item)
                .into_iter()
                .map(|(value, n)| (Some((*label, value)), Value::Counter(n)))
                .collect(),
        }
    }
}

/// One row of a table: a metric family.
pub(super) struct Family<T> {
    pub(super) name: &'static str,
    pub(super) help: &'static str,
    pub(super) read: Read<T>,
}

/// A table: the label that names its items and the families it encodes
/// for each.
pub(super) struct Table<T: 'static> {
    pub(super) label: &'static str,
    pub(super) key: fn(&T) -> String,
    pub(super) families: &'static [Family<T>],
}

impl<T> Table<T> {
    /// Each family in turn, with a sample (or none, or several) per item;
    /// a family no item has a sample of still gets its descriptor.
    pub(super) fn encode(
        &self,
        enc: &mut DescriptorEncoder,
        items: &[T],
    ) -> Result<(), std::fmt::Error> {
        for f in self.families {
            let mut m = enc.encode_descriptor(f.name, f.help, None, f.read.metric_type())?;
            for item in items {
                for (own, v) in f.read.samples(item) {
                    let mut labels = vec![(self.label, (self.key)(item))];
                    if let Some((name, value)) = own {
                        labels.push((name, value.to_string()));
                    }
                    v.encode(m.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

/// Families of one unlabelled sample each.
pub(super) fn encode_scalars(
    enc: &mut DescriptorEncoder,
    rows: &[(&str, &str, Value)],
) -> Result<(), std::fmt::Error> {
    for (name, help, v) in rows {
        let m = enc.encode_descriptor(name, help, None, v.metric_type())?;
        v.encode(m)?;
    }
    Ok(())
}
