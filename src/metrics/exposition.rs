//! The Prometheus text exposition format (version 0.0.4), written by hand.
//!
//! Why by hand: every number we export is read at scrape time from somewhere
//! that already keeps it (the replicated state, openraft's metrics, sled, the
//! executor) or from a few node-local instruments; a registry crate would add
//! a second copy of each. The format is small: per family one `# HELP` and one
//! `# TYPE` line, then `name{label="value",...} number` samples. What must be
//! right, and is tested below: label values escape `\`, `"` and newlines; HELP
//! text escapes `\` and newlines; histogram buckets are cumulative, end with
//! `le="+Inf"` (equal to `_count`), and come with `_sum` and `_count`; numbers
//! use Prometheus's spellings of infinity and NaN. A family without samples is
//! left out entirely (a HELP/TYPE pair with nothing under it is not valid for
//! every parser).

use std::fmt::Write;

use super::histogram::Histogram;

/// Content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Label pairs of one sample, in order.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

/// Builds one exposition, family by family.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn new() -> Self {
        Exposition::default()
    }

    pub fn finish(self) -> String {
        self.out
    }

    /// A family of counters or gauges, one sample per label set.
    pub fn family<'a, L>(&mut self, name: &str, kind: Kind, help: &str, samples: impl IntoIterator<Item = (L, f64)>)
    where
        L: AsRef<[(&'a str, &'a str)]>,
    {
        debug_assert!(kind != Kind::Histogram, "histograms go through `histograms`");
        let mut body = String::new();
        for (labels, value) in samples {
            sample(&mut body, name, labels.as_ref(), None, value);
        }
        self.push(name, kind, help, &body);
    }

    /// One unlabelled counter or gauge.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: f64) {
        self.family(name, kind, help, [(&[] as Labels, value)]);
    }

    /// A family of histograms, one per label set: cumulative `_bucket`
    /// samples (`le` last, ending at `+Inf`), then `_sum` and `_count`.
    pub fn histograms<'a, 'h, L>(
        &mut self,
        name: &str,
        help: &str,
        histograms: impl IntoIterator<Item = (L, &'h Histogram)>,
    ) where
        L: AsRef<[(&'a str, &'a str)]>,
    {
        let mut body = String::new();
        let (bucket, sum, count) = (format!("{name}_bucket"), format!("{name}_sum"), format!("{name}_count"));
        for (labels, h) in histograms {
            let labels = labels.as_ref();
            for (bound, n) in h.cumulative() {
                let le = number(bound);
                sample(&mut body, &bucket, labels, Some(("le", &le)), n as f64);
            }
            sample(&mut body, &sum, labels, None, h.sum());
            sample(&mut body, &count, labels, None, h.count() as f64);
        }
        self.push(name, Kind::Histogram, help, &body);
    }

    fn push(&mut self, name: &str, kind: Kind, help: &str, body: &str) {
        debug_assert!(valid_name(name), "metric name {name:?}");
        if body.is_empty() {
            return;
        }
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
        self.out.push_str(body);
    }
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], extra: Option<(&str, &str)>, value: f64) {
    out.push_str(name);
    let mut pairs = labels.iter().copied().chain(extra).peekable();
    if pairs.peek().is_some() {
        out.push('{');
        for (i, (key, value)) in pairs.enumerate() {
            debug_assert!(valid_name(key) && !key.contains(':'), "label name {key:?}");
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{key}=\"{}\"", escape_label_value(value));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {}", number(value));
}

/// A number as Prometheus spells it: `+Inf`, `-Inf`, `NaN`, or Rust's
/// shortest round-trip decimal (which Prometheus parses exactly).
pub fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// A label value inside double quotes: `\` → `\\`, `"` → `\"`, newline → `\n`.
pub fn escape_label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// HELP text: `\` → `\\`, newline → `\n` (quotes stay as they are).
pub fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut e = Exposition::new();
        e.family(
            "raftgen_test_total",
            Kind::Counter,
            "Help with a \\ backslash,\na newline and \"quotes\".",
            [([("model", "a\\b\"c\nd")], 3.0)],
        );
        assert_eq!(
            e.finish(),
            "# HELP raftgen_test_total Help with a \\\\ backslash,\\na newline and \"quotes\".\n\
             # TYPE raftgen_test_total counter\n\
             raftgen_test_total{model=\"a\\\\b\\\"c\\nd\"} 3\n"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_inf() {
        let mut h = Histogram::new(&[0.5, 1.0, 2.5]);
        for v in [0.25, 0.5, 0.75, 3.0, 100.0] {
            h.observe(v);
        }
        let mut e = Exposition::new();
        e.histograms("raftgen_test_seconds", "A test.", [([("model", "m")], &h)]);
        assert_eq!(
            e.finish(),
            "# HELP raftgen_test_seconds A test.\n\
             # TYPE raftgen_test_seconds histogram\n\
             raftgen_test_seconds_bucket{model=\"m\",le=\"0.5\"} 2\n\
             raftgen_test_seconds_bucket{model=\"m\",le=\"1\"} 3\n\
             raftgen_test_seconds_bucket{model=\"m\",le=\"2.5\"} 3\n\
             raftgen_test_seconds_bucket{model=\"m\",le=\"+Inf\"} 5\n\
             raftgen_test_seconds_sum{model=\"m\"} 104.5\n\
             raftgen_test_seconds_count{model=\"m\"} 5\n"
        );
    }

    #[test]
    fn empty_families_are_left_out_and_numbers_use_prometheus_spellings() {
        let mut e = Exposition::new();
        e.family("raftgen_nothing", Kind::Gauge, "No samples.", Vec::<(Labels, f64)>::new());
        e.histograms("raftgen_no_histograms", "None.", Vec::<(Labels, &Histogram)>::new());
        assert_eq!(e.finish(), "");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NEG_INFINITY), "-Inf");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(0.05), "0.05");
        assert_eq!(number(600.0), "600");
        assert_eq!(number(1e-7), "0.0000001");
    }

    /// The whole exposition, read back by a real parser: every family, its
    /// type and help, and the escaped label value come back as written.
    #[test]
    fn a_parser_reads_it_back() {
        let mut h = Histogram::new(&[1.0]);
        h.observe(0.5);
        let mut e = Exposition::new();
        e.single("raftgen_up", Kind::Gauge, "Up.", 1.0);
        e.family("raftgen_c_total", Kind::Counter, "C \\ d.", [([("model", "x\"y\\z\nw")], 2.0)]);
        e.histograms("raftgen_h_seconds", "H.", [(&[] as Labels, &h)]);
        let scrape = prom_text_format_parser::Scrape::parse(&e.finish()).expect("valid exposition");
        let kinds: Vec<(String, String)> =
            scrape.metrics.iter().map(|m| (m.name.clone(), m.kind.to_string())).collect();
        assert_eq!(
            kinds,
            [("raftgen_up", "gauge"), ("raftgen_c_total", "counter"), ("raftgen_h_seconds", "histogram")]
                .map(|(n, k)| (n.to_string(), k.to_string()))
        );
        // The parser keeps values escaped, as written on the wire.
        assert_eq!(scrape.metrics[1].samples[0].labels[0].value, "x\\\"y\\\\z\\nw");
        assert_eq!(scrape.metrics[1].help_desc.as_deref(), Some("C \\\\ d."));
        assert_eq!(scrape.metrics[2].samples.len(), 4, "two buckets, _sum and _count");
    }
}
