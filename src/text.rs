//! Text that a node or a Node object supplies, made safe to show.
//!
//! An SSH disconnect message, a channel-open failure reason, a health
//! probe's answer or a Node's name is written by the node, and it reaches
//! an operator's terminal through `tunneler status`, the logs and the
//! status document. A control character there (an ESC starting a terminal
//! escape sequence, a carriage return that overwrites the line, a bidi
//! override that reorders it) would act on that terminal instead of being
//! read. [`escape_control`] writes each one as a visible `\u{..}` escape
//! (`\t`, `\n`, `\r` as themselves, escaped), and leaves everything else,
//! printable Unicode included, as it is. It is applied where such text
//! enters (so logs and the status document carry it escaped), and once more
//! in the status table, for a document from another daemon version.

use std::borrow::Cow;

/// Whether `c` must not reach a terminal as it is: C0 and C1 controls, DEL,
/// and the Unicode bidirectional overrides and isolates.
fn is_unsafe(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every control character written as a visible escape.
pub fn escape_control(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if is_unsafe(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_stays() {
        assert!(matches!(
            escape_control("plain, ünïcode ✓"),
            Cow::Borrowed(_)
        ));
        assert_eq!(
            escape_control("bye\u{1b}[2J\u{1b}]0;pwned\u{7}\r\nX\t\u{7f}\u{9b}31m"),
            "bye\\u{1b}[2J\\u{1b}]0;pwned\\u{7}\\r\\nX\\t\\u{7f}\\u{9b}31m"
        );
        assert_eq!(
            escape_control("a\u{202e}b\u{2066}c"),
            "a\\u{202e}b\\u{2066}c"
        );
        let out = escape_control("\u{1b}\u{0}\u{85}");
        assert!(!out.chars().any(is_unsafe), "{out}");
    }
}
