//! The CLI's commands, as library functions `main` calls. Each returns
//! `Err(Fatal)` with one clear line; `main` prints it and exits 2.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sidekey_base::clock::Clock;
use sidekey_base::config::{Config, StoreBackend};
use sidekey_base::errors::Fatal;
use sidekey_creds::bootstrap;
use sidekey_creds::providers::Providers;
use sidekey_creds::tools::Catalogue;
use sidekey_edge::app::App;
use sidekey_edge::server::{self, Listeners};
use sidekey_vault::{KeyRing, MasterKey, OpenError, Store, StoreOptions};

/// The config file with its providers resolved too: the problems of both
/// are reported together.
fn load_config(path: &Path) -> Result<Config, Fatal> {
    Config::read(path)
        .and_then(|(cfg, mut problems)| {
            match Providers::from_config(&cfg) {
                Ok(providers) => {
                    if let Err(mut e) = Catalogue::from_config(&cfg, &providers) {
                        problems.append(&mut e);
                    }
                }
                Err(mut e) => problems.append(&mut e),
            }
            sidekey_base::config::without_problems((cfg, problems))
        })
        .map_err(|problems| Fatal::new(problems.join("\n")))
}

fn runtime() -> Result<tokio::runtime::Runtime, Fatal> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Fatal::new(format!("cannot start the async runtime: {e}")))
}

/// `sidekey serve`: both listeners until SIGTERM/SIGINT.
pub fn serve(path: &Path) -> Result<(), Fatal> {
    let cfg = load_config(path)?;
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    let loaded =
        bootstrap::load(&cfg, cfg.store.generate_missing).map_err(|p| Fatal::new(p.join("\n")))?;
    for g in &loaded.generated {
        tracing::warn!("generated {g}");
    }
    for n in &loaded.notes {
        tracing::warn!("{n}");
    }
    let providers = Providers::from_config(&cfg).map_err(|p| Fatal::new(p.join("\n")))?;
    for p in providers.iter() {
        for n in &p.notes {
            tracing::warn!("{n}");
        }
    }
    let rt = runtime()?;
    rt.block_on(async move {
        let listeners = Listeners::for_config(&cfg).await?;
        let agent_addr = listeners
            .agent
            .local_addr()
            .map_err(|e| Fatal::new(e.to_string()))?;
        let admin_addr = listeners
            .admin
            .local_addr()
            .map_err(|e| Fatal::new(e.to_string()))?;
        let metrics_addr = listeners
            .metrics
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| format!("http://{a}/metrics"))
            .unwrap_or_else(|| "-".into());
        let tls = loaded.tls.clone();
        let admin_token_at = cfg.admin.token.describe();
        let store_at = match cfg.store.backend {
            sidekey_base::config::StoreBackend::Sled => cfg.store.path.display().to_string(),
            sidekey_base::config::StoreBackend::Postgres => "postgres".to_owned(),
        };
        let providers: Vec<String> = cfg.providers.keys().cloned().collect();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let app = App::new(cfg, loaded, Clock::system()).await?;
        tracing::info!(
            agent = %format!("{scheme}://{agent_addr}"),
            admin = %format!("http://{admin_addr}"),
            metrics = %metrics_addr,
            store = %store_at,
            key_id = %app.store.key_id().hex(),
            providers = ?providers,
            "sidekey ready"
        );
        tracing::info!(
            "admin API token: {admin_token_at} (send it as Authorization: Bearer <token>)"
        );
        server::run(app, listeners, tls, server::shutdown_signal()).await;
        Ok(())
    })
}

