//! Webhook bodies from anyone on the internet (ElevenLabs' post-call,
//! Vapi, Retell): read into one memory budget that all of them share
//! fairly, at a minimum rate, so that slow or huge unsigned senders can
//! neither exhaust memory nor starve a genuine signed call.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::json;

use crate::app::App;
use crate::body::{self, Body};
use crate::error::ApiError;

/// Why a body was not read: one of sidekey's errors, or a body that did not
/// arrive in time (408, which only webhooks answer).
pub(crate) enum BodyError {
    Api(ApiError),
    TooSlow(&'static str),
}

impl From<ApiError> for BodyError {
    fn from(e: ApiError) -> Self {
        BodyError::Api(e)
    }
}

/// `408 request_timeout`, in the shape of every sidekey error. ElevenLabs
/// redelivers on 408 when the webhook's retries are switched on.
pub fn too_slow(message: &str) -> Response<Body> {
    let mut resp = body::json(
        StatusCode::REQUEST_TIMEOUT,
        &json!({"error": {"code": "request_timeout", "message": message}}),
    );
    resp.headers_mut().insert(
        &crate::error::ERROR_HEADER,
        http::HeaderValue::from_static("request_timeout"),
    );
    resp
}

/// The longest a post-call body may take, whatever its rate.
pub(crate) const BODY_DEADLINE: Duration = Duration::from_secs(60);

/// Reads a webhook body of at most `[elevenlabs] max_webhook_bytes`,
/// holding what it reads in the shared webhook budget and handing each
/// piece to `on_data` as it arrives (a signature being computed). Cut off
/// with 408 when it arrives slower than the minimum rate over a window,
/// with 503 when the budget has no room for it (or another body took its
/// room back).
pub(crate) async fn read_fair(
    app: &App,
    req: Request<Incoming>,
    mut on_data: impl FnMut(&[u8]),
) -> Result<Bytes, BodyError> {
    let cfg = &app.config.elevenlabs;
    let limit = cfg.max_webhook_bytes;
    let (parts, mut body) = req.into_parts();
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(ApiError::BodyTooLarge(limit).into());
    }
    let window = Duration::from_secs(cfg.webhook_min_rate_grace_secs);
    // Memory is held for what arrived, never for what a Content-Length
    // promises: a declared length costs the sender nothing.
    let mut budget = app.webhook_bodies.reader(
        sidekey_base::limits::Sharing {
            reserve: cfg.webhook_reserved_bytes,
            share: cfg.webhook_share_bytes,
            patience: window,
        },
        declared,
    );
    let min_per_window = cfg
        .webhook_min_bytes_per_sec
        .saturating_mul(cfg.webhook_min_rate_grace_secs);
    let deadline = tokio::time::Instant::now() + BODY_DEADLINE;
    let mut checkpoint = tokio::time::Instant::now() + window;
    let mut at_checkpoint: u64 = 0;
    let mut buf = bytes::BytesMut::with_capacity(declared.unwrap_or(0).min(64 * 1024) as usize);
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            () = tokio::time::sleep_until(checkpoint.min(deadline)) => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(BodyError::TooSlow("body not complete within 60 s"));
                }
                let got = buf.len() as u64;
                if got - at_checkpoint < min_per_window {
                    return Err(BodyError::TooSlow("body slower than webhook_min_bytes_per_sec"));
                }
                at_checkpoint = got;
                checkpoint += window;
                continue;
            }
            () = budget.cut_off() => return Err(overloaded().into()),
        };
        let Some(frame) = frame else { break };
        let frame = frame
            .map_err(|_| ApiError::BadRequest("The request body could not be read.".into()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let total = buf.len() as u64 + data.len() as u64;
        if total > limit {
            return Err(ApiError::BodyTooLarge(limit).into());
        }
        if !budget.grow(data.len() as u64) {
            return Err(overloaded().into());
        }
        on_data(&data);
        buf.extend_from_slice(&data);
    }
    Ok(buf.freeze())
}

pub(crate) fn overloaded() -> ApiError {
    tracing::warn!(
        "no room for a webhook body within [elevenlabs] webhook_memory_budget_bytes (or its share); answering 503"
    );
    ApiError::Overloaded
}
