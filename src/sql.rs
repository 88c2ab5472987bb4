//! Small helpers for SQL text this crate builds itself: values it inlines into statements (so
//! several statements can travel in one round trip) and rows it streams with `COPY`.

/// `text` as a dollar-quoted SQL literal whose tag does not occur in it, so it is safe to
/// inline whatever it contains (dollar quotes have no escapes).
pub(crate) fn dollar_quote(text: &str) -> String {
    let mut tag = String::from("$tw$");
    let mut n = 0u32;
    while text.contains(&tag[..tag.len() - 1]) {
        n += 1;
        tag = format!("$tw{n}$");
    }
    format!("{tag}{text}{tag}")
}

/// Appends `s` to `out` escaped for `COPY`'s text format: backslash, tab, newline and carriage
/// return.
pub fn copy_escape(out: &mut Vec<u8>, s: &str) {
    for b in s.bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollar_quote_picks_a_tag_absent_from_the_text() {
        assert_eq!(dollar_quote(r#"{"a":1}"#), r#"$tw${"a":1}$tw$"#);
        assert_eq!(dollar_quote("x$tw$y"), "$tw1$x$tw$y$tw1$");
        assert_eq!(dollar_quote("$tw1$ $tw"), "$tw2$$tw1$ $tw$tw2$");
        assert_eq!(dollar_quote("ends with $tw"), "$tw1$ends with $tw$tw1$");
    }

    #[test]
    fn copy_escape_escapes_what_copy_text_reads_specially() {
        let mut out = Vec::new();
        copy_escape(&mut out, "a\tb\\c\nd\re");
        assert_eq!(out, b"a\\tb\\\\c\\nd\\re");
    }
}
