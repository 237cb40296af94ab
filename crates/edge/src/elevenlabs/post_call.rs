//! The post-call webhook: its signature (checked before the body is read),
//! the fair body budget, and revoking the conversation's session.

use super::*;
use crate::webhook_body::BodyError;

// ---------------------------------------------------------------------------
// Post-call webhook

/// Parses `t=<unix>,v0=<hex>[,v0=<hex>...]`.
pub fn parse_signature(header: &str) -> Result<(i64, Vec<Vec<u8>>), &'static str> {
    let mut t = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        let Some((k, v)) = part.trim().split_once('=') else {
            return Err("malformed signature header");
        };
        match k.trim() {
            "t" => {
                t = Some(
                    v.trim()
                        .parse::<i64>()
                        .map_err(|_| "timestamp is not a number")?,
                )
            }
            "v0" => {
                let v = v.trim();
                if v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                    continue;
                }
                sigs.push(
                    (0..32)
                        .map(|i| u8::from_str_radix(&v[2 * i..2 * i + 2], 16).unwrap_or(0))
                        .collect(),
                );
            }
            _ => {}
        }
    }
    let t = t.ok_or("no timestamp")?;
    if sigs.is_empty() {
        return Err("no v0 signature");
    }
    Ok((t, sigs))
}

/// A signature header that parsed and whose timestamp is fresh: what can
/// be checked before a byte of the body is read.
pub struct PendingSignature {
    t: i64,
    sigs: Vec<Vec<u8>>,
    mac: Hmac<Sha256>,
}

impl PendingSignature {
    /// Parses the header and checks the timestamp against `now`, with
    /// `tolerance` seconds either side; the MAC is then fed the body as it
    /// streams in ([`PendingSignature::update`]).
    pub fn start(
        header: &str,
        secret: &[u8],
        now: i64,
        tolerance: i64,
    ) -> Result<PendingSignature, &'static str> {
        let (t, sigs) = parse_signature(header)?;
        // abs_diff: a crafted `t` (i64::MIN) must not overflow the subtraction.
        if now.abs_diff(t) > tolerance.max(0) as u64 {
            return Err("timestamp outside tolerance");
        }
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("any key size");
        mac.update(t.to_string().as_bytes());
        mac.update(b".");
        Ok(PendingSignature { t, sigs, mac })
    }

    /// The signed timestamp.
    pub fn timestamp(&self) -> i64 {
        self.t
    }

    pub fn update(&mut self, chunk: &[u8]) {
        self.mac.update(chunk);
    }

    /// Compares in constant time against every candidate.
    pub fn verify(self) -> Result<(), &'static str> {
        let expected = self.mac.finalize().into_bytes();
        // Every candidate is compared (no early exit), so timing does not
        // tell which of several signatures matched.
        let mut any = subtle::Choice::from(0u8);
        for s in &self.sigs {
            any |= expected.as_slice().ct_eq(s.as_slice());
        }
        if bool::from(any) {
            Ok(())
        } else {
            Err("signature mismatch")
        }
    }
}

/// Checks an `ElevenLabs-Signature` against HMAC-SHA256(secret, "t.body"),
/// in constant time, with `tolerance` seconds either side of `now`.
pub fn verify_signature(
    header: &str,
    body: &[u8],
    secret: &[u8],
    now: i64,
    tolerance: i64,
) -> Result<(), &'static str> {
    let mut p = PendingSignature::start(header, secret, now, tolerance)?;
    p.update(body);
    p.verify()
}

#[derive(Deserialize)]
pub(super) struct PostCall {
    #[serde(rename = "type")]
    kind: String,
    /// When the event happened (unix seconds); sessions minted after it
    /// are not the ones this event ends.
    #[serde(default)]
    event_timestamp: Option<f64>,
    #[serde(default)]
    data: Option<PostCallData>,
}

#[derive(Deserialize)]
pub(super) struct PostCallData {
    #[serde(default)]
    conversation_id: Option<String>,
    // Transcripts and base64 audio are skipped, not allocated.
    #[serde(flatten)]
    #[allow(dead_code)]
    rest: std::collections::HashMap<String, IgnoredAny>,
}

pub(super) const REVOKING_EVENTS: &[&str] = &[
    "post_call_transcription",
    "post_call_audio",
    "call_initiation_failure",
];

