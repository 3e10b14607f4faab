//! The rules for text fields, as regular expressions the OpenAPI documents
//! state (`pattern`) and the services enforce with the same expression, so
//! the two cannot disagree. Lengths count characters (Unicode scalar
//! values), as JSON Schema's `minLength`/`maxLength` do.
//!
//! A `#[schema(pattern = ...)]` attribute needs a literal, so the services
//! repeat these strings there; their tests check that every pattern in their
//! document is one of these.

use std::{collections::HashMap, sync::Mutex};

use regex::Regex;

use crate::ApiError;

/// A name: no control characters (U+0000–U+001F, U+007F) and at least one
/// character that is not whitespace.
pub const NAME: &str = r"^[^\u0000-\u001F\u007F]*[^\s\u0000-\u001F\u007F][^\u0000-\u001F\u007F]*$";

/// An e-mail address: `local@domain` with a dot-separated domain of two or
/// more non-empty labels; no whitespace, control characters or second `@`.
pub const EMAIL: &str =
    r"^[^@\s\u0000-\u001F\u007F]+@[^@\s.\u0000-\u001F\u007F]+(\.[^@\s.\u0000-\u001F\u007F]+)+$";

/// Free text: anything but NUL, which PostgreSQL's text cannot hold.
pub const NO_NUL: &str = r"^[^\u0000]*$";

/// Every pattern above, for tests that check a document uses only these.
pub const ALL: &[&str] = &[NAME, EMAIL, NO_NUL];

/// Whether `value` matches `pattern` (one of the constants above; compiled once).
pub fn matches(pattern: &'static str, value: &str) -> bool {
    static CACHE: Mutex<Option<HashMap<&'static str, Regex>>> = Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    cache
        .get_or_insert_with(HashMap::new)
        .entry(pattern)
        .or_insert_with(|| Regex::new(pattern).expect("the kit's patterns compile"))
        .is_match(value)
}

/// Checks a text field: `min` to `max` characters matching `pattern`, else a
/// 422 naming `field` and the rule (`what` says what the pattern asks for).
pub fn check(
    field: &str,
    value: &str,
    min: usize,
    max: usize,
    pattern: &'static str,
    what: &str,
) -> Result<(), ApiError> {
    let n = value.chars().count();
    if n < min || n > max {
        return Err(ApiError::invalid(
            field,
            format!("{field} must be {min} to {max} characters, not {n}"),
        ));
    }
    if !matches(pattern, value) {
        return Err(ApiError::invalid(field, format!("{field} must be {what}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_patterns_say_what_their_docs_say() {
        for ok in ["a", " Alice B ", "漢字", "x\u{a0}y", "🦀"] {
            assert!(matches(NAME, ok), "{ok:?}");
        }
        for bad in ["", "   ", "\t\n", "\u{3000}", "a\u{0}b", "a\nb", "a\u{7f}"] {
            assert!(!matches(NAME, bad), "{bad:?}");
        }
        for ok in ["a@b.c", "Alice@Example.com", "x+y@a.b.c", "é@ü.io"] {
            assert!(matches(EMAIL, ok), "{ok:?}");
        }
        for bad in [
            "", "nope", "@b.c", "a@b", "a@.b", "a@b.", "a@b..c", "a@b@c.d", " a@b.c", "a b@c.d",
        ] {
            assert!(!matches(EMAIL, bad), "{bad:?}");
        }
        assert!(matches(NO_NUL, "line\nnext\ttab"));
        assert!(!matches(NO_NUL, "a\u{0}"));
        let e = check("name", "   ", 1, 100, NAME, "not blank").unwrap_err();
        assert_eq!(
            (e.status.as_u16(), e.body.message.as_str()),
            (422, "name must be not blank")
        );
        let e = check("name", &"x".repeat(101), 1, 100, NAME, "x").unwrap_err();
        assert_eq!(e.body.message, "name must be 1 to 100 characters, not 101");
    }
}
