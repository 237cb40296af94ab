//! Phase 8: every request ends here, with its answer, metrics, access log
//! line and audit record (or, for a refused session, its summary).

use std::sync::Arc;
use std::time::Instant;

use http::{Method, Response};

use super::Trace;
use crate::app::App;
use crate::body::Body;
use crate::error::ApiError;
use sidekey_creds::audit::{ProxyRecord, Refused};

pub(crate) fn finish(
    app: &Arc<App>,
    method: &Method,
    started: Instant,
    mut t: Trace,
    result: Result<Response<Body>, ApiError>,
) -> Response<Body> {
    let subject;
    let resp = match result {
        Ok(mut r) => {
            subject = r
                .extensions_mut()
                .remove::<crate::jwt::AuditSubject>()
                .map(|s| s.0);
            r
        }
        Err(e) => {
            subject = e.subject().map(str::to_owned);
            t.error = Some(e.code());
            if let ApiError::InvalidSession(fault, detail) = &e {
                t.reason = Some(fault.reason());
                tracing::debug!(reason = fault.reason(), detail, "session refused");
            }
            e.into_response()
        }
    };
    // The path as the audit log and access log show it: decoded, `/` for
    // an empty one.
    if let Some(p) = t.checked.take() {
        t.path = if p.raw.is_empty() {
            "/".into()
        } else {
            p.into_decoded()
        };
    }
    let status = resp.status().as_u16();
    let elapsed = started.elapsed();
    let caller = &t.caller;
    // A provider refused for this session still has its own label.
    let refused = || {
        caller
            .requested
            .as_deref()
            .and_then(|p| app.providers.get(p))
    };
    let label = match &caller.provider {
        Some(p) => &p.metric_label,
        None => refused()
            .map(|p| &p.metric_label)
            .unwrap_or(app.metrics.no_provider()),
    };
    app.metrics.request(label, status);
    tracing::info!(
        target: "sidekey::access",
        method = %method,
        provider = %caller.provider_name().unwrap_or("-"),
        path = %t.path,
        status,
        ms = elapsed.as_secs_f64() * 1000.0,
        user = caller.user().unwrap_or("-"),
        session_id = caller.session_id().unwrap_or("-"),
        conversation_id = caller.conversation_id().unwrap_or("-"),
        error = t.error.unwrap_or("-"),
        reason = t.reason.unwrap_or("-"),
    );
    if let Some(reason) = t.reason {
        // Unauthenticated: counted and summarised, not one record each
        // (see audit.rs), so a flood cannot evict records of real calls.
        app.metrics.unauthenticated(reason);
        app.audit.refused(Refused {
            path: t.route,
            code: "invalid_session",
            reason: Some(reason),
            status,
        });
        return resp;
    }
    app.audit.record_proxy(ProxyRecord {
        time: app.clock.now_millis(),
        caller: t.caller,
        method: sidekey_vault::method_name(method),
        path: t.path,
        status,
        duration_ms: (elapsed.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
        error: t.error,
        tool: t.tool,
        subject,
    });
    resp
}
