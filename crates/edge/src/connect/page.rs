//! The connect page's HTML: server-rendered, no script, every value escaped.

use crate::body::html_escape;
use sidekey_base::config::ConnectConfig;

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
    /// The CSS class (each standing has its own colour) and the words.
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
    /// Why, in words, when the standing needs the user to act.
    pub reason: Option<String>,
    /// The preset's logo, ready to inline; else the initial is shown.
    pub logo: Option<String>,
    /// Per-connection values the user types before connecting (`from =
    /// "user"` fields the link did not carry), e.g. a Shopify shop.
    pub asks: Vec<String>,
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
    /// The provider whose Disconnect was pressed once: its row asks first.
    pub confirm_disconnect: Option<&'a str>,
}

/// The main app's name, or "the app" in the middle of a sentence.
pub fn app_name(c: &ConnectConfig) -> &str {
    c.app_name.as_deref().unwrap_or("the app")
}

/// The main app's name as it is, or "The app" to begin a sentence.
pub fn app_start(c: &ConnectConfig) -> &str {
    c.app_name.as_deref().unwrap_or("The app")
}

/// `title — app name`, or the title alone when no name is configured.
fn page_title(c: &ConnectConfig, title: &str) -> String {
    match &c.app_name {
        Some(n) => format!("{title} — {n}"),
        None => title.to_owned(),
    }
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
<meta name=\"referrer\" content=\"no-referrer\">\n<meta name=\"color-scheme\" content=\"light dark\">\n\
<title>{title}</title>\n\
<link rel=\"stylesheet\" href=\"{CSS_PATH}\">\n</head>\n<body>\n<main class=\"wrap\">\n{brand}\n{main_html}\n</main>\n</body>\n</html>\n",
        title = html_escape(&page_title(c, title)),
    )
}

/// A page with a heading, a paragraph (`detail_html`, already escaped) and
/// a way back to the app when one is known.
pub fn message(c: &ConnectConfig, title: &str, detail_html: &str, back: Option<&str>) -> String {
    let back = back
        .map(|href| {
            format!(
                "\n<p class=\"done\"><a class=\"button primary\" href=\"{}\">Back to {}</a></p>",
                html_escape(href),
                html_escape(app_name(c))
            )
        })
        .unwrap_or_default();
    layout(
        c,
        title,
        &format!(
            "<h1>{}</h1>\n<p class=\"lead\">{detail_html}</p>{back}",
            html_escape(title)
        ),
    )
}

fn initial(display: &str) -> String {
    display
        .chars()
        .find(|c| c.is_alphanumeric())
        .map(|c| c.to_uppercase().collect::<String>())
        .unwrap_or_else(|| "?".into())
}

