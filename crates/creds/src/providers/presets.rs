//! The built-in presets: each provider's documented endpoints, client
//! authentication, PKCE, extra parameters, fixed headers, injection style
//! and error conventions. Sources and the reasoning behind each choice are
//! in `docs/providers.md`; where a fact could not be verified the
//! conservative choice is made here and said so there.

use http::HeaderName;

use super::{ClientAuth, ConnectionFrom, Injection, TokenFormat};

/// A preset's defaults; any key set in the provider's section wins.
pub(crate) struct Preset {
    pub display: &'static str,
    pub base_url: &'static str,
    pub token_url: Option<&'static str>,
    pub authorize_url: Option<&'static str>,
    pub inject: Injection,
    /// Extra authorize-URL parameters (besides client_id, redirect_uri,
    /// response_type, scope, state and the PKCE pair).
    pub authorize_params: &'static [(&'static str, &'static str)],
    /// Extra parameters on every token request (code exchange and refresh).
    pub token_params: &'static [(&'static str, &'static str)],
    pub scope_separator: &'static str,
    pub client_auth: ClientAuth,
    /// Whether the authorize URL carries an S256 code challenge.
    pub pkce: bool,
    pub token_format: TokenFormat,
    /// Sent on every proxied call unless the client sent its own.
    pub headers: &'static [(&'static str, &'static str)],
    /// Per-connection values: name, source, pattern (matched in full).
    pub connection: &'static [(&'static str, ConnectionFrom, &'static str)],
    /// Documented: each refresh answers a new refresh token (stored by the
    /// generic refresh; informational).
    pub rotates_refresh_token: bool,
    /// The callback query carries an `hmac` of the rest (Shopify).
    pub signed_callback: bool,
    pub ok_false_auth_errors: &'static [&'static str],
    pub reauth_errors: &'static [&'static str],
    pub nested_user_token: bool,
    /// The provider documents a JWT bearer grant (RFC 7523 §2.1), with
    /// this `aud` for its assertions.
    pub jwt_audience: Option<&'static str>,
    /// Its assertions carry the scopes as a `scope` claim (Google's form).
    pub jwt_scope_claim: bool,
}

pub const PRESETS: &[&str] = &[
    "google",
    "gmail",
    "google_sheets",
    "google_drive",
    "microsoft",
    "slack",
    "telegram",
    "notion",
    "hubspot",
    "salesforce",
    "zoom",
    "atlassian",
    "github",
    "linear",
    "airtable",
    "dropbox",
    "calendly",
    "asana",
    "shopify",
    "zendesk",
    "intercom",
    "discord",
    "whatsapp",
    "twilio",
    "stripe",
];

/// The defaults most OAuth providers share; each preset states the rest.
const OAUTH: Preset = Preset {
    display: "",
    base_url: "",
    token_url: None,
    authorize_url: None,
    inject: Injection::Bearer,
    authorize_params: &[],
    token_params: &[],
    scope_separator: " ",
    client_auth: ClientAuth::Body,
    pkce: true,
    token_format: TokenFormat::Form,
    headers: &[],
    connection: &[],
    rotates_refresh_token: false,
    signed_callback: false,
    ok_false_auth_errors: &[],
    reauth_errors: &["invalid_grant"],
    nested_user_token: false,
    jwt_audience: None,
    jwt_scope_claim: true,
};

/// A static credential (API key, bot token): no OAuth, no refresh.
const STATIC: Preset = Preset {
    pkce: false,
    reauth_errors: &[],
    ..OAUTH
};

const GOOGLE_AUTHORIZE: &str = "https://accounts.google.com/o/oauth2/v2/auth";
const GOOGLE_TOKEN: &str = "https://oauth2.googleapis.com/token";
/// `access_type=offline` makes Google issue a refresh token;
/// `prompt=consent` makes it issue one again on a reconnect.
const GOOGLE_PARAMS: &[(&str, &str)] = &[("access_type", "offline"), ("prompt", "consent")];

fn google(display: &'static str, base_url: &'static str) -> Preset {
    Preset {
        display,
        base_url,
        token_url: Some(GOOGLE_TOKEN),
        authorize_url: Some(GOOGLE_AUTHORIZE),
        authorize_params: GOOGLE_PARAMS,
        // Service accounts with domain-wide delegation: `aud` is the token
        // endpoint, scopes in a space-separated `scope` claim.
        jwt_audience: Some(GOOGLE_TOKEN),
        ..OAUTH
    }
}

