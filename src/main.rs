//! `sidekey` — parses the command line and calls the library.
//!
//! The library forbids `unsafe`; the one exception in the binary is
//! [`disable_core_dumps`], two libc calls with plain integer arguments.

#![deny(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sidekey::commands;
use sidekey::logging::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "sidekey",
    version,
    about = "Per-user credential vault and tool-call proxy for ElevenLabs voice agents"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// Config file; relative paths inside it are relative to its directory.
    #[arg(long, env = "SIDEKEY_CONFIG", default_value = "config.toml")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent-facing and admin listeners.
    Serve(ConfigArg),
    /// Validate the config and keys; exit 0, or print every problem and exit 2.
    CheckConfig(ConfigArg),
    /// Re-encrypt the store under a new master key (sidekey stopped).
    RotateKey {
        #[command(flatten)]
        config: ConfigArg,
        /// File with the new key: 32 random bytes, base64 (`openssl rand -base64 32`)
        /// or 64 hex digits (`openssl rand -hex 32`).
        #[arg(long)]
        new_key_file: PathBuf,
    },
    /// Write a consistent, still-encrypted copy of the store.
    Backup {
        #[command(flatten)]
        config: ConfigArg,
        /// Directory to create for the copy.
        #[arg(long)]
        out: PathBuf,
    },
    /// Copy every record of a sled store into the configured store (e.g.
    /// PostgreSQL); same master key; safe to run again.
    MigrateStore {
        #[command(flatten)]
        config: ConfigArg,
        /// The sled store directory to copy from (its `[store] path`).
        #[arg(long)]
        from: PathBuf,
    },
    /// A local upstream that answers with what it received (tokens masked),
    /// for the `demo` provider of the shipped config.
    EchoUpstream {
        #[command(flatten)]
        config: ConfigArg,
        /// Address to listen on (plain HTTP); default: the host and port of
        /// the config's [providers.demo] base_url, else 127.0.0.1:8099.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// List every operation tool (name, provider, method, path, parameters) as JSON.
    Tools(ConfigArg),
    /// List every configured provider as resolved (preset defaults filled
    /// in: URLs, injection, scope separator, shared credential,
    /// per-connection fields) as JSON; never a secret.
    Providers(ConfigArg),
    /// ElevenLabs tool definitions.
    Elevenlabs {
        #[command(subcommand)]
        command: ElevenLabsCommand,
    },
    /// Vapi tool definitions.
    Vapi {
        #[command(subcommand)]
        command: VoiceCommand,
    },
    /// Retell tool definitions.
    Retell {
        #[command(subcommand)]
        command: VoiceCommand,
    },
}

#[derive(Subcommand)]
enum VoiceCommand {
    /// Print one tool definition per operation tool, as JSON (as admin GET /v1/vapi/tools or /v1/retell/tools).
    Tools(ConfigArg),
}

#[derive(Subcommand)]
enum ElevenLabsCommand {
    /// Print the webhook tool definitions (as admin GET /v1/elevenlabs/tools).
    Tools(ConfigArg),
    /// Read a tool that calls a provider directly on stdin; print it re-pointed at sidekey.
    RewriteTool(ConfigArg),
    /// Print the MCP server record for sidekey's /v1/mcp (the body push-mcp sends).
    Mcp(ConfigArg),
    /// Create or update sidekey's MCP server record in an ElevenLabs workspace (ELEVENLABS_API_KEY).
    PushMcp {
        #[command(flatten)]
        config: ConfigArg,
        /// ElevenLabs API base URL (regional bases, test servers).
        #[arg(long)]
        api_base: Option<String>,
        /// Push even though ElevenLabs cannot reach [server] public_url
        /// (loopback, private, .local, or not https).
        #[arg(long)]
        allow_unreachable: bool,
    },
    /// Create or update the tools in an ElevenLabs workspace (ELEVENLABS_API_KEY).
    PushTools {
        #[command(flatten)]
        config: ConfigArg,
        /// ElevenLabs API base URL (regional bases, test servers).
        #[arg(long)]
        api_base: Option<String>,
        /// Push even though ElevenLabs cannot reach [server] public_url
        /// (loopback, private, .local, or not https).
        #[arg(long)]
        allow_unreachable: bool,
        /// Push only these providers' tools (repeatable); by default every
        /// provider's but the shipped `demo` one.
        #[arg(long = "provider", value_name = "NAME")]
        providers: Vec<String>,
    },
}

