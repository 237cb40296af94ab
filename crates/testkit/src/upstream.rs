//! A fake provider API: records every request it gets and answers with
//! whatever the test's handler says.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// One request as the upstream saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path as received (still percent-encoded).
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    /// The bearer token, if any.
    pub fn bearer(&self) -> Option<String> {
        self.header("authorization")
            .and_then(|a| a.strip_prefix("Bearer ").map(str::to_owned))
    }
}

/// What the fake answers.
pub enum Reply {
    Json(u16, Value),
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Bytes,
    },
    /// `count` chunks of `chunk`, `delay` apart.
    Stream {
        status: u16,
        chunk: Bytes,
        count: usize,
        delay: Duration,
    },
    /// Waits, then answers.
    Delay(Duration, Box<Reply>),
}

pub type Handler = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    requests: Arc<Mutex<Vec<Recorded>>>,
    handler: Arc<Mutex<Handler>>,
}

/// The default answer: what was asked, as JSON.
pub fn echo(r: &Recorded) -> Reply {
    Reply::Json(
        200,
        json!({"ok": true, "method": r.method, "path": r.path, "query": r.query}),
    )
}

type RespBody = BoxBody<Bytes, Infallible>;

fn build(
    reply: Reply,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response<RespBody>> + Send>> {
    Box::pin(async move {
        match reply {
            Reply::Json(status, v) => Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(v.to_string())).boxed())
                .unwrap(),
            Reply::Full {
                status,
                headers,
                body,
            } => {
                let mut b = Response::builder().status(status);
                for (k, v) in headers {
                    b = b.header(k, v);
                }
                b.body(Full::new(body).boxed()).unwrap()
            }
            Reply::Stream {
                status,
                chunk,
                count,
                delay,
            } => {
                let stream = futures_util::stream::unfold(0usize, move |i| {
                    let chunk = chunk.clone();
                    async move {
                        if i >= count {
                            return None;
                        }
                        if !delay.is_zero() && i > 0 {
                            tokio::time::sleep(delay).await;
                        }
                        Some((Ok::<_, Infallible>(Frame::data(chunk)), i + 1))
                    }
                });
                Response::builder()
                    .status(status)
                    .header("content-type", "application/octet-stream")
                    .body(BodyExt::boxed(StreamBody::new(stream)))
                    .unwrap()
            }
            Reply::Delay(d, inner) => {
                tokio::time::sleep(d).await;
                build(*inner).await
            }
        }
    })
}

impl Upstream {
    pub async fn start() -> Upstream {
        Upstream::start_with(Arc::new(echo)).await
    }

    /// An upstream that answers every request with `status` and `body`,
    /// `delay` after it arrived.
    pub async fn slow(delay: Duration, status: u16, body: Value) -> Upstream {
        Upstream::start_with(Arc::new(move |_r: &Recorded| {
            Reply::Delay(delay, Box::new(Reply::Json(status, body.clone())))
        }))
        .await
    }

    pub async fn start_with(handler: Handler) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler = Arc::new(Mutex::new(handler));
        let (r2, h2) = (requests.clone(), handler.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (r3, h3) = (r2.clone(), h2.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (r4, h4) = (r3.clone(), h3.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            let rec = Recorded {
                                method: parts.method.to_string(),
                                path: parts.uri.path().to_owned(),
                                query: parts.uri.query().map(str::to_owned),
                                headers: parts.headers,
                                body,
                            };
                            let reply = {
                                let h = h4.lock().unwrap().clone();
                                h(&rec)
                            };
                            r4.lock().unwrap().push(rec);
                            Ok::<_, Infallible>(build(reply).await)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            url: format!("http://{addr}"),
            requests,
            handler,
        }
    }

    pub fn set_handler(&self, h: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) {
        *self.handler.lock().unwrap() = Arc::new(h);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    pub fn last(&self) -> Recorded {
        self.requests
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the upstream received no request")
    }

    pub fn clear(&self) {
        self.requests.lock().unwrap().clear();
    }
}

/// A status line helper for handlers.
pub fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap()
}
