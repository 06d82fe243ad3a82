//! Image names at the receiver: relative paths that must stay under the root.
//!
//! The checks assume nobody else rearranges directories under the root while a name is
//! resolved; the root belongs to the receiver.

use std::io;
use std::path::{Component, Path, PathBuf};

/// Suffix of the file a transfer writes before its digest is checked.
pub(crate) const PARTIAL_SUFFIX: &str = ".partial";
const MAX_NAME_BYTES: usize = 1024;

/// Where an image lands.
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    pub target: PathBuf,
    pub partial: PathBuf,
}

/// Checks `name` without touching the file system.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "the name is {} bytes long; at most {MAX_NAME_BYTES} are allowed",
            name.len()
        ));
    }
    if name.contains('\0') {
        return Err("the name holds a NUL byte".into());
    }
    if name.ends_with('/') {
        return Err("the name ends with `/`: it must name a file".into());
    }
    let path = Path::new(name);
    for c in path.components() {
        match c {
            Component::Normal(_) => {}
            Component::ParentDir => return Err("the name contains `..`".into()),
            Component::RootDir | Component::Prefix(_) => {
                return Err("the name is an absolute path; it must be relative to the root".into())
            }
            Component::CurDir => return Err("the name contains `.` as a component".into()),
        }
    }
    if name.ends_with(PARTIAL_SUFFIX) {
        return Err(format!(
            "names ending in `{PARTIAL_SUFFIX}` are reserved for transfers in progress"
        ));
    }
    Ok(())
}

/// Resolves `name` under `root` (already canonical), creating missing directories. Any
/// directory that is a symbolic link must resolve inside the root; the image itself and its
/// partial file must not be symbolic links, nor anything but regular files.
pub(crate) fn place(root: &Path, name: &str) -> Result<Placement, String> {
    check_name(name)?;
    let rel = Path::new(name);
    let components: Vec<_> = rel.components().collect();
    let (file, dirs) = components
        .split_last()
        .ok_or_else(|| "the name is empty".to_string())?;
    let mut dir = root.to_path_buf();
    for c in dirs {
        let next = dir.join(c);
        match std::fs::symlink_metadata(&next) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => match std::fs::create_dir(&next) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(format!("cannot create directory {}: {e}", next.display())),
            },
            Err(e) => return Err(format!("cannot inspect {}: {e}", next.display())),
            Ok(meta) if meta.file_type().is_symlink() => {
                let resolved = std::fs::canonicalize(&next)
                    .map_err(|e| format!("cannot resolve the link {}: {e}", next.display()))?;
                if !resolved.starts_with(root) {
                    return Err(format!(
                        "{} is a symbolic link that leads out of the root",
                        next.display()
                    ));
                }
                if !resolved.is_dir() {
                    return Err(format!("{} is not a directory", next.display()));
                }
            }
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(format!("{} is not a directory", next.display())),
        }
        dir = next;
    }
    let target = dir.join(file);
    let mut partial_name = target.as_os_str().to_owned();
    partial_name.push(PARTIAL_SUFFIX);
    let partial = PathBuf::from(partial_name);
    for p in [&target, &partial] {
        match std::fs::symlink_metadata(p) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(format!(
                    "{} is a symbolic link; refusing to write through it",
                    p.display()
                ))
            }
            Ok(meta) if !meta.is_file() => {
                return Err(format!("{} exists and is not a regular file", p.display()))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot inspect {}: {e}", p.display())),
        }
    }
    Ok(Placement { target, partial })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_escape_or_mislead_are_refused() {
        for (name, why) in [
            ("", "empty"),
            ("../etc/passwd", "`..`"),
            ("a/../../b", "`..`"),
            ("/etc/passwd", "absolute"),
            ("./a", "`.`"),
            ("dir/", "must name a file"),
            ("disk.raw.partial", "reserved"),
            ("a\0b", "NUL"),
        ] {
            let e = check_name(name).unwrap_err();
            assert!(e.contains(why), "{name:?}: {e}");
        }
        check_name("vm-1/disk.raw").unwrap();
    }

    #[test]
    fn symlinks_out_of_the_root_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root_path = std::fs::canonicalize(root.path()).unwrap();
        std::os::unix::fs::symlink(outside.path(), root_path.join("out")).unwrap();
        let e = place(&root_path, "out/disk.raw").unwrap_err();
        assert!(e.contains("leads out of the root"), "{e}");
        std::fs::create_dir(root_path.join("real")).unwrap();
        std::os::unix::fs::symlink(root_path.join("real"), root_path.join("inside")).unwrap();
        let p = place(&root_path, "inside/disk.raw").unwrap();
        assert_eq!(p.target, root_path.join("inside/disk.raw"));
        std::os::unix::fs::symlink("/etc/passwd", root_path.join("link.raw")).unwrap();
        let e = place(&root_path, "link.raw").unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        let p = place(&root_path, "new/dir/disk.raw").unwrap();
        assert!(root_path.join("new/dir").is_dir());
        assert_eq!(p.partial, root_path.join("new/dir/disk.raw.partial"));
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
    }
}
