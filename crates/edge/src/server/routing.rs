//! Routing by listener and path: health and readiness on every listener,
//! then the admin API, the metrics, or the agent routes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use serde_json::json;

use super::Role;
use crate::app::App;
use crate::body::{self, Body};
use crate::error::ApiError;

pub(super) async fn route(
    app: &Arc<App>,
    role: Role,
    req: Request<Incoming>,
    draining: &AtomicBool,
) -> Response<Body> {
    let path = req.uri().path();
    if path == "/healthz" {
        return body::json(StatusCode::OK, &json!({"status": "ok"}));
    }
    if path == "/readyz" {
        return if draining.load(Ordering::Relaxed) {
            body::json(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"status": "draining"}),
            )
        } else if let Err(e) = Box::pin(app.store.ready()).await {
            tracing::warn!(error = %e, "not ready: store unavailable");
            body::json(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"status": "store_unavailable"}),
            )
        } else {
            body::json(StatusCode::OK, &json!({"status": "ready"}))
        };
    }
    if req.method() == Method::CONNECT {
        return ApiError::MethodNotAllowed.into_response();
    }
    // An absolute URI in an HTTP/1 request line is proxy syntax; sidekey is
    // not an open proxy. (HTTP/2 always carries scheme and authority.)
    if req.version() < Version::HTTP_2 && req.uri().scheme().is_some() {
        return ApiError::BadPath("absolute URI in request line").into_response();
    }
    // The admin and metrics routes boxed, for the agent route's sake (see
    // `route_agent`).
    match role {
        Role::Admin => Box::pin(crate::admin::handle(app, req)).await,
        Role::Agent => route_agent(app, req).await,
        Role::Metrics if path == "/metrics" && req.method() == Method::GET => {
            Box::pin(crate::admin::metrics(app, req.headers())).await
        }
        Role::Metrics => {
            ApiError::NotFound("This listener serves /metrics, /healthz and /readyz only.".into())
                .into_response()
        }
    }
}

async fn route_agent(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    // The proxy route first, before anything is copied out of the request:
    // it is nearly every request this listener serves.
    let p = req.uri().path();
    if p.starts_with("/v1/proxy/") || p == "/v1/proxy" {
        return crate::proxy::handle(app, req).await;
    }
    // Boxed: inline, the largest of the other routes' futures would set the
    // size of every proxied request's future (kilobytes copied per request).
    Box::pin(route_agent_other(app, req)).await
}

async fn route_agent_other(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    if let Some(provider) = path.strip_prefix("/v1/call/") {
        if method != Method::POST {
            return ApiError::MethodNotAllowed.into_response();
        }
        let provider = provider.to_owned();
        return crate::proxy::handle_call(app, req, &provider).await;
    }
    if path == "/v1/mcp" {
        return crate::mcp::handle(app, req).await;
    }
    if let Some(name) = path.strip_prefix("/v1/tools/") {
        if method != Method::POST {
            return ApiError::MethodNotAllowed.into_response();
        }
        let name = name.to_owned();
        return crate::tools::handle(app, req, &name).await;
    }
    if let Some(name) = path.strip_prefix("/v1/retell/tools/") {
        if method != Method::POST {
            return ApiError::MethodNotAllowed.into_response();
        }
        let name = name.to_owned();
        return crate::retell::tool(app, req, &name).await;
    }
    // ---- connect page: /connect/<ticket>[/connect|/disconnect], CSS
    if path.starts_with("/connect/") {
        return crate::connect::handle(app, req).await;
    }
    // ---- end connect page
    if let Some(rest) = path.strip_prefix("/oauth/") {
        if let Some(provider) = rest.strip_suffix("/callback") {
            if method != Method::GET {
                return ApiError::MethodNotAllowed.into_response();
            }
            let provider = provider.to_owned();
            return crate::connect::callback::callback(app, req, &provider).await;
        }
    }
    let is_post = method == Method::POST;
    match path.as_str() {
        "/v1/session/refresh" if is_post => crate::proxy::refresh_tool(app, req).await,
        "/v1/elevenlabs/conversation-init" if is_post => {
            crate::elevenlabs::conversation_init(app, req).await
        }
        "/v1/elevenlabs/post-call" if is_post => crate::elevenlabs::post_call(app, req).await,
        "/v1/vapi/tools" if is_post => crate::vapi::server_message(app, req).await,
        "/v1/retell/webhook" if is_post => crate::retell::webhook(app, req).await,
        "/v1/session/refresh"
        | "/v1/elevenlabs/conversation-init"
        | "/v1/elevenlabs/post-call"
        | "/v1/vapi/tools"
        | "/v1/retell/webhook" => ApiError::MethodNotAllowed.into_response(),
        p if is_admin_path(p) => ApiError::NotFound(
            "This is the agent listener; admin routes (/v1/users, /v1/sessions, /v1/audit, ...) are served on the admin listener ([admin] listen) with the admin token.".into(),
        )
        .into_response(),
        _ => ApiError::NotFound("There is no such endpoint.".into()).into_response(),
    }
}

/// Paths of the admin API, to point a caller who sent one to the agent
/// listener at the right one.
fn is_admin_path(p: &str) -> bool {
    [
        "/v1/users",
        "/v1/tenants",
        "/v1/sessions",
        "/v1/audit",
        "/v1/admin",
        "/v1/elevenlabs/tools",
        "/metrics",
    ]
    .iter()
    .any(|a| p == *a || p.strip_prefix(a).is_some_and(|r| r.starts_with('/')))
}

#[cfg(test)]
mod future_size {
    use super::*;

    /// The request's future is moved into hyper's connection state for
    /// every request, so its size is copied each time. Cold routes and cold
    /// paths (admin, webhooks, OAuth, refreshes, store reads on a cache
    /// miss, connects) are boxed to keep it small: 10.8 KiB before, about
    /// 4 KiB after (debug build; the bound leaves room for compiler
    /// changes).
    #[test]
    fn a_requests_future_stays_small() {
        fn size<Fut>(
            _: impl Fn(&'static Arc<App>, Role, Request<Incoming>, &'static AtomicBool) -> Fut,
        ) -> usize {
            std::mem::size_of::<Fut>()
        }
        let n = size(route);
        assert!(
            n <= 6 * 1024,
            "a request's future is {n} bytes; box the cold path that grew it"
        );
    }
}