/// `sidekey check-config`: prints remarks and exits 0, or every problem.
pub fn check_config(path: &Path) -> Result<(), Fatal> {
    let cfg = load_config(path)?;
    let mut problems = Vec::new();
    let mut notes: Vec<String> = cfg.warnings.clone();
    match Providers::from_config(&cfg) {
        Ok(ps) => {
            for p in ps.iter() {
                notes.extend(p.notes.iter().cloned());
            }
        }
        Err(e) => problems.extend(e),
    }
    match bootstrap::check(&cfg) {
        Ok(n) => notes.extend(n),
        Err(p) => problems.extend(p),
    }
    if !problems.is_empty() {
        return Err(Fatal::new(problems.join("\n")));
    }
    for n in notes {
        eprintln!("note: {n}");
    }
    println!(
        "{}: OK ({} provider{}: {})",
        path.display(),
        cfg.providers.len(),
        if cfg.providers.len() == 1 { "" } else { "s" },
        cfg.providers.keys().cloned().collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

/// Opens the configured store for an offline command: a sled store must
/// exist and not be in use.
fn open_store_offline(rt: &tokio::runtime::Runtime, cfg: &Config) -> Result<Store, Fatal> {
    let keys = current_keys(cfg)?;
    if cfg.store.backend == StoreBackend::Sled {
        return Store::open(
            &cfg.store.path,
            keys,
            StoreOptions {
                flush_every_ms: cfg.store.flush_every_ms,
                ..Default::default()
            },
        )
        .map_err(|e| match e {
            OpenError::Locked(_) => Fatal::new(format!(
                "store at {} is in use: stop sidekey first",
                cfg.store.path.display()
            )),
            other => Fatal::new(other.message()),
        });
    }
    rt.block_on(sidekey_edge::app::open_store(cfg, keys))
}

fn current_keys(cfg: &Config) -> Result<KeyRing, Fatal> {
    if cfg.store.backend == StoreBackend::Sled && !sidekey_vault::exists(&cfg.store.path) {
        return Err(Fatal::new(format!(
            "store.path: there is no store at {}",
            cfg.store.path.display()
        )));
    }
    bootstrap::load(cfg, false)
        .map(|l| l.keys)
        .map_err(|p| Fatal::new(p.join("\n")))
}

/// `sidekey rotate-key --new-key-file PATH` (sidekey stopped).
pub fn rotate_key(path: &Path, new_key_file: &Path) -> Result<(), Fatal> {
    let cfg = load_config(path)?;
    let new_text = std::fs::read_to_string(new_key_file).map_err(|e| {
        Fatal::new(format!(
            "--new-key-file: cannot read {}: {e} (create one with `openssl rand -base64 32 > {}`)",
            new_key_file.display(),
            new_key_file.display()
        ))
    })?;
    let new_text = sidekey_base::secret::Secret::new(new_text);
    let new_key = MasterKey::parse(&new_text)
        .map_err(|e| Fatal::new(format!("--new-key-file: {} {e}", new_key_file.display())))?;
    let keys = current_keys(&cfg)?;
    // The current key again is refused, unless previous keys are listed: a
    // lazy rotation to it is under way, and re-sealing every record and the
    // key check under it finishes that rotation.
    let finishing = keys.current_id() == new_key.id();
    if finishing && cfg.store.previous_master_key_files.is_empty() {
        return Err(Fatal::new(
            "--new-key-file holds the key the store already uses; generate a new one with `openssl rand -base64 32`",
        ));
    }
    let new_id = new_key.id();
    let rt = runtime()?;
    drop(keys);
    let store = match open_store_offline(&rt, &cfg) {
        Ok(s) => s,
        Err(e) => {
            // A second run after a finished rotation: the configured key no
            // longer opens the store, but the new one does.
            if opens_with(&rt, &cfg, &new_text) {
                println!(
                    "the rotation is already done: the store is encrypted under key id {} from {}; point store.master_key_file at that file (nothing was changed)",
                    new_id.hex(),
                    new_key_file.display()
                );
                return Ok(());
            }
            return Err(e);
        }
    };
    // Replicas still serving would keep writing under the old key.
    let running = rt.block_on(store.running_replicas()).unwrap_or(0);
    if running > 0 {
        return Err(Fatal::new(format!(
            "{running} sidekey replica(s) are still serving this PostgreSQL store; stop every replica before rotate-key (or rotate lazily with store.previous_master_key_files)"
        )));
    }
    let n = rt
        .block_on(store.reseal_all(&KeyRing::new(new_key, vec![])))
        .map_err(|e| {
            Fatal::new(format!(
                "rotation stopped: {e}; the store is intact, run the same command again"
            ))
        })?;
    if finishing {
        println!(
            "re-encrypted {n} records under key id {}; remove store.previous_master_key_files (those keys no longer open this store)",
            new_id.hex()
        );
        return Ok(());
    }
    println!(
        "re-encrypted {n} records under key id {}; now point store.master_key_file at {} (the old key no longer opens this store)",
        new_id.hex(),
        new_key_file.display()
    );
    Ok(())
}

/// Whether the key in `text` alone opens the configured store.
fn opens_with(
    rt: &tokio::runtime::Runtime,
    cfg: &Config,
    text: &sidekey_base::secret::Secret,
) -> bool {
    let Ok(key) = MasterKey::parse(text) else {
        return false;
    };
    let ring = KeyRing::new(key, vec![]);
    match cfg.store.backend {
        StoreBackend::Sled => sidekey_vault::check_key(&cfg.store.path, &ring).unwrap_or(false),
        StoreBackend::Postgres => rt
            .block_on(sidekey_edge::app::open_store(cfg, ring))
            .is_ok(),
    }
}

/// `sidekey migrate-store --from SLED_DIR`: copies every record of a sled
/// store (same master key) into the configured store. Safe to re-run.
pub fn migrate_store(path: &Path, from: &Path) -> Result<(), Fatal> {
    let cfg = load_config(path)?;
    if !sidekey_vault::exists(from) {
        return Err(Fatal::new(format!(
            "--from: there is no sled store at {}",
            from.display()
        )));
    }
    if cfg.store.backend == StoreBackend::Sled && cfg.store.path == from {
        return Err(Fatal::new(
            "--from is the store this config already uses; point the config at the new backend ([store] backend = \"postgres\")",
        ));
    }
    let source_keys = bootstrap::load(&cfg, false)
        .map(|l| l.keys)
        .map_err(|p| Fatal::new(p.join("\n")))?;
    let source = Store::open(from, source_keys, StoreOptions::default()).map_err(|e| match e {
        OpenError::Locked(_) => Fatal::new(format!(
            "--from: the store at {} is in use; stop the sidekey that serves it first",
            from.display()
        )),
        other => Fatal::new(format!("--from: {}", other.message())),
    })?;
    let rt = runtime()?;
    let target = open_store_offline(&rt, &cfg)?;
    let n = rt.block_on(target.import_from(&source)).map_err(|e| {
        Fatal::new(format!(
            "migration stopped: {e}; nothing is lost, run the same command again"
        ))
    })?;
    println!(
        "copied {n} records from {} into the {} store (still sealed under key id {}); running this again is safe",
        from.display(),
        target.kind(),
        target.key_id().hex()
    );
    Ok(())
}

/// `sidekey backup --out PATH`: offline, or through the running server's
/// admin API when the store is in use.
pub fn backup(path: &Path, out: &Path) -> Result<(), Fatal> {
    let cfg = load_config(path)?;
    let out: PathBuf = if out.is_absolute() {
        out.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Fatal::new(e.to_string()))?
            .join(out)
    };
    if cfg.store.backend == StoreBackend::Postgres {
        return Err(Fatal::new(
            "backup: the store is PostgreSQL; back it up with pg_dump (the dump holds only ciphertext sealed under the master key; keep the key apart from the dump)",
        ));
    }
    let keys = current_keys(&cfg)?;
    let opened = Store::open(
        &cfg.store.path,
        keys,
        StoreOptions {
            flush_every_ms: cfg.store.flush_every_ms,
            ..Default::default()
        },
    );
    match opened {
        Ok(store) => {
            let n = store
                .backup_to(&out)
                .map_err(|e| Fatal::new(format!("--out: {e}")))?;
            println!(
                "backup written to {} ({n} records, still encrypted under key id {})",
                out.display(),
                store.key_id().hex()
            );
            Ok(())
        }
        Err(OpenError::Locked(_)) => backup_online(&cfg, &out),
        Err(e) => Err(Fatal::new(e.message())),
    }
}

fn backup_online(cfg: &Config, out: &Path) -> Result<(), Fatal> {
    let token = cfg.admin.token.load().map_err(Fatal::new)?.ok_or_else(|| {
        Fatal::new(format!(
            "admin token: {} is not set; it is needed to ask the running sidekey for a backup",
            cfg.admin.token.describe()
        ))
    })?;
    let addr = cfg.admin.listen;
    let rt = runtime()?;
    rt.block_on(async move {
        let client = sidekey_creds::client::build(std::time::Duration::from_secs(5), vec![]);
        let body = serde_json::json!({"out": out.to_string_lossy()});
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("http://{addr}/v1/admin/backup"))
            .header("authorization", format!("Bearer {}", token.expose()))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))
            .map_err(|e| Fatal::new(e.to_string()))?;
        let resp = client.request(req).await.map_err(|e| {
            Fatal::new(format!(
                "the store is in use but the admin API at http://{addr} did not answer ({}); is sidekey running with this config?",
                sidekey_base::errors::error_chain(&e)
            ))
        })?;
        let status = resp.status();
        use http_body_util::BodyExt;
        let bytes = resp.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        if !status.is_success() {
            return Err(Fatal::new(format!(
                "backup through the admin API failed: {}",
                v["error"]["message"].as_str().unwrap_or("unknown error")
            )));
        }
        println!("backup written to {} ({} records) by the running sidekey", out.display(), v["records"]);
        Ok(())
    })
}

