//! `POST /v1/elevenlabs/conversation-init`: a session for the call, as the
//! dynamic variables ElevenLabs puts into the agent's tools.

use super::*;

// ---------------------------------------------------------------------------
// Conversation-init webhook

#[derive(Deserialize, Default)]
pub(super) struct InitBody {
    #[serde(default)]
    caller_id: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    agent_id: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    called_number: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    call_sid: Option<String>,
    #[serde(default)]
    conversation_id: Option<String>,
}

async fn read_limited(req: Request<Incoming>, limit: u64) -> Result<Bytes, ApiError> {
    let (parts, body) = req.into_parts();
    crate::request::read_limited(&parts.headers, body, limit, Duration::from_secs(60)).await
}

/// A webhook answered with an error: counted, audited, answered.
pub(crate) fn refused(
    app: &App,
    path: &'static str,
    started: Instant,
    event: &str,
    outcome: &'static str,
    e: ApiError,
) -> Response<Body> {
    app.metrics.webhook(event, outcome);
    if matches!(e, ApiError::Unauthorized | ApiError::InvalidSignature(_)) {
        // Anyone can send these by the thousand: counted and summarised,
        // never one audit record each (see audit.rs).
        app.audit.refused(sidekey_creds::audit::Refused {
            path,
            code: e.code(),
            reason: None,
            status: e.status().as_u16(),
        });
    } else {
        record(
            app,
            path,
            e.status().as_u16(),
            started,
            None,
            None,
            Some(e.code()),
        );
    }
    e.into_response()
}

pub(crate) fn record(
    app: &App,
    path: &str,
    status: u16,
    started: Instant,
    user: Option<String>,
    conv: Option<String>,
    error: Option<&str>,
) {
    app.audit.record(AuditRecord {
        time: app.clock.now_millis(),
        kind: "webhook".into(),
        user,
        provider: None,
        method: "POST".into(),
        path: path.into(),
        status,
        duration_ms: (started.elapsed().as_secs_f64() * 1e6).round() / 1000.0,
        session_id: None,
        conversation_id: conv,
        error: error.map(str::to_owned),
        tool: None,
        subject: None,
    });
}

/// The user whose phone number `caller` is (any common notation), if any.
pub(crate) async fn user_by_caller(
    app: &App,
    caller: Option<&str>,
) -> Result<Option<String>, ApiError> {
    match caller.and_then(sidekey_base::users::normalize_phone) {
        Some(phone) => app.store.user_by_phone(&phone).await.map_err(|e| {
            tracing::error!(error = %e, "cannot look up caller");
            ApiError::Internal
        }),
        None => Ok(None),
    }
}

/// A session for a caller's call: the providers of `[elevenlabs]
/// init_providers` (default: every provider), bound to `conv` when it is
/// known. Returns the token.
pub(crate) async fn mint_for_caller(
    app: &App,
    user: &str,
    conv: Option<String>,
) -> Result<String, ApiError> {
    let providers = app
        .config
        .elevenlabs
        .init_providers
        .clone()
        .unwrap_or_else(|| app.providers.names().to_vec());
    let minted = app
        .sessions
        .mint_answer(
            &app.config.sessions.dynamic_variable,
            user,
            providers,
            app.config.sessions.ttl_secs,
            conv,
        )
        .await?;
    Ok(minted["token"].as_str().unwrap_or_default().to_owned())
}

/// `POST /v1/elevenlabs/conversation-init`: caller id → user → a fresh
/// session in `dynamic_variables`. Answers fast: no fsync on this path (the
/// session record reaches disk with sled's periodic flush).
pub async fn conversation_init(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let path = "/v1/elevenlabs/conversation-init";
    let presented = req
        .headers()
        .get("x-sidekey-init-secret")
        .map(|v| sha256(v.as_bytes()));
    let ok = match (&app.init_secret, presented) {
        // Blank secrets are refused at start; never compare against one.
        (Some(s), Some(p)) if !s.is_empty() => bool::from(sha256(s.expose().as_bytes()).ct_eq(&p)),
        (None, _) => {
            tracing::warn!(
                "conversation-init called but no init secret is configured ([elevenlabs] init_secret_env)"
            );
            false
        }
        _ => false,
    };
    if !ok {
        return refused(
            app,
            path,
            started,
            "conversation_init",
            "unauthorized",
            ApiError::Unauthorized,
        );
    }
    let result = async {
        let raw = read_limited(req, 64 * 1024).await?;
        let b: InitBody = if raw.iter().all(u8::is_ascii_whitespace) {
            InitBody::default()
        } else {
            crate::request::json_object(&raw)?
        };
        let conv = b
            .conversation_id
            .filter(|c| sidekey_creds::session::valid_conversation_id(c));
        let user = user_by_caller(app, b.caller_id.as_deref()).await?;
        let mut vars = serde_json::Map::new();
        if let Some(user) = &user {
            let token = mint_for_caller(app, user, conv.clone()).await?;
            vars.insert(app.config.sessions.dynamic_variable.clone(), json!(token));
        }
        vars.insert("user_id".into(), json!(user.clone().unwrap_or_default()));
        Ok::<_, ApiError>((user, conv, vars))
    }
    .await;
    match result {
        Ok((user, conv, vars)) => {
            let outcome = if user.is_some() {
                "known_caller"
            } else {
                "unknown_caller"
            };
            app.metrics.webhook("conversation_init", outcome);
            tracing::info!(
                known = user.is_some(),
                user = user.as_deref().unwrap_or("-"),
                "conversation-init answered"
            );
            record(app, path, 200, started, user, conv, None);
            body::json(
                StatusCode::OK,
                &json!({
                    "type": "conversation_initiation_client_data",
                    "dynamic_variables": Value::Object(vars),
                }),
            )
        }
        Err(e) => refused(app, path, started, "conversation_init", "error", e),
    }
}
