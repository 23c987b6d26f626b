//! Request path normalization, before routing and authorization look at the path, and what the app
//! then receives: Istio's `BASE` (RFC 3986 §6.2.2: percent-decoding of unreserved characters, dot
//! segments removed) plus `MERGE_SLASHES`, and escaped slashes decoded (`%2F`, `%5C`, and `\` as `/`),
//! so that no spelling of a path reaches the app as anything other than the path that was authorized.
//! A NUL, a broken escape, an escaped escape (`%252e`: an app that decodes twice would see `.`) or bytes
//! that are not UTF-8 once decoded (overlong encodings of `.` and `/`) are refused: no app could agree
//! with the proxy on what they mean.

use std::borrow::Cow;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path contains a NUL")]
    Nul,
    #[error("the path contains a malformed percent-escape")]
    BadEscape,
    #[error("the path is not UTF-8 once decoded")]
    NotUtf8,
    #[error("the path contains a fragment")]
    Fragment,
    #[error("the path is percent-encoded twice")]
    DoubleEncoded,
}

impl PathError {
    pub fn as_str(self) -> &'static str {
        match self {
            PathError::Nul => "the path contains a NUL",
            PathError::BadEscape => "the path contains a malformed percent-escape",
            PathError::NotUtf8 => "the path is not UTF-8 once decoded",
            PathError::Fragment => "the path contains a fragment",
            PathError::DoubleEncoded => "the path is percent-encoded twice",
        }
    }
}

/// Normalizes the path of `path_and_query`, keeping the query as it is.
pub fn normalize(path_and_query: &str) -> Result<Cow<'_, str>, PathError> {
    let (path, query) = match path_and_query.find('?') {
        Some(at) => path_and_query.split_at(at),
        None => (path_and_query, ""),
    };
    if path_and_query.contains('#') {
        return Err(PathError::Fragment);
    }
    if !path.starts_with('/') {
        return Ok(Cow::Borrowed(path_and_query)); // `*` (OPTIONS) or an authority (CONNECT)
    }
    if is_normal(path) {
        return Ok(Cow::Borrowed(path_and_query));
    }
    let decoded = decode(path)?;
    let mut out = remove_dot_segments(&decoded);
    out.push_str(query);
    Ok(Cow::Owned(out))
}

/// Nothing to change: no escapes, backslashes, empty or dot segments.
fn is_normal(path: &str) -> bool {
    !path.contains(['%', '\\'])
        && !path.contains("//")
        && !path.split('/').any(|segment| segment == "." || segment == "..")
}

/// Decodes escapes of unreserved characters and of `/` and `\`, uppercases the rest, turns `\` into `/`
/// and merges runs of slashes.
fn decode(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    // Every byte the escapes stand for, to check that the whole is UTF-8.
    let mut raw = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let ch = if b == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(PathError::BadEscape)?;
            let value = std::str::from_utf8(hex)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(PathError::BadEscape)?;
            i += 3;
            raw.push(value);
            match value {
                0 => return Err(PathError::Nul),
                b'/' | b'\\' => '/',
                v if v.is_ascii_alphanumeric() || b"-._~".contains(&v) => char::from(v),
                v => {
                    out.push_str(&format!("%{v:02X}"));
                    continue;
                }
            }
        } else {
            i += 1;
            raw.push(b);
            match b {
                0 => return Err(PathError::Nul),
                b'\\' => '/',
                _ => {
                    // Non-ASCII bytes are carried as they came; UTF-8 is checked on `raw`.
                    if b.is_ascii() {
                        char::from(b)
                    } else {
                        out.push_str(&format!("%{b:02X}"));
                        continue;
                    }
                }
            }
        };
        if ch == '/' && out.ends_with('/') {
            continue; // merge slashes
        }
        out.push(ch);
    }
    if std::str::from_utf8(&raw).is_err() {
        return Err(PathError::NotUtf8);
    }
    // An escaped `%` followed by hex digits, once the unreserved escapes are decoded.
    let escaped_escape = out.match_indices("%25").any(|(at, _)| {
        out.as_bytes()
            .get(at + 3..at + 5)
            .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if escaped_escape {
        return Err(PathError::DoubleEncoded);
    }
    Ok(out)
}

/// RFC 3986 §5.2.4 on a path whose slashes are already merged.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    let last = parts.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, segment) in parts.iter().enumerate() {
        match *segment {
            "." => trailing_slash = i == last,
            ".." => {
                segments.pop();
                trailing_slash = i == last;
            }
            s => {
                segments.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_paths_are_borrowed() {
        for p in ["/", "/orders/1", "/orders/1?x=%2F..", "/a.b/c..d", "*"] {
            assert!(matches!(normalize(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    #[test]
    fn rfc3986_and_merge_slashes() {
        for (input, expected) in [
            ("//admin", "/admin"),
            ("/./admin", "/admin"),
            ("/orders/../admin", "/admin"),
            ("/orders/%2e%2e/admin", "/admin"),
            ("/orders/%2E%2E/admin", "/admin"),
            ("/orders/.%2e/admin", "/admin"),
            ("/orders/..%2Fadmin", "/admin"),
            ("/orders/..%2fadmin", "/admin"),
            ("/orders/..%5Cadmin", "/admin"),
            ("/orders\\..\\admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/a/b/../../../admin", "/admin"),
            ("/orders/1/", "/orders/1/"),
            ("/orders/1/.", "/orders/1/"),
            ("/orders/1/..", "/orders/"),
            ("/orders/%7e1", "/orders/~1"),
            ("/orders/%3f?q=1", "/orders/%3F?q=1"),
            ("/orders///1", "/orders/1"),
            ("/..", "/"),
        ] {
            assert_eq!(normalize(input).unwrap(), expected, "{input}");
            // Normal already: a second pass (an app decoding again) finds nothing to change.
            assert_eq!(normalize(expected).unwrap(), expected, "{expected}");
        }
    }

    #[test]
    fn refused() {
        assert_eq!(normalize("/admin%00"), Err(PathError::Nul));
        assert_eq!(normalize("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%2"), Err(PathError::BadEscape));
        assert_eq!(normalize("/orders/%c0%ae%c0%ae/admin"), Err(PathError::NotUtf8));
        assert_eq!(normalize("/%e0%80%af"), Err(PathError::NotUtf8));
        assert_eq!(normalize("/a#b"), Err(PathError::Fragment));
        assert_eq!(
            normalize("/orders/%252e%252e/admin"),
            Err(PathError::DoubleEncoded)
        );
        assert_eq!(normalize("/orders/%25%32%65"), Err(PathError::DoubleEncoded));
        assert_eq!(normalize("/100%25").unwrap(), "/100%25");
        // Real UTF-8 stays, escaped.
        assert_eq!(normalize("/caf%C3%A9").unwrap(), "/caf%C3%A9");
    }
}