fn config_and_providers(path: &Path) -> Result<(Config, Providers), Fatal> {
    let cfg = load_config(path)?;
    let p = Providers::from_config(&cfg).map_err(|e| Fatal::new(e.join("\n")))?;
    Ok((cfg, p))
}

fn catalogue(cfg: &Config, p: &Providers) -> Result<Catalogue, Fatal> {
    Catalogue::from_config(cfg, p).map_err(|e| Fatal::new(e.join("\n")))
}

/// `sidekey elevenlabs tools`
pub fn elevenlabs_tools(path: &Path) -> Result<(), Fatal> {
    let (cfg, p) = config_and_providers(path)?;
    let tools = sidekey_edge::elevenlabs::tools(&cfg, &p, &catalogue(&cfg, &p)?);
    println!(
        "{}",
        serde_json::to_string_pretty(&tools).unwrap_or_default()
    );
    Ok(())
}

/// `sidekey vapi tools`
pub fn vapi_tools(path: &Path) -> Result<(), Fatal> {
    let (cfg, p) = config_and_providers(path)?;
    let tools = sidekey_edge::vapi::tools(&cfg, &catalogue(&cfg, &p)?);
    println!(
        "{}",
        serde_json::to_string_pretty(&tools).unwrap_or_default()
    );
    Ok(())
}

