//! TOML errors in a user's words: every unknown key and type error at once,
//! with its line and table, and never a value (it could be a secret).

use std::path::Path;

use super::raw::RawConfig;

/// The raw shape, and every unknown key and type error in it. serde stops
/// at the first such error, so each one found is recorded and its lines
/// blanked (line numbers stay right), until the rest parses; a syntax error
/// stops there, as what follows it cannot be read reliably.
pub(super) fn parse_raw(text: &str, path: &Path) -> Result<(RawConfig, Vec<String>), Vec<String>> {
    // The error's own Display quotes the offending line, which could hold an
    // inline secret: report the position and message only.
    let describe = |e: &toml::de::Error, text: &str| {
        let msg = plain(&without_values(e.message().trim()));
        let Some(span) = e.span() else {
            return format!("{}: {msg}", path.display());
        };
        let at = span.start.min(text.len());
        let line = text[..at].matches('\n').count() + 1;
        // Name the key (never the value) when the message does not.
        let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
        let key = text[line_start..]
            .lines()
            .next()
            .and_then(|l| l.split_once('='))
            .map(|(k, _)| k.trim())
            .filter(|k| !k.is_empty() && !k.starts_with('[') && !msg.contains(*k));
        // The table the line is in, as written (`[providers.slack]`).
        let table = text[..line_start]
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('['))
            .and_then(|l| l.split('#').next())
            .map(|l| format!(" {}", l.trim()))
            .unwrap_or_default();
        match key {
            Some(k) => format!("{} (line {line}){table} {k}: {msg}", path.display()),
            None => format!("{} (line {line}){table}: {msg}", path.display()),
        }
    };
    if let Err(e) = text.parse::<toml::Table>() {
        return Err(vec![describe(&e, text)]);
    }
    let mut problems: Vec<String> = Vec::new();
    let mut current = text.to_owned();
    for _ in 0..100 {
        let e = match toml::from_str::<RawConfig>(&current) {
            Ok(raw) => {
                problems.sort_by_key(|m| line_of(m));
                return Ok((raw, problems));
            }
            Err(e) => e,
        };
        problems.push(describe(&e, &current));
        let Some(span) = e.span() else { break };
        let start = current[..span.start.min(current.len())]
            .rfind('\n')
            .map_or(0, |i| i + 1);
        let end = current[span.end.min(current.len())..]
            .find('\n')
            .map_or(current.len(), |i| span.end + i);
        let blanked: String = current[start..end]
            .chars()
            .map(|c| if c == '\n' { '\n' } else { ' ' })
            .collect();
        let next = format!("{}{blanked}{}", &current[..start], &current[end..]);
        if next == current {
            break;
        }
        current = next;
    }
    problems.sort_by_key(|m| line_of(m));
    Err(problems)
}

/// The line a parse problem names, to list them in file order.
fn line_of(m: &str) -> usize {
    m.split_once("(line ")
        .and_then(|(_, r)| r.split(')').next())
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(0)
}

/// toml quotes the offending value for type errors; a value may be an
/// inline secret, so type errors keep only the value's kind.
/// serde's wording in a user's words: an unknown key with the closest valid
/// one, and types as words (`an integer`, not `u64`).
fn plain(msg: &str) -> String {
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        if let Some((field, tail)) = rest.split_once('`') {
            let valid: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
            let best = valid
                .iter()
                .map(|v| (strsim::damerau_levenshtein(field, v), *v))
                .min();
            let limit = if field.len() > 6 { 3 } else { 2 };
            return match best {
                Some((d, v)) if d <= limit => {
                    format!("unknown key `{field}`; did you mean `{v}`?")
                }
                _ if valid.is_empty() => format!("unknown key `{field}`"),
                _ => format!(
                    "unknown key `{field}`; the keys here are {}",
                    valid.join(", ")
                ),
            };
        }
    }
    let mut out = msg.to_owned();
    for (rust, words) in [
        ("expected u64", "expected a whole number"),
        ("expected u32", "expected a whole number"),
        ("expected u16", "expected a whole number"),
        ("expected u8", "expected a whole number"),
        ("expected usize", "expected a whole number"),
        ("expected i64", "expected a whole number"),
        ("expected i32", "expected a whole number"),
        ("expected f64", "expected a number"),
        ("expected a sequence", "expected a list"),
        ("expected a map", "expected a table"),
        ("invalid type: sequence", "invalid type: list"),
        ("invalid type: map", "invalid type: table"),
    ] {
        out = out.replace(rust, words);
    }
    if let Some(i) = out.find("expected struct ") {
        out.replace_range(i.., "expected a table");
    }
    out
}

fn without_values(msg: &str) -> String {
    if !(msg.starts_with("invalid type") || msg.starts_with("invalid value")) {
        return msg.to_owned();
    }
    // `invalid type: string "hunter2", expected u64`: keep the kind only.
    if let (Some(rest), Some(exp)) = (msg.strip_prefix("invalid type: "), msg.find(", expected")) {
        let kind = rest.split([' ', ',']).next().unwrap_or("value");
        return format!("invalid type: {kind}{}", &msg[exp..]);
    }
    if let (true, Some(exp)) = (msg.starts_with("invalid value"), msg.find(", expected")) {
        return format!("invalid value (hidden){}", &msg[exp..]);
    }
    let mut out = String::new();
    let mut inside = false;
    for c in msg.chars() {
        if c == '`' {
            inside = !inside;
            if inside {
                out.push_str("(value hidden)");
            }
        } else if !inside {
            out.push(c);
        }
    }
    out
}
