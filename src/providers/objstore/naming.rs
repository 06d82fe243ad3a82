//! How a service's bucket is named at the object store.
//!
//! The configured template (default `{service}--{bucket}`) is filled in verbatim: nothing is
//! lowercased or replaced, so the remote name reads like the names in the configuration and
//! no two buckets can be folded onto one name by a rewrite. Two checks keep the mapping one
//! to one and acceptable to the store:
//!
//! - the text between the placeholders (`--` by default) must occur exactly once in the
//!   filled-in middle part, so a service `a--b` with bucket `c` cannot meet service `a` with
//!   bucket `b--c`;
//! - the result must be a valid name for the store: S3's bucket rules (3 to 63 lowercase
//!   letters, digits, `-` and `.`, no reserved prefixes or suffixes, not an IP address), or
//!   Swift's container rules (1 to 256 bytes, no `/`).
//!
//! A refused name is an error that says which rule it breaks; rename the service or bucket,
//! or change `bucket_name`/`container_name`.

/// Which store's naming rules apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Store {
    S3,
    Swift,
}

impl Store {
    fn noun(self) -> &'static str {
        match self {
            Store::S3 => "S3 bucket",
            Store::Swift => "Swift container",
        }
    }

    fn template_key(self) -> &'static str {
        match self {
            Store::S3 => "bucket_name",
            Store::Swift => "container_name",
        }
    }
}

/// The remote name of `service`'s bucket `bucket` under `template`, or why there is none.
/// The template was checked when the configuration was loaded.
pub(crate) fn remote_name(
    store: Store,
    template: &str,
    service: &str,
    bucket: &str,
) -> Result<String, String> {
    let (s_at, b_at) = (
        template.find("{service}").unwrap_or(0),
        template.find("{bucket}").unwrap_or(0),
    );
    let (first, second, sep) = if s_at < b_at {
        (service, bucket, &template[s_at + "{service}".len()..b_at])
    } else {
        (bucket, service, &template[b_at + "{bucket}".len()..s_at])
    };
    let middle = format!("{first}{sep}{second}");
    if !sep.is_empty() && occurrences(&middle, sep) != 1 {
        return Err(format!(
            "service `{service}` and bucket `{bucket}` would be ambiguous in the {} name: `{sep}` separates them in `{template}` and must not occur in either name (or where they meet); rename one or change `{}`",
            store.noun(),
            store.template_key()
        ));
    }
    let name = template
        .replace("{service}", service)
        .replace("{bucket}", bucket);
    let rule = match store {
        Store::S3 => s3_rule(&name),
        Store::Swift => swift_rule(&name),
    };
    match rule {
        Ok(()) => Ok(name),
        Err(why) => Err(format!(
            "the {} name `{name}` (from `{template}`) is refused: {why}; rename the service or bucket, or change `{}`",
            store.noun(),
            store.template_key()
        )),
    }
}

/// Occurrences of `needle` in `hay`, overlapping ones included.
fn occurrences(hay: &str, needle: &str) -> usize {
    (0..hay.len())
        .filter(|&i| hay.is_char_boundary(i) && hay[i..].starts_with(needle))
        .count()
}

