//! Log output: human-readable text (the default) or one JSON object per line
//! (`--log-format json`) for log shippers.
//!
//! A JSON line carries the event's own fields, the fields of every span it is
//! inside (the executor host runs each job inside a `job` span with `job_id`
//! and `attempt`), and the node's id once the node knows it, so every
//! job-related line names its job and its node without parsing messages.
//! One node runs per process, so the node id is process-wide.

use std::fmt;
use std::sync::OnceLock;

use clap::ValueEnum;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, Default, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

static NODE_ID: OnceLock<u64> = OnceLock::new();

/// Records this process's node id for every later log line.
pub fn set_node_id(id: u64) {
    let _ = NODE_ID.set(id);
}

/// Installs the global subscriber, writing to stderr; `RAFTGEN_LOG` filters.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env("RAFTGEN_LOG").unwrap_or_else(|_| EnvFilter::new("info,openraft=warn"));
    // Colours only on a terminal: a log file or journald gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.fmt_fields(JsonFields::new()).event_format(JsonLines).init(),
    }
}

/// One JSON object per event: `timestamp`, `level`, `target`, `node_id`,
/// `message`, then the span fields (outermost first) and the event's fields.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut line = Map::new();
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        line.insert("timestamp".into(), Value::String(timestamp));
        line.insert("level".into(), Value::String(event.metadata().level().to_string()));
        line.insert("target".into(), Value::String(event.metadata().target().to_string()));
        if let Some(id) = NODE_ID.get() {
            line.insert("node_id".into(), Value::from(*id));
        }
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                // Span fields were formatted by `JsonFields`: a JSON object.
                let Some(fields) = ext.get::<FormattedFields<N>>() else { continue };
                if let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(fields) {
                    line.extend(fields);
                }
            }
        }
        event.record(&mut FieldsToJson(&mut line));
        let text = serde_json::to_string(&Value::Object(line)).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

struct FieldsToJson<'a>(&'a mut Map<String, Value>);

impl Visit for FieldsToJson<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_string(), Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), Value::String(value.to_string()));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
}
