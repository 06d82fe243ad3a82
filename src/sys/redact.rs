//! What of a URL may be shown.

/// What stands in for a secret in a shown URL.
const REDACTED: &str = "***";

/// `url` as it may be shown in a log line, an error or an API answer: userinfo
/// (`user:password@`) and the values of query parameters that look secret (signatures,
/// tokens, keys, passwords, credentials, as in pre-signed S3 or SAS URLs) are replaced by
/// `***`. Everything else is kept as written, so an operator still recognises the feed.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let mut out = String::with_capacity(url.len());
    out.push_str(scheme);
    match authority.rfind('@') {
        // Only where there is a scheme: without one, `@` may be anything (`file` paths).
        Some(at) if !scheme.is_empty() => {
            out.push_str(REDACTED);
            out.push_str(&authority[at..]);
        }
        _ => out.push_str(authority),
    }
    let (before_fragment, fragment) = match tail.find('#') {
        Some(i) => tail.split_at(i),
        None => (tail, ""),
    };
    match before_fragment.split_once('?') {
        None => out.push_str(before_fragment),
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            for (i, pair) in query.split('&').enumerate() {
                if i > 0 {
                    out.push('&');
                }
                match pair.split_once('=') {
                    Some((key, value)) if !value.is_empty() && is_secret_parameter(key) => {
                        out.push_str(key);
                        out.push('=');
                        out.push_str(REDACTED);
                    }
                    _ => out.push_str(pair),
                }
            }
        }
    }
    out.push_str(fragment);
    out
}

/// Whether a query parameter's value is a secret, by its name (case-insensitive, with
/// `%2D`/`%5F` and the like decoded, `-` and `_` ignored).
fn is_secret_parameter(key: &str) -> bool {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut name = String::with_capacity(key.len());
    let mut rest = key.as_bytes();
    while let Some((&first, tail)) = rest.split_first() {
        let (c, tail) = match (first, tail) {
            (b'%', [h, l, more @ ..]) => match (hex(*h), hex(*l)) {
                (Some(h), Some(l)) => (h * 16 + l, more),
                _ => (first, tail),
            },
            _ => (first, tail),
        };
        if c != b'-' && c != b'_' {
            name.push(c.to_ascii_lowercase() as char);
        }
        rest = tail;
    }
    // Exact names that are too short to look for inside others.
    const EXACT: &[&str] = &["sig", "pwd", "pass", "auth", "code", "apikey", "key"];
    // Parts of names: `X-Amz-Signature`, `X-Amz-Credential`, `X-Amz-Security-Token`,
    // `access_token`, `client_secret`, `api_key`, `subscription-key`, `password`…
    const PARTS: &[&str] = &[
        "signature",
        "credential",
        "token",
        "secret",
        "password",
        "passwd",
        "apikey",
        "accesskey",
        "privatekey",
        "subscriptionkey",
        "sessionkey",
        "authorization",
    ];
    EXACT.contains(&name.as_str()) || PARTS.iter().any(|p| name.contains(p))
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn urls_without_secrets_are_shown_as_written() {
        for url in [
            "https://pricing.us-east-1.amazonaws.com/offers/v1.0/aws/AmazonEC2/current/index.json",
            "https://prices.azure.com/api/retail/prices?api-version=2023-01-01-preview&$filter=armRegionName%20eq%20%27westeurope%27",
            "http://127.0.0.1:8080/catalogue.csv?region=fsn1#top",
            "file:///var/lib/feeds/a@b.json",
            "not a url at all",
            "",
        ] {
            assert_eq!(redact_url(url), url);
        }
    }

    #[test]
    fn userinfo_and_secret_parameters_are_redacted_whatever_their_case() {
        assert_eq!(
            redact_url("https://user:pa%40ss@feeds.example.com:8443/p.csv?sig=abc&region=x"),
            "https://***@feeds.example.com:8443/p.csv?sig=***&region=x"
        );
        assert_eq!(redact_url("https://token@host"), "https://***@host");
        let presigned = "https://b.s3.amazonaws.com/k.json?X-Amz-Algorithm=AWS4-HMAC-SHA256\
            &X-Amz-Credential=AKIAEXAMPLE%2F20260101%2Fus-east-1%2Fs3%2Faws4_request\
            &X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host\
            &X-Amz-Security-Token=FwoGZX&X-Amz-Signature=deadbeef";
        assert_eq!(
            redact_url(presigned),
            "https://b.s3.amazonaws.com/k.json?X-Amz-Algorithm=AWS4-HMAC-SHA256\
            &X-Amz-Credential=***\
            &X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host\
            &X-Amz-Security-Token=***&X-Amz-Signature=***"
        );
        for key in [
            "SIG",
            "Signature",
            "token",
            "access_token",
            "KEY",
            "api_key",
            "apiKey",
            "Subscription-Key",
            "secret",
            "client_secret",
            "password",
            "PWD",
            "AWSAccessKeyId",
            "X-Goog-Signature",
            "x%2Damz%2Dsignature",
        ] {
            let url = format!("https://h/p?a=1&{key}=hunter2&b=2#frag");
            assert_eq!(
                redact_url(&url),
                format!("https://h/p?a=1&{key}=***&b=2#frag"),
                "{key}"
            );
        }
        // Parameters that merely resemble one keep their value.
        assert_eq!(
            redact_url("https://h/p?sv=2024-01-01&se=2026&monkey=1&design=2"),
            "https://h/p?sv=2024-01-01&se=2026&monkey=1&design=2"
        );
    }
}