/// The general-purpose bucket naming rules of Amazon S3, which other S3 servers follow.
fn s3_rule(name: &str) -> Result<(), String> {
    if !(3..=63).contains(&name.len()) {
        return Err(format!(
            "it is {} characters long; S3 bucket names have 3 to 63",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '.'))
    {
        return Err(format!(
            "it holds {c:?}; S3 bucket names hold only lowercase letters, digits, `-` and `.`"
        ));
    }
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !edge_ok(name.chars().next()) || !edge_ok(name.chars().last()) {
        return Err("S3 bucket names begin and end with a letter or digit".to_string());
    }
    if name.contains("..") {
        return Err("S3 bucket names may not hold two adjacent periods".to_string());
    }
    if name.split('.').count() == 4 && name.split('.').all(|p| p.parse::<u8>().is_ok()) {
        return Err("S3 bucket names may not look like an IP address".to_string());
    }
    for prefix in ["xn--", "sthree-", "amzn-s3-demo-"] {
        if name.starts_with(prefix) {
            return Err(format!("the prefix `{prefix}` is reserved by S3"));
        }
    }
    for suffix in ["-s3alias", "--ol-s3", "--x-s3", "--table-s3", ".mrap"] {
        if name.ends_with(suffix) {
            return Err(format!("the suffix `{suffix}` is reserved by S3"));
        }
    }
    Ok(())
}

/// OpenStack Swift's container naming rules (with the default `max_container_name_length`).
fn swift_rule(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 256 {
        return Err(format!(
            "it is {} bytes long; Swift container names have 1 to 256",
            name.len()
        ));
    }
    if name.contains('/') {
        return Err("Swift container names may not hold `/`".to_string());
    }
    if name.chars().any(char::is_control) {
        return Err("Swift container names may not hold control characters".to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "{service}--{bucket}";

    #[test]
    fn names_are_filled_in_verbatim_and_checked_for_s3() {
        assert_eq!(
            remote_name(Store::S3, T, "shop", "media").unwrap(),
            "shop--media"
        );
        assert_eq!(
            remote_name(Store::S3, "fc.{bucket}.{service}", "shop", "media").unwrap(),
            "fc.media.shop"
        );
        let err = remote_name(Store::S3, T, "Shop", "media").unwrap_err();
        assert!(err.contains("`Shop--media`"), "{err}");
        assert!(err.contains("holds 'S'"), "{err}");
        let err = remote_name(Store::S3, T, "shop", "a_b").unwrap_err();
        assert!(err.contains("holds '_'"), "{err}");
        let long = "x".repeat(40);
        let err = remote_name(Store::S3, T, &long, &long).unwrap_err();
        assert!(err.contains("82 characters long"), "{err}");
        let err = remote_name(Store::S3, "xn--{service}-{bucket}", "a", "b").unwrap_err();
        assert!(err.contains("prefix `xn--`"), "{err}");
        let err = remote_name(Store::S3, "{service}-{bucket}", "a", "s3alias").unwrap_err();
        assert!(err.contains("suffix `-s3alias`"), "{err}");
        let err = remote_name(Store::S3, "10.0.{service}.{bucket}", "0", "1").unwrap_err();
        assert!(err.contains("IP address"), "{err}");
        let err = remote_name(Store::S3, "{service}-{bucket}", "a", "-b").unwrap_err();
        assert!(err.contains("ambiguous"), "{err}");
    }

    #[test]
    fn no_two_pairs_share_a_name() {
        // `a--b`/`c` and `a`/`b--c` would both be `a--b--c`.
        let err = remote_name(Store::S3, T, "a--b", "c").unwrap_err();
        assert!(err.contains("ambiguous"), "{err}");
        assert!(remote_name(Store::S3, T, "a", "b--c").is_err());
        // `a-` + `--` + `b` gives `a---b`, which `a` + `--` + `-b` would give too.
        assert!(remote_name(Store::S3, T, "a-", "b").is_err());
        // A single hyphen is fine with the default separator.
        assert_eq!(remote_name(Store::S3, T, "a-b", "c-d").unwrap(), "a-b--c-d");
    }

    #[test]
    fn swift_accepts_what_s3_refuses_but_not_slashes() {
        assert_eq!(
            remote_name(Store::Swift, T, "Shop", "Media_1").unwrap(),
            "Shop--Media_1"
        );
        let err =
            remote_name(Store::Swift, "{service}--{bucket}", "a", &"b".repeat(260)).unwrap_err();
        assert!(err.contains("263 bytes long"), "{err}");
        assert!(err.contains("container_name"), "{err}");
    }
}
