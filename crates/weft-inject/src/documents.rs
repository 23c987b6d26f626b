//! A stream of YAML documents cut at its `---` lines, each kept as the text it was, so that a
//! document the injector does not change comes out byte for byte.

/// One document: the separator line before it (empty for the first) and its text.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Chunk<'a> {
    pub(crate) separator: &'a str,
    pub(crate) body: &'a str,
}

/// A JSON object or array: YAML would read it too, but it is answered in JSON.
pub(crate) fn is_json(text: &str) -> bool {
    text.trim_start().starts_with(['{', '['])
}

/// Cuts `text` at every line that is `---` (optionally followed by a comment). A separator line
/// holding content (`--- {kind: Pod}`) is refused with the number of the document it starts.
pub(crate) fn split(text: &str) -> Result<Vec<Chunk<'_>>, (usize, String)> {
    let mut chunks = Vec::new();
    let mut separator = "";
    let mut start = 0;
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let end = at + line.len();
        if let Some(rest) = line.strip_prefix("---") {
            let rest = rest.trim();
            if rest.is_empty() || rest.starts_with('#') {
                chunks.push(Chunk {
                    separator,
                    body: &text[start..at],
                });
                separator = &text[at..end];
                start = end;
            } else if line.starts_with("--- ") || line.starts_with("---\t") {
                return Err((
                    chunks.len() + 2,
                    "content on the `---` line itself: put the document on the lines after it".into(),
                ));
            }
        }
        at = end;
    }
    chunks.push(Chunk {
        separator,
        body: &text[start..],
    });
    Ok(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_cut_at_separator_lines_and_keep_their_text() {
        let text = "# head\na: 1\n---\nb: 2\n--- # second\n---\n";
        let chunks = split(text).unwrap();
        let bodies: Vec<_> = chunks.iter().map(|c| (c.separator, c.body)).collect();
        assert_eq!(
            bodies,
            [
                ("", "# head\na: 1\n"),
                ("---\n", "b: 2\n"),
                ("--- # second\n", ""),
                ("---\n", "")
            ]
        );
        let joined: String = chunks
            .iter()
            .map(|c| format!("{}{}", c.separator, c.body))
            .collect();
        assert_eq!(joined, text);
        // `----` and a key that starts with dashes inside a block are not separators.
        assert_eq!(split("a: |\n  ---\nb: ----\n").unwrap().len(), 1);
        assert_eq!(split("a: 1\n--- {b: 2}\n").unwrap_err().0, 2);
    }
}