/// `sidekey retell tools`
pub fn retell_tools(path: &Path) -> Result<(), Fatal> {
    let (cfg, p) = config_and_providers(path)?;
    let tools = sidekey_edge::retell::tools(&cfg, &catalogue(&cfg, &p)?);
    println!(
        "{}",
        serde_json::to_string_pretty(&tools).unwrap_or_default()
    );
    Ok(())
}

/// `sidekey elevenlabs rewrite-tool < tool.json`
pub fn elevenlabs_rewrite(path: &Path, input: &mut dyn Read) -> Result<(), Fatal> {
    let (cfg, p) = config_and_providers(path)?;
    let mut text = String::new();
    input
        .read_to_string(&mut text)
        .map_err(|e| Fatal::new(format!("cannot read the tool JSON from stdin: {e}")))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        Fatal::new(format!(
            "stdin is not JSON (line {}, column {}); pipe in a tool definition",
            e.line(),
            e.column()
        ))
    })?;
    let out = sidekey_edge::elevenlabs::rewrite_tool(&cfg, &p, &v).map_err(Fatal::new)?;
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    Ok(())
}

/// `sidekey elevenlabs push-tools [--api-base URL]`
pub fn elevenlabs_push(
    path: &Path,
    api_base: Option<&str>,
    allow_unreachable: bool,
    only: &[String],
) -> Result<(), Fatal> {
    let (cfg, p) = config_and_providers(path)?;
    reachable_by_elevenlabs(&cfg, allow_unreachable)?;
    for name in only {
        if p.get(name).is_none() {
            return Err(Fatal::new(format!(
                "--provider {name:?} is not a configured provider"
            )));
        }
    }
    let (key, base) = elevenlabs_api(&cfg, api_base)?;
    let cat = catalogue(&cfg, &p)?;
    // The shipped demo provider's upstream exists only on this machine:
    // never pushed unless named.
    let wanted = |provider: &str| {
        if only.is_empty() {
            provider != "demo"
        } else {
            only.iter().any(|o| o == provider)
        }
    };
    let tools: Vec<serde_json::Value> = sidekey_edge::elevenlabs::tools(&cfg, &p, &cat)
        .into_iter()
        .filter(|t| {
            let url = t["tool_config"]["api_schema"]["url"].as_str().unwrap_or("");
            if let Some((_, prov)) = url.rsplit_once("/v1/call/") {
                return wanted(prov);
            }
            if let Some((_, name)) = url.rsplit_once("/v1/tools/") {
                return cat.get(name).is_none_or(|tool| wanted(&tool.provider));
            }
            true
        })
        .collect();
    let rt = runtime()?;
    let lines = rt.block_on(async {
        let client = sidekey_creds::client::build(std::time::Duration::from_secs(10), vec![]);
        sidekey_edge::elevenlabs::push_tools(&client, &base, &key, &tools).await
    });
    match lines {
        Ok(lines) => {
            for l in lines {
                println!("{l}");
            }
            Ok(())
        }
        Err(e) => Err(Fatal::new(format!("push-tools: {e}"))),
    }
}

