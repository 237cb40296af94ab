//! The presets' logos, from Simple Icons (CC0 1.0, simpleicons.org), built
//! into the binary so the page needs no image host. A preset without one
//! (Simple Icons leaves some brands out) shows the name's initial.

/// The Simple Icons SVG for `preset`, as shipped.
fn source(preset: &str) -> Option<&'static str> {
    Some(match preset {
        "google" => include_str!("../../assets/logos/google.svg"),
        "gmail" => include_str!("../../assets/logos/gmail.svg"),
        "google_sheets" => include_str!("../../assets/logos/googlesheets.svg"),
        "google_drive" => include_str!("../../assets/logos/googledrive.svg"),
        "notion" => include_str!("../../assets/logos/notion.svg"),
        "hubspot" => include_str!("../../assets/logos/hubspot.svg"),
        "zoom" => include_str!("../../assets/logos/zoom.svg"),
        "atlassian" => include_str!("../../assets/logos/atlassian.svg"),
        "github" => include_str!("../../assets/logos/github.svg"),
        "linear" => include_str!("../../assets/logos/linear.svg"),
        "airtable" => include_str!("../../assets/logos/airtable.svg"),
        "dropbox" => include_str!("../../assets/logos/dropbox.svg"),
        "calendly" => include_str!("../../assets/logos/calendly.svg"),
        "asana" => include_str!("../../assets/logos/asana.svg"),
        "shopify" => include_str!("../../assets/logos/shopify.svg"),
        "zendesk" => include_str!("../../assets/logos/zendesk.svg"),
        "intercom" => include_str!("../../assets/logos/intercom.svg"),
        _ => return None,
    })
}

/// The logo of `preset` ready to inline: decorative (the row's heading
/// names the service, so screen readers skip it), drawn in the text
/// colour so it reads in light and dark mode. Presentation attributes
/// only: the page's CSP forbids inline styles.
pub fn inline(preset: &str) -> Option<String> {
    let svg = source(preset)?;
    let svg = svg.trim().replacen(
        "<svg role=\"img\" ",
        "<svg aria-hidden=\"true\" focusable=\"false\" fill=\"currentColor\" ",
        1,
    );
    Some(match (svg.find("<title>"), svg.find("</title>")) {
        (Some(a), Some(b)) if a < b => format!("{}{}", &svg[..a], &svg[b + "</title>".len()..]),
        _ => svg,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_logo_inlines_as_a_decorative_svg() {
        for p in [
            "google",
            "gmail",
            "google_sheets",
            "google_drive",
            "notion",
            "hubspot",
            "zoom",
            "atlassian",
            "github",
            "linear",
            "airtable",
            "dropbox",
            "calendly",
            "asana",
            "shopify",
            "zendesk",
            "intercom",
        ] {
            let s = inline(p).unwrap();
            assert!(
                s.starts_with(
                    "<svg aria-hidden=\"true\" focusable=\"false\" fill=\"currentColor\" "
                ),
                "{p}: {s}"
            );
            assert!(
                !s.contains("<title") && !s.contains("role=") && !s.contains("style"),
                "{p}"
            );
            assert!(!s.contains("<script") && s.ends_with("</svg>"), "{p}");
        }
        assert!(inline("slack").is_none(), "no Slack logo in Simple Icons");
    }
}
