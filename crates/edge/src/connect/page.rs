//! The connect page's HTML: server-rendered, no script, every value escaped.

use crate::body::html_escape;
use sidekey_base::config::{ConnectConfig, parse_hex_color};

/// Where the stylesheet is served; the page's CSP allows only `'self'`.
pub const CSS_PATH: &str = "/connect/assets/style.css";

/// The user's standing with one provider, in words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    Connected,
    Expired,
    NeedsReconnecting,
    NotConnected,
}

impl Standing {
    fn words(self) -> (&'static str, &'static str) {
        match self {
            Standing::Connected => ("connected", "Connected"),
            Standing::Expired => ("expired", "Expired"),
            Standing::NeedsReconnecting => ("reauth", "Needs reconnecting"),
            Standing::NotConnected => ("none", "Not connected"),
        }
    }
}

/// One row of the page.
pub struct Row<'a> {
    pub name: &'a str,
    pub display: &'a str,
    pub description: Option<&'a str>,
    pub standing: Standing,
}

/// A banner above the list (the outcome of the last action).
pub struct Notice {
    pub ok: bool,
    pub text: String,
}

pub struct PageView<'a> {
    pub ticket: &'a str,
    pub csrf: &'a str,
    /// Whose accounts: the link's `user_label`, else the user id.
    pub who: &'a str,
    pub return_to: Option<&'a str>,
    pub minutes_left: i64,
    pub notice: Option<Notice>,
    pub rows: Vec<Row<'a>>,
}

fn app_name(c: &ConnectConfig) -> &str {
    c.app_name.as_deref().unwrap_or("the app")
}

/// The shared frame: head, brand line, then `main_html`.
pub fn layout(c: &ConnectConfig, title: &str, main_html: &str) -> String {
    let brand = match (&c.logo_url, &c.app_name) {
        (None, None) => String::new(),
        (logo, name) => format!(
            "<div class=\"brand\">{}{}</div>",
            logo.as_ref()
                .map(|u| format!("<img src=\"{}\" alt=\"\">", html_escape(u.as_str())))
                .unwrap_or_default(),
            name.as_ref()
                .map(|n| format!("<span class=\"app\">{}</span>", html_escape(n)))
                .unwrap_or_default(),
        ),
    };
    format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
<meta name=\"referrer\" content=\"no-referrer\">\n<title>{title}</title>\n\
<link rel=\"stylesheet\" href=\"{CSS_PATH}\">\n</head>\n<body>\n<main class=\"wrap\">\n{brand}\n{main_html}\n</main>\n</body>\n</html>\n",
        title = html_escape(title),
    )
}

/// A page with a heading and a paragraph; `detail_html` is already escaped.
pub fn message(c: &ConnectConfig, title: &str, detail_html: &str) -> String {
    layout(
        c,
        title,
        &format!(
            "<h1>{}</h1>\n<p class=\"lead\">{detail_html}</p>",
            html_escape(title)
        ),
    )
}

pub fn connect_page(c: &ConnectConfig, v: &PageView<'_>) -> String {
    let app = html_escape(app_name(c));
    let mut m = String::with_capacity(4096);
    m.push_str("<h1>Connect your accounts</h1>\n");
    m.push_str(&format!(
        "<p class=\"lead\">Connecting accounts for <strong>{}</strong>. {app} uses them on your behalf; it never sees your passwords.</p>\n",
        html_escape(v.who)
    ));
    if let Some(n) = &v.notice {
        let (class, role) = if n.ok {
            ("ok", "status")
        } else {
            ("err", "alert")
        };
        m.push_str(&format!(
            "<p class=\"notice {class}\" role=\"{role}\">{}</p>\n",
            html_escape(&n.text)
        ));
    }
    m.push_str("<ul class=\"providers\" aria-label=\"Services\">\n");
    let t = html_escape(v.ticket);
    let csrf = html_escape(v.csrf);
    for r in &v.rows {
        let name = html_escape(r.name);
        let display = html_escape(r.display);
        let initial = r
            .display
            .chars()
            .find(|c| c.is_alphanumeric())
            .map(|c| c.to_uppercase().collect::<String>())
            .unwrap_or_else(|| "?".into());
        let (class, words) = r.standing.words();
        let form = |action: &str, label: &str, style: &str| {
            format!(
                "<form method=\"post\" action=\"/connect/{t}/{action}\">\
<input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
<input type=\"hidden\" name=\"provider\" value=\"{name}\">\
<button type=\"submit\" class=\"{style}\" name=\"action\" value=\"{action}\">{label}<span class=\"vh\"> {display}</span></button></form>"
            )
        };
        let actions = match r.standing {
            Standing::NotConnected => form("connect", "Connect", "primary"),
            _ => format!(
                "{}{}",
                form("connect", "Reconnect", "primary"),
                form("disconnect", "Disconnect", "secondary")
            ),
        };
        m.push_str(&format!(
            "<li class=\"provider\" id=\"provider-{name}\">\
<span class=\"icon\" aria-hidden=\"true\">{initial}</span>\
<div class=\"info\"><h2>{display}</h2>{desc}\
<p class=\"status {class}\"><span class=\"vh\">Status: </span>{words}</p></div>\
<div class=\"actions\">{actions}</div></li>\n",
            initial = html_escape(&initial),
            desc = r
                .description
                .map(|d| format!("<p class=\"desc\">{}</p>", html_escape(d)))
                .unwrap_or_default(),
        ));
    }
    m.push_str("</ul>\n");
    if let Some(rt) = v.return_to {
        m.push_str(&format!(
            "<p class=\"done\"><a class=\"button primary\" href=\"{}\">Done — back to {app}</a></p>\n",
            html_escape(rt)
        ));
    } else {
        m.push_str("<p class=\"done\">When you are done, you can close this window.</p>\n");
    }
    let mins = v.minutes_left.max(1);
    m.push_str(&format!(
        "<p class=\"fine\">This link works only in this browser and for about {}. Never forward it.</p>",
        minutes(mins)
    ));
    layout(c, &format!("Connect your accounts — {}", app_name(c)), &m)
}

