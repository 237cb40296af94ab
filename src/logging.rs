//! Log set-up: `tracing` to stderr, filtered by `SIDEKEY_LOG` or `RUST_LOG`.

use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// HTTP and TLS libraries can print raw frames at debug and trace level;
/// they are capped at info whatever the filter says, so a token in a header
/// never reaches the log.
const CAPS: &str =
    "h2=info,hyper=info,hyper_util=info,rustls=info,tokio_rustls=info,hyper_rustls=info,sled=info";

pub fn init(format: LogFormat) {
    let base = std::env::var("SIDEKEY_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let filter = EnvFilter::try_new(format!("{base},{CAPS}"))
        .unwrap_or_else(|_| EnvFilter::new(format!("info,{CAPS}")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
