//! Error primitives shared by every layer.

use std::fmt;

/// The error type of streamed bodies, in and out.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The whole `source()` chain of an error, for logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A problem that stops the process: bad config, unreadable key, wrong master
/// key. `main` prints the message as one line and exits with status 2.
#[derive(Debug)]
pub struct Fatal(pub String);

impl fmt::Display for Fatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Fatal {}

impl Fatal {
    pub fn new(msg: impl Into<String>) -> Self {
        Fatal(msg.into())
    }
}
