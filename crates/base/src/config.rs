//! `config.toml`: parsing, defaults, and validation that reports every problem.
//!
//! Parsing is strict (unknown keys are errors, so a typo never silently
//! disables a setting). Validation collects every problem instead of
//! stopping at the first, so `sidekey check-config` can list them all.
//! Relative paths are resolved against the config file's directory.

use std::path::{Path, PathBuf};

use url::Url;

use crate::secret::Secret;

mod diagnostics;
mod jwt;
mod model;
mod provider_sections;
mod raw;
mod sections;
#[cfg(test)]
mod tests;
mod tools;
pub use jwt::JwtConfig;
pub use model::{
    AdminConfig, AuditConfig, Config, ConnectConfig, ElevenLabsConfig, LimitsConfig, OAuthConfig,
    ProviderConfig, ServerConfig, SessionsConfig, StoreBackend, StoreConfig, page_text_ok,
    parse_hex_color,
};
pub use raw::{ConnectionConfig, RawInject, RawProvider};
pub use tools::{
    HmacAlgorithm, McpServerConfig, ParamConfig, ParamIn, ParamType, PayloadPart, RetellConfig,
    ToolConfig, VapiConfig, VapiHmac, parse_pack, placeholders, valid_tool_name,
};

/// Where a secret comes from: a file, an environment variable, or (discouraged)
/// inline in the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
    Inline(Secret),
    Unset,
}

impl SecretSource {
    fn from_parts(
        dir: &Path,
        file: Option<String>,
        env: Option<String>,
        inline: Option<Secret>,
        what: &str,
        problems: &mut Vec<String>,
    ) -> SecretSource {
        let n = file.is_some() as u8 + env.is_some() as u8 + inline.is_some() as u8;
        if n > 1 {
            problems.push(format!(
                "{what}: give only one of the file, env and inline forms"
            ));
        }
        if let Some(f) = file {
            SecretSource::File(resolve(dir, &f))
        } else if let Some(e) = env {
            SecretSource::Env(e)
        } else if let Some(s) = inline {
            SecretSource::Inline(s)
        } else {
            SecretSource::Unset
        }
    }

    /// Reads the secret. `Ok(None)` when unset, or when the file or variable
    /// does not exist; `Err` when it exists but cannot be read. A file or
    /// variable that exists but is blank gives an empty secret (callers
    /// refuse it, naming the setting): it must never pass for "no secret"
    /// nor for a valid one.
    pub fn load(&self) -> Result<Option<Secret>, String> {
        match self {
            SecretSource::Unset => Ok(None),
            SecretSource::Inline(s) => Ok(Some(s.clone())),
            SecretSource::Env(name) => match std::env::var(name) {
                Ok(v) => Ok(Some(Secret::new(v.trim()))),
                Err(std::env::VarError::NotPresent) => Ok(None),
                Err(std::env::VarError::NotUnicode(_)) => {
                    Err(format!("environment variable {name} is not valid UTF-8"))
                }
            },
            SecretSource::File(path) => match std::fs::read_to_string(path) {
                Ok(v) => Ok(Some(Secret::new(v.trim()))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(format!("cannot read {}: {e}", path.display())),
            },
        }
    }

    /// How to name this source in a message (never the value).
    pub fn describe(&self) -> String {
        match self {
            SecretSource::File(p) => format!("file {}", p.display()),
            SecretSource::Env(n) => format!("environment variable {n}"),
            SecretSource::Inline(_) => "inline value".into(),
            SecretSource::Unset => "nothing".into(),
        }
    }
}

fn resolve(dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

pub const DEFAULT_CONFIG_PATH: &str = "config.toml";

/// Shortest secret sidekey accepts for the secrets it checks itself (admin
/// token, init secret, webhook secret): anything shorter can be guessed.
pub const MIN_SECRET_CHARS: usize = 16;

/// Why a loaded secret is refused (empty or shorter than `min`), or `None`.
pub fn weak_secret(s: &Secret, min: usize) -> Option<String> {
    let n = s.expose().chars().count();
    if n == 0 {
        Some("is empty".into())
    } else if n < min {
        Some(format!("is only {n} characters long; use at least {min}"))
    } else {
        None
    }
}

/// `1–128` characters of `A-Za-z0-9._@:+-`: user ids, tenant ids, provider names.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@:+-".contains(&b))
}

/// A config found without problems, or the problems.
pub fn without_problems((cfg, problems): (Config, Vec<String>)) -> Result<Config, Vec<String>> {
    if problems.is_empty() {
        Ok(cfg)
    } else {
        Err(problems)
    }
}

impl Config {
    /// Reads and validates a config file. On failure, every problem found.
    /// Provider sections are only parsed here; resolving them (presets,
    /// URLs, injection) is `providers::Providers::from_config`'s job.
    pub fn load(path: &Path) -> Result<Config, Vec<String>> {
        Config::read(path).and_then(without_problems)
    }