/// ElevenLabs calls tools from its own servers: a `public_url` they cannot
/// reach makes every pushed tool fail at call time, so it is refused here.
fn reachable_by_elevenlabs(cfg: &Config, allow: bool) -> Result<(), Fatal> {
    let public = &cfg.server.public_url;
    let Some(why) = unreachable_reason(public) else {
        return Ok(());
    };
    if allow {
        tracing::warn!("[server] public_url {public} {why}; pushing anyway (--allow-unreachable)");
        return Ok(());
    }
    Err(Fatal::new(format!(
        "[server] public_url {public} {why}, so ElevenLabs cannot reach it; set it to a public https URL (on a laptop, a tunnel: `cloudflared tunnel --url https://localhost:{port}`, see docs/elevenlabs.md), or pass --allow-unreachable",
        port = match cfg.server.listen.port() {
            0 => 8443,
            p => p,
        }
    )))
}

/// Why ElevenLabs' servers could not call `public_url`, if they could not.
pub fn unreachable_reason(public: &str) -> Option<&'static str> {
    let Ok(u) = url::Url::parse(public) else {
        return Some("is not a URL");
    };
    if u.scheme() != "https" {
        return Some("is not https");
    }
    match u.host() {
        None => Some("has no host"),
        Some(url::Host::Ipv4(ip)) => (ip.is_loopback()
            || ip.is_private()
            || ip.is_link_local()
            || ip.is_unspecified()
            || ip.is_broadcast()
            || ip.octets()[0] == 100 && (ip.octets()[1] & 0xc0) == 64)
            .then_some("is a loopback, private or link-local address"),
        Some(url::Host::Ipv6(ip)) => (ip.is_loopback()
            || ip.is_unspecified()
            || (ip.segments()[0] & 0xfe00) == 0xfc00
            || (ip.segments()[0] & 0xffc0) == 0xfe80)
            .then_some("is a loopback, private or link-local address"),
        Some(url::Host::Domain(d)) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            let local = d == "localhost"
                || !d.contains('.')
                || [
                    ".localhost",
                    ".local",
                    ".internal",
                    ".lan",
                    ".home.arpa",
                    ".test",
                    ".example",
                    ".invalid",
                ]
                .iter()
                .any(|s| d.ends_with(s));
            local.then_some("is a local name")
        }
    }
}

