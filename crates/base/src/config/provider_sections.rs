//! `[providers.*]` and the sections that name providers (`[tools.*]`,
//! `[mcp_servers.*]`, `[elevenlabs] init_providers`): each checks that the
//! providers it names are configured.

use std::collections::BTreeMap;
use std::path::Path;

use super::raw::RawProvider;
use super::tools::{self, RawMcpServer, RawTool};
use super::{
    JwtConfig, McpServerConfig, ProviderConfig, SecretSource, ToolConfig, page_text_ok, valid_id,
};
use crate::secret::Secret;

/// `[providers.NAME]`, as written (presets are resolved later, by
/// `providers::Providers`); a `credential_from` must name a provider that
/// holds its own credential.
pub(super) fn providers(
    raw: BTreeMap<String, RawProvider>,
    dir: &Path,
    p: &mut Vec<String>,
    w: &mut Vec<String>,
) -> BTreeMap<String, ProviderConfig> {
    let mut providers = BTreeMap::new();
    for (name, rp) in raw {
        for (key, value, max) in [
            ("display_name", &rp.display_name, 64),
            ("description", &rp.description, 300),
        ] {
            if let Some(v) = value {
                if !page_text_ok(v, max) {
                    p.push(format!(
                        "[providers.{name}] {key}: 1-{max} characters without control characters"
                    ));
                }
            }
        }
        if !valid_id(&name) {
            p.push(format!(
                "[providers.{name}] provider names are 1-128 characters of A-Za-z0-9._@:+-"
            ));
        }
        let sec = format!("[providers.{name}]");
        let jwt = JwtConfig::from_raw(dir, &rp);
        let client_id = SecretSource::from_parts(
            dir,
            rp.client_id_file,
            rp.client_id_env,
            rp.client_id.map(Secret::new),
            &format!("{sec} client_id / client_id_env / client_id_file"),
            p,
        );
        let client_secret = SecretSource::from_parts(
            dir,
            rp.client_secret_file,
            rp.client_secret_env,
            rp.client_secret.map(Secret::new),
            &format!("{sec} client_secret / client_secret_env / client_secret_file"),
            p,
        );
        if matches!(client_secret, SecretSource::Inline(_)) {
            w.push(format!("{sec} client_secret is inline in the config file; prefer client_secret_env or client_secret_file"));
        }
        providers.insert(
            name,
            ProviderConfig {
                raw_inject: rp.inject,
                preset: rp.preset,
                display_name: rp.display_name,
                description: rp.description,
                base_url: rp.base_url,
                token_url: rp.token_url,
                authorize_url: rp.authorize_url,
                client_id,
                client_secret,
                client_auth: rp.client_auth,
                refresh_skew_secs: rp.refresh_skew_secs,
                refresh_cooldown_secs: rp.refresh_cooldown_secs,
                allow: rp.allow.unwrap_or_default(),
                grant: rp.grant,
                scopes: rp.scopes,
                user_scopes: rp.user_scopes,
                scope_separator: rp.scope_separator,
                authorize_params: rp.authorize_params.unwrap_or_default(),
                token_params: rp.token_params.unwrap_or_default(),
                allow_http: rp.allow_http.unwrap_or(false),
                tools: rp.tools.unwrap_or_default(),
                credential_from: rp.credential_from,
                headers: rp.headers.unwrap_or_default(),
                connection: rp.connection.unwrap_or_default(),
                pkce: rp.pkce,
                jwt,
            },
        );
    }
    for (name, pc) in &providers {
        let Some(from) = &pc.credential_from else {
            continue;
        };
        match providers.get(from) {
            None => p.push(format!(
                "[providers.{name}] credential_from: {from:?} is not a configured provider"
            )),
            Some(owner) if owner.credential_from.is_some() => p.push(format!(
                "[providers.{name}] credential_from: {from:?} itself uses credential_from; name the provider that holds the credential"
            )),
            Some(_) => {}
        }
    }
    providers
}

/// `[tools.NAME]`.
pub(super) fn tools(
    raw: BTreeMap<String, RawTool>,
    providers: &BTreeMap<String, ProviderConfig>,
    p: &mut Vec<String>,
) -> BTreeMap<String, ToolConfig> {
    let mut tools = BTreeMap::new();
    for (name, rt) in raw {
        let sec = format!("[tools.{name}]");
        if let Some(t) = tools::check_tool(&sec, &name, rt, p) {
            if !providers.contains_key(&t.provider) {
                p.push(format!(
                    "{sec} provider: {:?} is not a configured provider",
                    t.provider
                ));
            }
            tools.insert(name, t);
        }
    }
    tools
}

/// `[mcp_servers.NAME]`.
pub(super) fn mcp_servers(
    raw: BTreeMap<String, RawMcpServer>,
    providers: &BTreeMap<String, ProviderConfig>,
    p: &mut Vec<String>,
) -> BTreeMap<String, McpServerConfig> {
    let mut mcp_servers = BTreeMap::new();
    for (name, rm) in raw {
        if let Some(m) = tools::check_mcp_server(&name, rm, p) {
            if !providers.contains_key(&m.provider) {
                p.push(format!(
                    "[mcp_servers.{name}] provider: {:?} is not a configured provider",
                    m.provider
                ));
            }
            mcp_servers.insert(name, m);
        }
    }
    mcp_servers
}

/// `[elevenlabs] init_providers` names configured providers only.
pub(super) fn check_init_providers(
    init_providers: Option<&[String]>,
    providers: &BTreeMap<String, ProviderConfig>,
    p: &mut Vec<String>,
) {
    if let Some(list) = init_providers {
        for name in list {
            if !providers.contains_key(name) {
                p.push(format!(
                    "[elevenlabs] init_providers names {name:?}, which is not a configured provider"
                ));
            }
        }
    }
}
