//! Log set-up: `tracing` to stderr, filtered by `SIDEKEY_LOG` or `RUST_LOG`.

use tracing_subscriber::filter::{FilterExt, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// HTTP and TLS libraries can print raw frames at debug and trace level;
/// they are capped at info whatever the filter says, so a token in a header
/// never reaches the log. The caps are a second filter that every event
/// must also pass, so no `SIDEKEY_LOG` directive lifts them, however
/// specific (`h2::codec=trace`, `hyper::proto::h1=trace`, span or field
/// directives): the filter can only lower what these targets log.
pub const CAPPED_TARGETS: &[&str] = &[
    "h2",
    "hyper",
    "hyper_util",
    "rustls",
    "tokio_rustls",
    "hyper_rustls",
    "sled",
];

fn caps() -> Targets {
    CAPPED_TARGETS
        .iter()
        .fold(Targets::new().with_default(LevelFilter::TRACE), |t, c| {
            t.with_target(*c, LevelFilter::INFO)
        })
}

pub fn init(format: LogFormat) {
    let base = std::env::var("SIDEKEY_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let filter = EnvFilter::try_new(&base).unwrap_or_else(|_| EnvFilter::new("info"));
    let filter = filter.and(caps());
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = match format {
        LogFormat::Json => tracing_subscriber::registry()
            .with(layer.json().flatten_event(true).with_filter(filter))
            .try_init(),
        LogFormat::Text => tracing_subscriber::registry()
            .with(layer.with_filter(filter))
            .try_init(),
    };
}