/// The ElevenLabs API key (from `[elevenlabs] api_key_env`) and base URL.
fn elevenlabs_api(cfg: &Config, api_base: Option<&str>) -> Result<(String, String), Fatal> {
    let key_env = cfg.elevenlabs.api_key_env.clone();
    let key = std::env::var(&key_env)
        .ok()
        .filter(|k| !k.trim().is_empty())
        .ok_or_else(|| {
            Fatal::new(format!(
                "{key_env} is not set; export your ElevenLabs API key (xi-api-key) in it"
            ))
        })?;
    let base = api_base
        .map(str::to_owned)
        .unwrap_or_else(|| cfg.elevenlabs.api_base.clone());
    if url::Url::parse(&base).is_err() {
        return Err(Fatal::new(format!("--api-base {base:?} is not a URL")));
    }
    Ok((key.trim().to_owned(), base))
}

/// `sidekey elevenlabs mcp`: the MCP server record push-mcp sends.
pub fn elevenlabs_mcp(path: &Path) -> Result<(), Fatal> {
    let (cfg, _) = config_and_providers(path)?;
    let record = sidekey_edge::elevenlabs::mcp_server(&cfg);
    println!(
        "{}",
        serde_json::to_string_pretty(&record).unwrap_or_default()
    );
    Ok(())
}

/// `sidekey elevenlabs push-mcp [--api-base URL]`
pub fn elevenlabs_push_mcp(
    path: &Path,
    api_base: Option<&str>,
    allow_unreachable: bool,
) -> Result<(), Fatal> {
    let (cfg, _) = config_and_providers(path)?;
    reachable_by_elevenlabs(&cfg, allow_unreachable)?;
    let (key, base) = elevenlabs_api(&cfg, api_base)?;
    let record = sidekey_edge::elevenlabs::mcp_server(&cfg);
    let rt = runtime()?;
    let line = rt.block_on(async {
        let client = sidekey_creds::client::build(std::time::Duration::from_secs(10), vec![]);
        sidekey_edge::elevenlabs::push_mcp(&client, &base, &key, &record).await
    });
    match line {
        Ok(l) => {
            println!("{l}");
            Ok(())
        }
        Err(e) => Err(Fatal::new(format!("push-mcp: {e}"))),
    }
}

/// `sidekey echo-upstream [--listen ADDR]`: serves until stopped, by
/// default where the config's `demo` provider sends its calls.
pub fn echo_upstream(path: &Path, listen: Option<std::net::SocketAddr>) -> Result<(), Fatal> {
    let listen = match listen {
        Some(a) => a,
        None => crate::demo::listen_from_config(path).map_err(Fatal::new)?,
    };
    let rt = runtime()?;
    rt.block_on(crate::demo::run(listen))
        .map_err(|e| Fatal::new(format!("--listen {listen}: {e}")))
}

/// Used by `serve` callers that already have a runtime (tests, embedding).
pub async fn start(
    cfg: Config,
    clock: Clock,
) -> Result<(Arc<App>, Listeners, Option<Arc<rustls::ServerConfig>>), Fatal> {
    let loaded =
        bootstrap::load(&cfg, cfg.store.generate_missing).map_err(|p| Fatal::new(p.join("\n")))?;
    let listeners = Listeners::for_config(&cfg).await?;
    let tls = loaded.tls.clone();
    let app = App::new(cfg, loaded, clock).await?;
    Ok((app, listeners, tls))
}

/// `sidekey providers`: every resolved provider as JSON, never a secret.
pub fn providers(path: &Path) -> Result<(), Fatal> {
    let (_cfg, providers) = config_and_providers(path)?;
    let list: Vec<serde_json::Value> = providers.iter().map(|p| p.describe()).collect();
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({ "providers": list }))
            .map_err(|e| Fatal::new(e.to_string()))?
    );
    Ok(())
}

/// `sidekey tools`: every operation tool (name, provider, method, path,
/// parameters) as JSON.
pub fn tools(path: &Path) -> Result<(), Fatal> {
    let (cfg, providers) = config_and_providers(path)?;
    let cat = catalogue(&cfg, &providers)?;
    let list: Vec<serde_json::Value> = cat.iter().map(|t| t.describe()).collect();
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({ "tools": list }))
            .map_err(|e| Fatal::new(e.to_string()))?
    );
    Ok(())
}