/// Why a post-call was refused: one of sidekey's errors, or a body that
/// did not arrive in time (408, which has no place among the contract's
/// agent-facing errors: only webhooks answer it).
pub(super) enum PostCallError {
    Api(ApiError),
    TooSlow(&'static str),
}

impl From<ApiError> for PostCallError {
    fn from(e: ApiError) -> Self {
        PostCallError::Api(e)
    }
}

pub(super) use crate::webhook_body::too_slow;

/// `POST /v1/elevenlabs/post-call`: revokes every session bound to the
/// conversation and minted before the event. Redelivery finds nothing
/// left to revoke and answers 200.
///
/// Nothing is read before the cheap checks pass: a secret is configured,
/// the signature header parses and its timestamp is fresh. The body is
/// then read into memory held in `app.webhook_bodies` (all post-call
/// bodies in flight share it fairly, see [`sidekey_base::limits::Sharing`]) while
/// the HMAC is computed over it.
pub async fn post_call(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let path = "/v1/elevenlabs/post-call";
    let mut verified = false;
    let result = async {
        let Some(secret) = &app.webhook_secret else {
            tracing::warn!("post-call webhook called but no webhook secret is configured ([elevenlabs] webhook_secret_env)");
            return Err(ApiError::InvalidSignature("no webhook secret configured").into());
        };
        let sig = req
            .headers()
            .get("elevenlabs-signature")
            .ok_or(ApiError::InvalidSignature("missing ElevenLabs-Signature header"))?
            .to_str()
            .map_err(|_| ApiError::InvalidSignature("malformed signature header"))?;
        let mut pending = PendingSignature::start(
            sig,
            secret.expose().as_bytes(),
            app.clock.now(),
            app.config.elevenlabs.webhook_tolerance_secs,
        )
        .map_err(ApiError::InvalidSignature)?;
        let raw = read_signed_body(app, req, &mut pending).await?;
        let signed_at = pending.timestamp();
        pending.verify().map_err(ApiError::InvalidSignature)?;
        verified = true;
        let ev: PostCall = crate::request::json_object(&raw)?;
        drop(raw);
        let conv = ev.data.and_then(|d| d.conversation_id);
        // A replayed (validly signed) event must not end a session minted
        // after it happened.
        let event_time = ev
            .event_timestamp
            .filter(|t| t.is_finite() && *t > 0.0)
            .map(|t| t as i64)
            .unwrap_or(signed_at)
            .min(signed_at);
        let mut revoked = 0;
        if REVOKING_EVENTS.contains(&ev.kind.as_str()) {
            if let Some(c) = &conv {
                revoked = revoke_conversation(app, c, event_time).await?;
            }
        }
        Ok::<_, PostCallError>((ev.kind, conv, revoked))
    }
    .await;
    match result {
        Ok((kind, conv, revoked)) => {
            app.metrics.webhook(
                &kind
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .take(64)
                    .collect::<String>(),
                "ok",
            );
            tracing::info!(event = %kind.chars().take(64).collect::<String>(), conversation_id = conv.as_deref().unwrap_or("-"), sessions_revoked = revoked, "post-call webhook");
            record(app, path, 200, started, None, conv, None);
            body::json(
                StatusCode::OK,
                &json!({"status": "ok", "sessions_revoked": revoked}),
            )
        }
        Err(PostCallError::TooSlow(why)) => {
            tracing::warn!(reason = why, "post-call body cut off");
            app.metrics.webhook("post_call", "refused");
            app.audit.refused(sidekey_creds::audit::Refused {
                path,
                code: "request_timeout",
                reason: None,
                status: 408,
            });
            too_slow("The request body did not arrive in time.")
        }
        Err(PostCallError::Api(e)) => {
            if let ApiError::InvalidSignature(why) = &e {
                tracing::warn!(reason = why, "post-call webhook refused");
            }
            if !verified {
                // Anyone can send an unsigned body by the thousand (and cut
                // it off, or overrun the budget): counted and summarised,
                // never one audit record each.
                app.metrics.webhook("post_call", "refused");
                app.audit.refused(sidekey_creds::audit::Refused {
                    path,
                    code: e.code(),
                    reason: None,
                    status: e.status().as_u16(),
                });
                return e.into_response();
            }
            refused(app, path, started, "post_call", "refused", e)
        }
    }
}

/// Revokes every session bound to `conversation` and minted at or before
/// `minted_by` (unix seconds): what a call's end ends. Flushed before it
/// answers; returns how many were revoked (0 on redelivery).
pub(crate) async fn revoke_conversation(
    app: &App,
    conversation: &str,
    minted_by: i64,
) -> Result<usize, ApiError> {
    let mut revoked = 0;
    let sids = app.store.sessions_for_conversation(conversation).await?;
    for sid in sids {
        let minted = app.store.session(&sid).await?.map(|r| r.iat);
        if minted.is_some_and(|iat| iat > minted_by) {
            continue;
        }
        if app.store.revoke_session(&sid).await? {
            revoked += 1;
        }
    }
    app.store.flush().await?;
    Ok(revoked)
}

/// Reads a post-call body in the shared webhook budget, feeding it to the
/// signature as it arrives (see [`crate::webhook_body::read_fair`]).
pub(super) async fn read_signed_body(
    app: &App,
    req: Request<Incoming>,
    sig: &mut PendingSignature,
) -> Result<Bytes, PostCallError> {
    crate::webhook_body::read_fair(app, req, |d| sig.update(d))
        .await
        .map_err(|e| match e {
            BodyError::Api(e) => PostCallError::Api(e),
            BodyError::TooSlow(why) => PostCallError::TooSlow(why),
        })
}
