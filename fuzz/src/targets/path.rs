//! Request paths as normalization sees them, before routing and authorization.

use weft_authz::path::normalize;

/// A normalized path is normal: normalizing it again changes nothing, and it has no dot segments,
/// empty segments, backslashes or escaped slashes left for an app to read differently.
pub(crate) fn normalized(data: &[u8]) {
    let input = String::from_utf8_lossy(data);
    let Ok(once) = normalize(&input) else {
        return;
    };
    let twice = normalize(&once);
    assert_eq!(twice.as_deref(), Ok(&*once), "normalizing {input:?} twice");
    if !input.starts_with('/') {
        return;
    }
    let path = once.split('?').next().unwrap_or_default();
    for left in ["//", "/./", "/../", "\\"] {
        assert!(
            !path.contains(left),
            "{input:?} normalized to {path:?}, which has {left:?}"
        );
    }
    for end in ["/.", "/.."] {
        assert!(!path.ends_with(end), "{input:?} normalized to {path:?}");
    }
    let lower = path.to_ascii_lowercase();
    for escaped in ["%2f", "%5c", "%2e"] {
        assert!(
            !lower.contains(escaped),
            "{input:?} normalized to {path:?}, which has {escaped}"
        );
    }
}

pub(crate) fn seeds() -> Vec<Vec<u8>> {
    [
        "/orders/1",
        "/orders/../admin",
        "/orders/./x/../1?q=%2F",
        "/a//b///c",
        "/%2e%2e/admin",
        "/orders%2F..%2Fadmin",
        "/orders\\..\\admin",
        "/%7Euser/%41",
        "/a/b/c/./../../d",
        "*",
        "/x?y=../z",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}