pub(crate) fn preset(name: &str) -> Option<Preset> {
    Some(match name {
        "google" => google("Google", "https://www.googleapis.com"),
        "gmail" => google("Gmail", "https://gmail.googleapis.com/gmail/v1"),
        "google_sheets" => google("Google Sheets", "https://sheets.googleapis.com/v4"),
        "google_drive" => google("Google Drive", "https://www.googleapis.com/drive/v3"),
        "microsoft" => Preset {
            display: "Microsoft",
            base_url: "https://graph.microsoft.com/v1.0",
            authorize_url: Some("https://login.microsoftonline.com/common/oauth2/v2.0/authorize"),
            token_url: Some("https://login.microsoftonline.com/common/oauth2/v2.0/token"),
            authorize_params: &[("response_mode", "query")],
            rotates_refresh_token: true,
            reauth_errors: &[
                "invalid_grant",
                "interaction_required",
                "consent_required",
                "login_required",
            ],
            ..OAUTH
        },
        "slack" => Preset {
            display: "Slack",
            base_url: "https://slack.com/api",
            token_url: Some("https://slack.com/api/oauth.v2.access"),
            authorize_url: Some("https://slack.com/oauth/v2/authorize"),
            scope_separator: ",",
            rotates_refresh_token: true,
            ok_false_auth_errors: &["token_expired", "invalid_auth", "token_revoked"],
            reauth_errors: &["invalid_refresh_token", "invalid_grant", "token_revoked"],
            nested_user_token: true,
            ..OAUTH
        },
        "telegram" => Preset {
            display: "Telegram",
            base_url: "https://api.telegram.org",
            inject: Injection::PathPrefix {
                template: "/bot{token}".into(),
            },
            reauth_errors: &["invalid_grant"],
            ..STATIC
        },
        "notion" => Preset {
            display: "Notion",
            base_url: "https://api.notion.com/v1",
            authorize_url: Some("https://api.notion.com/v1/oauth/authorize"),
            token_url: Some("https://api.notion.com/v1/oauth/token"),
            authorize_params: &[("owner", "user")],
            client_auth: ClientAuth::Basic,
            pkce: false,
            token_format: TokenFormat::Json,
            headers: &[("notion-version", "2022-06-28")],
            rotates_refresh_token: true,
            ..OAUTH
        },
        "hubspot" => Preset {
            display: "HubSpot",
            base_url: "https://api.hubapi.com",
            authorize_url: Some("https://app.hubspot.com/oauth/authorize"),
            token_url: Some("https://api.hubapi.com/oauth/v1/token"),
            ..OAUTH
        },
        "salesforce" => Preset {
            display: "Salesforce",
            base_url: "{instance_url}/services/data/v62.0",
            authorize_url: Some("https://login.salesforce.com/services/oauth2/authorize"),
            token_url: Some("https://login.salesforce.com/services/oauth2/token"),
            connection: &[(
                "instance_url",
                ConnectionFrom::Token,
                r"https://[a-z0-9][a-z0-9-]{0,62}(\.[a-z0-9][a-z0-9-]{0,62}){0,4}\.(salesforce|force)\.com",
            )],
            // OAuth 2.0 JWT bearer flow: `aud` is the login host (sandboxes
            // set jwt_audience = "https://test.salesforce.com"); `iss` the
            // connected app's consumer key; no scope claim.
            jwt_audience: Some("https://login.salesforce.com"),
            jwt_scope_claim: false,
            ..OAUTH
        },
        "zoom" => Preset {
            display: "Zoom",
            base_url: "https://api.zoom.us/v2",
            authorize_url: Some("https://zoom.us/oauth/authorize"),
            token_url: Some("https://zoom.us/oauth/token"),
            client_auth: ClientAuth::Basic,
            rotates_refresh_token: true,
            ..OAUTH
        },
        "atlassian" => Preset {
            display: "Atlassian",
            base_url: "https://api.atlassian.com",
            authorize_url: Some("https://auth.atlassian.com/authorize"),
            token_url: Some("https://auth.atlassian.com/oauth/token"),
            authorize_params: &[("audience", "api.atlassian.com"), ("prompt", "consent")],
            pkce: false,
            headers: &[("accept", "application/json")],
            rotates_refresh_token: true,
            ..OAUTH
        },
        "github" => Preset {
            display: "GitHub",
            base_url: "https://api.github.com",
            authorize_url: Some("https://github.com/login/oauth/authorize"),
            token_url: Some("https://github.com/login/oauth/access_token"),
            headers: &[
                ("accept", "application/vnd.github+json"),
                ("x-github-api-version", "2022-11-28"),
            ],
            rotates_refresh_token: true,
            reauth_errors: &["bad_refresh_token", "invalid_grant"],
            ..OAUTH
        },
        "linear" => Preset {
            display: "Linear",
            base_url: "https://api.linear.app",
            authorize_url: Some("https://linear.app/oauth/authorize"),
            token_url: Some("https://api.linear.app/oauth/token"),
            scope_separator: ",",
            rotates_refresh_token: true,
            ..OAUTH
        },
        "airtable" => Preset {
            display: "Airtable",
            base_url: "https://api.airtable.com/v0",
            authorize_url: Some("https://airtable.com/oauth2/v1/authorize"),
            token_url: Some("https://airtable.com/oauth2/v1/token"),
            client_auth: ClientAuth::Basic,
            rotates_refresh_token: true,
            ..OAUTH
        },
        "dropbox" => Preset {
            display: "Dropbox",
            base_url: "https://api.dropboxapi.com/2",
            authorize_url: Some("https://www.dropbox.com/oauth2/authorize"),
            token_url: Some("https://api.dropboxapi.com/oauth2/token"),
            authorize_params: &[("token_access_type", "offline")],
            ..OAUTH
        },
        "calendly" => Preset {
            display: "Calendly",
            base_url: "https://api.calendly.com",
            authorize_url: Some("https://auth.calendly.com/oauth/authorize"),
            token_url: Some("https://auth.calendly.com/oauth/token"),
            rotates_refresh_token: true,
            ..OAUTH
        },
        "asana" => Preset {
            display: "Asana",
            base_url: "https://app.asana.com/api/1.0",
            authorize_url: Some("https://app.asana.com/-/oauth_authorize"),
            token_url: Some("https://app.asana.com/-/oauth_token"),
            ..OAUTH
        },
        "shopify" => Preset {
            display: "Shopify",
            base_url: "https://{shop}.myshopify.com/admin/api/2025-10",
            authorize_url: Some("https://{shop}.myshopify.com/admin/oauth/authorize"),
            token_url: Some("https://{shop}.myshopify.com/admin/oauth/access_token"),
            inject: Injection::Header {
                name: HeaderName::from_static("x-shopify-access-token"),
                template: "{token}".into(),
            },
            token_params: &[("expiring", "1")],
            scope_separator: ",",
            pkce: false,
            connection: &[("shop", ConnectionFrom::User, "[a-z0-9][a-z0-9-]{0,62}")],
            rotates_refresh_token: true,
            signed_callback: true,
            ..OAUTH
        },
        "zendesk" => Preset {
            display: "Zendesk",
            base_url: "https://{subdomain}.zendesk.com/api/v2",
            authorize_url: Some("https://{subdomain}.zendesk.com/oauth/authorizations/new"),
            token_url: Some("https://{subdomain}.zendesk.com/oauth/tokens"),
            connection: &[("subdomain", ConnectionFrom::User, "[a-z0-9][a-z0-9-]{0,62}")],
            rotates_refresh_token: true,
            ..OAUTH
        },
        "intercom" => Preset {
            display: "Intercom",
            base_url: "https://api.intercom.io",
            authorize_url: Some("https://app.intercom.com/oauth"),
            token_url: Some("https://api.intercom.io/auth/eagle/token"),
            pkce: false,
            reauth_errors: &[],
            ..OAUTH
        },
        "discord" => Preset {
            display: "Discord",
            base_url: "https://discord.com/api/v10",
            inject: Injection::Header {
                name: http::header::AUTHORIZATION,
                template: "Bot {token}".into(),
            },
            ..STATIC
        },
        "whatsapp" => Preset {
            display: "WhatsApp",
            base_url: "https://graph.facebook.com/v21.0",
            ..STATIC
        },
        "twilio" => Preset {
            display: "Twilio",
            base_url: "https://api.twilio.com/2010-04-01/Accounts/{account_sid}",
            inject: Injection::Basic,
            connection: &[("account_sid", ConnectionFrom::Admin, "AC[0-9a-fA-F]{32}")],
            ..STATIC
        },
        "stripe" => Preset {
            display: "Stripe",
            base_url: "https://api.stripe.com/v1",
            ..STATIC
        },
        _ => return None,
    })
}