/// Set to `1` to keep core dumps possible (debugging a crash on a machine
/// whose core files are protected). Documented in docs/security.md.
const ALLOW_CORE_DUMPS_ENV: &str = "SIDEKEY_ALLOW_CORE_DUMPS";

/// A core file or a ptrace attach would expose every decrypted token, the
/// master key and the session signing key in this process's memory:
/// RLIMIT_CORE 0 (soft and hard, so it cannot be raised again) and, on
/// Linux, PR_SET_DUMPABLE 0 (no core even if a handler asks, and other
/// processes of the same user may not read /proc/PID/mem or attach).
#[cfg(unix)]
#[allow(unsafe_code)]
fn disable_core_dumps() -> Result<(), std::io::Error> {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `zero` is a valid, initialised rlimit that outlives the call;
    // setrlimit only reads it.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_DUMPABLE takes integer arguments only; no memory
        // is passed to the kernel.
        if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong, 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn disable_core_dumps() -> Result<(), std::io::Error> {
    Ok(())
}

/// `sidekey --config X serve`: the config path given before the command,
/// as many tools take it, is moved to the end, where the command's own
/// `--config` reads it (given twice, clap says so).
fn config_before_command(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut moved = Vec::new();
    let mut it = args.into_iter();
    out.extend(it.next());
    while let Some(a) = it.next() {
        let text = a.to_string_lossy();
        if text == "--config" {
            moved.push(a);
            moved.extend(it.next());
        } else if text.starts_with("--config=") {
            moved.push(a);
        } else if text == "--log-format" {
            out.push(a);
            out.extend(it.next());
        } else if text.starts_with('-') {
            out.push(a);
        } else {
            // The command: everything from here is the command's.
            out.push(a);
            out.extend(it);
            break;
        }
    }
    out.extend(moved);
    out
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(config_before_command(std::env::args_os().collect()));
    logging::init(cli.log_format);
    if std::env::var(ALLOW_CORE_DUMPS_ENV).is_ok_and(|v| v == "1") {
        tracing::warn!(
            "{ALLOW_CORE_DUMPS_ENV}=1: core dumps stay enabled; a core file would hold decrypted tokens and keys"
        );
    } else if let Err(e) = disable_core_dumps() {
        tracing::warn!(error = %e, "cannot disable core dumps");
    }
    sidekey::install_crypto_provider();
    let result = match cli.command {
        Command::Serve(c) => commands::serve(&c.config),
        Command::CheckConfig(c) => commands::check_config(&c.config),
        Command::RotateKey {
            config,
            new_key_file,
        } => commands::rotate_key(&config.config, &new_key_file),
        Command::Backup { config, out } => commands::backup(&config.config, &out),
        Command::MigrateStore { config, from } => commands::migrate_store(&config.config, &from),
        Command::EchoUpstream { config, listen } => commands::echo_upstream(&config.config, listen),
        Command::Tools(c) => commands::tools(&c.config),
        Command::Providers(c) => commands::providers(&c.config),
        Command::Elevenlabs { command } => match command {
            ElevenLabsCommand::Tools(c) => commands::elevenlabs_tools(&c.config),
            ElevenLabsCommand::RewriteTool(c) => {
                commands::elevenlabs_rewrite(&c.config, &mut std::io::stdin())
            }
            ElevenLabsCommand::Mcp(c) => commands::elevenlabs_mcp(&c.config),
            ElevenLabsCommand::PushMcp {
                config,
                api_base,
                allow_unreachable,
            } => commands::elevenlabs_push_mcp(
                &config.config,
                api_base.as_deref(),
                allow_unreachable,
            ),
            ElevenLabsCommand::PushTools {
                config,
                api_base,
                allow_unreachable,
                providers,
            } => commands::elevenlabs_push(
                &config.config,
                api_base.as_deref(),
                allow_unreachable,
                &providers,
            ),
        },
        Command::Vapi {
            command: VoiceCommand::Tools(c),
        } => commands::vapi_tools(&c.config),
        Command::Retell {
            command: VoiceCommand::Tools(c),
        } => commands::retell_tools(&c.config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            for line in e.to_string().lines() {
                eprintln!("error: {line}");
            }
            ExitCode::from(2)
        }
    }
}