/// The first view of an unclaimed link.
pub struct ClaimView<'a> {
    pub ticket: &'a str,
    pub csrf: &'a str,
    pub who: &'a str,
    /// Display names of the link's providers.
    pub providers: &'a [&'a str],
    pub minutes_left: i64,
}

/// Names whose accounts the link connects before anything happens, so
/// that someone who was sent another person's link can see it and stop.
pub fn claim_page(c: &ConnectConfig, v: &ClaimView<'_>) -> String {
    let app = html_escape(app_name(c));
    let who = html_escape(v.who);
    let services = match v.providers {
        [] => "accounts".to_owned(),
        [one] => html_escape(one),
        [init @ .., last] => format!(
            "{} and {}",
            init.iter()
                .map(|p| html_escape(p))
                .collect::<Vec<_>>()
                .join(", "),
            html_escape(last)
        ),
    };
    let mut m = String::with_capacity(2048);
    m.push_str(&format!(
        "<h1>Connect accounts for {who}</h1>\n\
<p class=\"lead\">{} asks you to connect {services} for <strong>{who}</strong>. Continue only if that is you.</p>\n",
        capitalised(&app)
    ));
    m.push_str(&format!(
        "<form method=\"post\" action=\"/connect/{}/claim\">\
<input type=\"hidden\" name=\"csrf\" value=\"{}\">\
<button type=\"submit\" class=\"primary\">Continue</button></form>\n",
        html_escape(v.ticket),
        html_escape(v.csrf)
    ));
    m.push_str(&format!(
        "<p class=\"fine\">If someone else sent you this link, do not continue: close this page. The link works in the first browser that continues, for about {}.</p>",
        minutes(v.minutes_left.max(1))
    ));
    layout(
        c,
        &format!("Connect accounts for {} — {}", v.who, app_name(c)),
        &m,
    )
}

fn minutes(n: i64) -> String {
    format!("{n} more minute{}", if n == 1 { "" } else { "s" })
}

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// The stylesheet with the accent colours from the config in front.
pub fn stylesheet(c: &ConnectConfig) -> String {
    let rgb = parse_hex_color(&c.accent_color).unwrap_or([0x25, 0x63, 0xeb]);
    format!(
        ":root {{ --accent: {}; --on-accent: {}; }}\n{}",
        c.accent_color,
        on_colour(rgb),
        include_str!("style.css")
    )
}

/// Black or white, whichever contrasts more with `bg` (WCAG 2 contrast).
pub fn on_colour(bg: [u8; 3]) -> &'static str {
    let l = luminance(bg);
    let white = 1.05 / (l + 0.05);
    let black = (l + 0.05) / 0.05;
    if white >= black { "#ffffff" } else { "#000000" }
}

fn luminance(rgb: [u8; 3]) -> f64 {
    let ch = |c: u8| {
        let c = f64::from(c) / 255.0;
        if c <= 0.039_28 {
            c / 12.92
        } else {
            ((c + 0.055) / 1.055).powf(2.4)
        }
    };
    0.2126 * ch(rgb[0]) + 0.7152 * ch(rgb[1]) + 0.0722 * ch(rgb[2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_on_accent_keeps_contrast() {
        assert_eq!(on_colour([0x25, 0x63, 0xeb]), "#ffffff");
        assert_eq!(on_colour([0xff, 0xeb, 0x3b]), "#000000");
        assert_eq!(on_colour([0, 0, 0]), "#ffffff");
    }
}
