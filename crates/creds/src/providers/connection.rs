//! Per-connection values: `{field}` placeholders in a provider's
//! `base_url`, `authorize_url` and `token_url`, each declared with where its
//! value comes from and a pattern it must match in full. A value is checked
//! three ways before it is ever part of a URL: its pattern, a character
//! rule for where it stands (an origin, a host label, a path segment), and
//! the built URL itself (every `base_url` rule, and parsing it must give
//! back exactly the text built, so no value can change the URL's shape).

use std::collections::BTreeMap;

use url::Url;

/// Where a connection value comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionFrom {
    /// The user: given at `oauth/start` or `connect` (or in the credential PUT).
    User,
    /// A field of the token response (Salesforce `instance_url`).
    Token,
    /// The operator's app: given in the credential PUT.
    Admin,
}

impl ConnectionFrom {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionFrom::User => "user",
            ConnectionFrom::Token => "token",
            ConnectionFrom::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "user" => Some(ConnectionFrom::User),
            "token" => Some(ConnectionFrom::Token),
            "admin" => Some(ConnectionFrom::Admin),
            _ => None,
        }
    }
}

/// One declared per-connection value.
#[derive(Clone, Debug)]
pub struct ConnectionField {
    pub name: String,
    pub from: ConnectionFrom,
    /// As written; matched in full.
    pub pattern: String,
    re: regex::Regex,
}

impl ConnectionField {
    pub fn new(name: &str, from: ConnectionFrom, pattern: &str) -> Result<Self, String> {
        let re = regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
            .size_limit(1 << 20)
            .build()
            .map_err(|e| format!("pattern {pattern:?} is not a regular expression ({e})"))?;
        Ok(ConnectionField {
            name: name.to_owned(),
            from,
            pattern: pattern.to_owned(),
            re,
        })
    }

    pub fn matches(&self, value: &str) -> bool {
        value.len() <= MAX_VALUE && self.re.is_match(value)
    }
}

/// Longest value sidekey takes for any field.
const MAX_VALUE: usize = 255;

/// Why connection values cannot be used.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConnectionError {
    /// The credential (or flow) has no value for this field yet.
    #[error("no value for the connection field {0}")]
    Missing(String),
    /// The value fails its pattern, or would change the URL's shape.
    #[error("the value for the connection field {0} is not accepted")]
    Bad(String),
    /// No such field is declared for the provider.
    #[error("{0} is not a connection field of this provider")]
    Unknown(String),
}

/// Where a placeholder stands in its URL, which decides the characters
/// its value may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Position {
    /// The whole `scheme://host[:port]` (Salesforce's `instance_url`).
    Origin,
    /// Part of a host name: one DNS label's characters.
    Host,
    /// Part of the path: one segment's unreserved characters.
    Path,
}

#[derive(Clone, Debug)]
enum Part {
    Lit(String),
    Field(String, Position),
}

/// A URL with `{field}` placeholders.
#[derive(Clone, Debug)]
pub struct UrlTemplate {
    pub text: String,
    parts: Vec<Part>,
}

