//! WCAG 2 contrast, so the connect page's accent colour is checked when the
//! config is read rather than found unreadable by a user.

/// The contrast WCAG 2.2 AA asks of normal-size text (1.4.3).
pub const AA_TEXT: f64 = 4.5;

/// Relative luminance of an sRGB colour (WCAG 2).
pub fn luminance(rgb: [u8; 3]) -> f64 {
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

/// The contrast ratio of two colours, 1 to 21.
pub fn contrast(a: [u8; 3], b: [u8; 3]) -> f64 {
    let (x, y) = (luminance(a), luminance(b));
    (x.max(y) + 0.05) / (x.min(y) + 0.05)
}

/// Black or white text on `bg`, whichever contrasts more, and that ratio.
/// The better of the two is never below about 4.58, so it always meets
/// [`AA_TEXT`]; the ratio is answered so the caller can say so.
pub fn text_on(bg: [u8; 3]) -> (&'static str, f64) {
    let white = contrast(bg, [255; 3]);
    let black = contrast(bg, [0; 3]);
    if white >= black {
        ("#ffffff", white)
    } else {
        ("#000000", black)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_on_any_accent_meets_aa() {
        assert_eq!(text_on([0x25, 0x63, 0xeb]).0, "#ffffff");
        assert_eq!(text_on([0xff, 0xeb, 0x3b]).0, "#000000");
        assert!((contrast([0; 3], [255; 3]) - 21.0).abs() < 1e-9);
        // Every grey, the hardest case for black-or-white text.
        for v in 0..=255u8 {
            assert!(text_on([v; 3]).1 >= AA_TEXT, "{v}");
        }
    }
}