    /// Reads a config file and checks what this module owns. The config
    /// comes back with its problems (when the file could be made into one at
    /// all), so a caller that checks more — the providers — can report every
    /// problem at once (`check-config` lists all, not the first group).
    pub fn read(path: &Path) -> Result<(Config, Vec<String>), Vec<String>> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![format!(
                "cannot read config file {}: {e} (pass --config PATH or set SIDEKEY_CONFIG)",
                path.display()
            )]
        })?;
        let dir = path
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    p.to_path_buf()
                }
            })
            .unwrap_or_else(|| PathBuf::from("."));
        Config::check(&text, path, &dir)
    }

    pub fn parse(text: &str, path: &Path, dir: &Path) -> Result<Config, Vec<String>> {
        Config::check(text, path, dir).and_then(without_problems)
    }

    /// [`Config::parse`], returning the config together with its problems.
    pub fn check(
        text: &str,
        path: &Path,
        dir: &Path,
    ) -> Result<(Config, Vec<String>), Vec<String>> {
        let (raw, mut p) = diagnostics::parse_raw(text, path)?;
        let mut warnings = Vec::new();
        let mut cfg = Config::from_raw(raw, path, dir, &mut p, &mut warnings);
        cfg.warnings = warnings;
        Ok((cfg, p))
    }

    /// The sections in file order, each resolved by its own function; a
    /// later section gets what it needs of an earlier one's values.
    fn from_raw(
        raw: raw::RawConfig,
        path: &Path,
        dir: &Path,
        p: &mut Vec<String>,
        w: &mut Vec<String>,
    ) -> Config {
        let server = sections::server(raw.server, dir, p, w);
        let admin = sections::admin(raw.admin, dir, server.listen, p, w);
        let store = sections::store(raw.store, dir, server.upstream_timeout_secs, p);
        let sessions = sections::sessions(raw.sessions, dir, p);
        let elevenlabs =
            sections::elevenlabs(raw.elevenlabs, dir, server.upstream_timeout_secs, p, w);
        let limits = sections::limits(raw.limits, p);
        let audit = sections::audit(raw.audit);
        let oauth = sections::oauth(raw.oauth, w);
        let connect = ConnectConfig::from_raw(raw.connect, p);
        let providers = provider_sections::providers(raw.providers, dir, p, w);
        let tools = provider_sections::tools(raw.tools, &providers, p);
        let mcp_servers = provider_sections::mcp_servers(raw.mcp_servers, &providers, p);
        let vapi = VapiConfig::from_raw(dir, raw.vapi, p);
        let retell = RetellConfig::from_raw(dir, raw.retell, p);
        provider_sections::check_init_providers(
            elevenlabs.init_providers.as_deref(),
            &providers,
            p,
        );

        Config {
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
            server,
            admin,
            store,
            sessions,
            elevenlabs,
            limits,
            audit,
            oauth,
            connect,
            providers,
            tools,
            mcp_servers,
            vapi,
            retell,
            warnings: Vec::new(),
        }
    }
}

/// Loopback hosts may be reached over plain HTTP (local fakes, sidecars).
pub fn is_loopback_url(u: &Url) -> bool {
    match u.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}