impl UrlTemplate {
    /// `None` when the text has no placeholder.
    pub fn parse(text: &str) -> Result<Option<UrlTemplate>, String> {
        if !text.contains(['{', '}']) {
            return Ok(None);
        }
        let authority_start = text.find("://").map(|i| i + 3);
        let authority_end =
            authority_start.map(|s| text[s..].find('/').map_or(text.len(), |i| s + i));
        let mut parts = Vec::new();
        let mut rest = text;
        let mut at = 0;
        while let Some(open) = rest.find('{') {
            let close = rest[open..]
                .find('}')
                .map(|c| open + c)
                .ok_or_else(|| format!("{text:?}: a {{ without its }}"))?;
            let name = &rest[open + 1..close];
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(format!(
                    "{text:?}: {{{name}}} is not a placeholder name (letters, digits, _ and -)"
                ));
            }
            let lit = &rest[..open];
            if lit.contains('}') {
                return Err(format!("{text:?}: a }} without its {{"));
            }
            let pos_in_text = at + open;
            let position = if pos_in_text == 0 {
                let next = text[close + at + 1..].chars().next();
                if next.is_some_and(|c| c != '/') {
                    return Err(format!(
                        "{text:?}: a placeholder at the start stands for the whole origin (scheme://host) and must be followed by / or nothing"
                    ));
                }
                Position::Origin
            } else {
                match (authority_start, authority_end) {
                    (Some(s), Some(e)) if pos_in_text >= s && pos_in_text < e => Position::Host,
                    (Some(s), _) if pos_in_text >= s => Position::Path,
                    _ => {
                        return Err(format!(
                            "{text:?}: a placeholder may not be part of the scheme"
                        ));
                    }
                }
            };
            if !lit.is_empty() {
                parts.push(Part::Lit(lit.to_owned()));
            }
            parts.push(Part::Field(name.to_owned(), position));
            at += close + 1;
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("{text:?}: a }} without its {{"));
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_owned()));
        }
        Ok(Some(UrlTemplate {
            text: text.to_owned(),
            parts,
        }))
    }

    /// The names of the placeholders, in order.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(n, _) => Some(n.as_str()),
            Part::Lit(_) => None,
        })
    }

    /// The URL with sample values, to check the template's own shape at
    /// start.
    pub fn sample(&self) -> String {
        self.render(|_, pos| {
            Ok(match pos {
                Position::Origin => "https://connection.invalid",
                Position::Host | Position::Path => "x",
            })
        })
        .unwrap_or_default()
    }

    fn render<'v>(
        &self,
        mut value: impl FnMut(&str, Position) -> Result<&'v str, ConnectionError>,
    ) -> Result<String, ConnectionError> {
        let mut out = String::with_capacity(self.text.len() + 32);
        for p in &self.parts {
            match p {
                Part::Lit(l) => out.push_str(l),
                Part::Field(n, pos) => out.push_str(value(n, *pos)?),
            }
        }
        Ok(out)
    }

    /// The URL for these values: each present, matching its field's
    /// pattern and the character rule of its position; `url_ok` then
    /// judges the parsed URL, which must serialise back to exactly the
    /// text built.
    pub fn build(
        &self,
        fields: &[ConnectionField],
        values: &BTreeMap<String, String>,
        url_ok: impl Fn(&Url) -> bool,
    ) -> Result<Url, ConnectionError> {
        let built = self.render(|name, pos| {
            let v = values
                .get(name)
                .ok_or_else(|| ConnectionError::Missing(name.to_owned()))?;
            let field = fields
                .iter()
                .find(|f| f.name == name)
                .ok_or_else(|| ConnectionError::Unknown(name.to_owned()))?;
            if !field.matches(v) || !fits(pos, v) {
                return Err(ConnectionError::Bad(name.to_owned()));
            }
            Ok(v.as_str())
        })?;
        let bad = || ConnectionError::Bad(self.fields().next().unwrap_or_default().to_owned());
        let u = Url::parse(&built).map_err(|_| bad())?;
        // Parsing may normalise (case, dots, escapes, IDNA): anything it
        // changed means a value meant more than its characters.
        let same = u.as_str() == built
            || (u.path() == "/" && u.as_str().strip_suffix('/') == Some(built.as_str()));
        if !same || !url_ok(&u) {
            return Err(bad());
        }
        Ok(u)
    }
}

/// The character rule for a value at `pos`.
fn fits(pos: Position, v: &str) -> bool {
    if v.is_empty() || v.len() > MAX_VALUE {
        return false;
    }
    match pos {
        Position::Host => {
            v.len() <= 63
                && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !v.starts_with('-')
                && !v.ends_with('-')
        }
        Position::Path => {
            v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
                && v != "."
                && v != ".."
        }
        Position::Origin => match Url::parse(v) {
            Ok(u) => {
                u.username().is_empty()
                    && u.password().is_none()
                    && u.query().is_none()
                    && u.fragment().is_none()
                    && u.path() == "/"
                    && u.host_str().is_some()
                    && u.origin().ascii_serialization() == v
            }
            Err(_) => false,
        },
    }
}