pub fn connect_page(c: &ConnectConfig, v: &PageView<'_>) -> String {
    let app = html_escape(app_name(c));
    let mut m = String::with_capacity(4096);
    m.push_str("<h1>Connect your accounts</h1>\n");
    m.push_str(&format!(
        "<p class=\"lead\">Connecting accounts for <strong>{}</strong>. {} uses them on your behalf; it never sees your passwords.</p>\n",
        html_escape(v.who),
        html_escape(app_start(c)),
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
        let (class, words) = r.standing.words();
        // The values this connection needs, asked in the Connect form
        // itself: labelled, required, checked again by the server.
        let asks: String = r
            .asks
            .iter()
            .map(|f| {
                let f = html_escape(f);
                format!(
                    "<label class=\"ask\" for=\"ask-{name}-{f}\">Your {display} {f}</label>\
<input class=\"ask\" id=\"ask-{name}-{f}\" name=\"connection.{f}\" required autocomplete=\"off\" spellcheck=\"false\" autocapitalize=\"none\">"
                )
            })
            .collect();
        let post = |action: &str, label: &str, style: &str| {
            let fields = if action == "connect" {
                asks.as_str()
            } else {
                ""
            };
            format!(
                "<form method=\"post\" action=\"/connect/{t}/{action}\">\
<input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
<input type=\"hidden\" name=\"provider\" value=\"{name}\">{fields}\
<button type=\"submit\" class=\"{style}\" name=\"action\" value=\"{action}\">{label}<span class=\"vh\"> {display}</span></button></form>"
            )
        };
        let q: String = url::form_urlencoded::byte_serialize(r.name.as_bytes()).collect();
        let confirming =
            r.standing != Standing::NotConnected && v.confirm_disconnect == Some(r.name);
        let actions = match r.standing {
            Standing::NotConnected => post("connect", "Connect", "primary"),
            // Disconnect first asks on the page (a GET that changes
            // nothing); only the POST of that question removes anything.
            _ if !confirming => format!(
                "{}<a class=\"button secondary\" href=\"/connect/{t}?disconnect={}#confirm-{name}\">Disconnect<span class=\"vh\"> {display}</span></a>",
                post("connect", "Reconnect", "primary"),
                html_escape(&q),
            ),
            _ => String::new(),
        };
        let actions = if actions.is_empty() {
            actions
        } else {
            format!("<div class=\"actions\">{actions}</div>")
        };
        let confirm = if confirming {
            format!(
                "<div class=\"confirm\" id=\"confirm-{name}\" role=\"group\" aria-labelledby=\"confirm-{name}-q\">\
<p id=\"confirm-{name}-q\"><strong>Disconnect {display}?</strong> {app} will no longer be able to use your {display} account until you connect it again.</p>\
<div class=\"actions\">{}<a class=\"button secondary\" href=\"/connect/{t}#provider-{name}\">Cancel<span class=\"vh\"> disconnecting {display}</span></a></div></div>",
                post("disconnect", "Disconnect", "danger"),
            )
        } else {
            String::new()
        };
        let icon = match &r.logo {
            Some(svg) => format!("<span class=\"icon logo\" aria-hidden=\"true\">{svg}</span>"),
            None => format!(
                "<span class=\"icon\" aria-hidden=\"true\">{}</span>",
                html_escape(&initial(r.display))
            ),
        };
        m.push_str(&format!(
            "<li class=\"provider {class}\" id=\"provider-{name}\">{icon}\
<div class=\"info\"><h2>{display}</h2>{desc}\
<p class=\"status {class}\"><span class=\"vh\">Status: </span>{words}</p>{reason}</div>\
{actions}{confirm}</li>\n",
            desc = r
                .description
                .map(|d| format!("<p class=\"desc\">{}</p>", html_escape(d)))
                .unwrap_or_default(),
            reason = r
                .reason
                .as_ref()
                .map(|d| format!("<p class=\"reason\">{}</p>", html_escape(d)))
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
    layout(c, "Connect your accounts", &m)
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
        html_escape(app_start(c))
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
    layout(c, &format!("Connect accounts for {}", v.who), &m)
}

fn minutes(n: i64) -> String {
    format!("{n} more minute{}", if n == 1 { "" } else { "s" })
}

/// The stylesheet with the accent colours from the config in front (the
/// text colour on it was chosen, and its contrast checked, at start).
pub fn stylesheet(c: &ConnectConfig) -> String {
    format!(
        ":root {{ --accent: {}; --on-accent: {}; }}\n{}",
        c.accent_color,
        c.accent_text,
        include_str!("style.css")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(app_name: Option<&str>) -> ConnectConfig {
        ConnectConfig {
            app_name: app_name.map(str::to_owned),
            accent_color: "#2563eb".into(),
            accent_text: "#ffffff",
            logo_url: None,
            app_url: None,
            confirm: false,
        }
    }

    #[test]
    fn sentences_begin_with_a_capital_and_name_the_app() {
        let view = PageView {
            ticket: "t",
            csrf: "c",
            who: "alice@example.com in Acme",
            return_to: None,
            minutes_left: 5,
            notice: None,
            rows: vec![],
            confirm_disconnect: None,
        };
        let html = connect_page(&config(None), &view);
        assert!(
            html.contains("in Acme</strong>. The app uses them"),
            "{html}"
        );
        let html = connect_page(&config(Some("acme")), &view);
        assert!(
            html.contains("</strong>. acme uses them"),
            "the name as configured"
        );
        let html = message(&config(Some("Acme")), "T", "D", Some("https://a.example/"));
        assert!(html.contains(">Back to Acme</a>"), "{html}");
        assert!(!message(&config(None), "T", "D", None).contains("Back to"));
    }
}
