//! Names of services, volumes, buckets and apps, config files, and object keys: what a
//! provider accepts. Drivers map them to paths or API names, so the checks are strict enough
//! for both.

/// Longest service, volume, bucket or app name.
pub const MAX_NAME_LEN: usize = 63;
/// Longest object key (the S3 limit).
pub const MAX_KEY_LEN: usize = 1024;
/// Longest segment of an object key (a file name limit on Linux file systems).
pub const MAX_KEY_SEGMENT_LEN: usize = 255;

/// Checks a service, volume, bucket or app name: 1 to 63 ASCII letters, digits, `-` and `_`,
/// not starting with `-`. Returns the reason it is refused.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".to_string());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "the name is {} characters long; at most {MAX_NAME_LEN} are allowed",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(format!(
            "the name `{name}` holds {c:?}; only letters, digits, `-` and `_` are allowed"
        ));
    }
    if name.starts_with('-') {
        return Err(format!("the name `{name}` starts with `-`"));
    }
    Ok(())
}

/// Checks the name of a file an app reads (`demo.toml`): 1 to 255 ASCII letters, digits,
/// `-`, `_` and `.`, not starting with `.` or `-`, so it stays inside the app's directory.
pub fn validate_file_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_KEY_SEGMENT_LEN {
        return Err(format!(
            "a file name must be 1 to {MAX_KEY_SEGMENT_LEN} characters long, got {}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "the file name `{name}` holds {c:?}; only letters, digits, `-`, `_` and `.` are allowed"
        ));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(format!(
            "the file name `{name}` starts with `{}`",
            &name[..1]
        ));
    }
    Ok(())
}

/// Checks an object key and returns its `/`-separated segments. A key is relative to its
/// bucket: no leading `/`, no empty, `.` or `..` segments, so it can never name anything
/// outside the bucket. Returns the reason it is refused.
pub fn validate_key(key: &str) -> Result<Vec<&str>, String> {
    if key.is_empty() {
        return Err("the key is empty".to_string());
    }
    if key.len() > MAX_KEY_LEN {
        return Err(format!(
            "the key is {} bytes long; at most {MAX_KEY_LEN} are allowed",
            key.len()
        ));
    }
    if key.contains('\0') {
        return Err("the key holds a NUL byte".to_string());
    }
    if key.starts_with('/') {
        return Err("the key starts with `/`; keys are relative to their bucket".to_string());
    }
    let segments: Vec<&str> = key.split('/').collect();
    for s in &segments {
        match *s {
            "" => return Err("the key has an empty segment (`//` or a trailing `/`)".to_string()),
            "." | ".." => {
                return Err(format!(
                "the key has a `{s}` segment; keys may not step out of their place in the bucket"
            ))
            }
            _ if s.len() > MAX_KEY_SEGMENT_LEN => {
                return Err(format!(
                "the key segment `{s}` is {} bytes long; at most {MAX_KEY_SEGMENT_LEN} are allowed",
                s.len()
            ))
            }
            _ => {}
        }
    }
    Ok(segments)
}
