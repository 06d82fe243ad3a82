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

/// Why a name is refused, before the file system is consulted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("the name is empty")]
    Empty,
    #[error("the name is {len} bytes long; at most {MAX_NAME_BYTES} are allowed")]
    TooLong { len: usize },
    #[error("the name holds a NUL byte")]
    Nul,
    #[error("the name ends with `/`: it must name a file")]
    TrailingSlash,
    #[error("the name contains `..`")]
    ParentDir,
    #[error("the name is an absolute path; it must be relative to the root")]
    Absolute,
    #[error("the name contains `.` as a component")]
    CurDir,
    #[error("names ending in `{PARTIAL_SUFFIX}` are reserved for transfers in progress")]
    Reserved,
}

/// Why a name cannot be placed under the root.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PlaceError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("cannot create directory {}: {source}", path.display())]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot inspect {}: {source}", path.display())]
    Inspect { path: PathBuf, source: io::Error },
    #[error("cannot resolve the link {}: {source}", path.display())]
    ResolveLink { path: PathBuf, source: io::Error },
    #[error("{} is a symbolic link that leads out of the root", path.display())]
    LinkEscapes { path: PathBuf },
    #[error("{} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("{} is a symbolic link; refusing to write through it", path.display())]
    Symlink { path: PathBuf },
    #[error("{} exists and is not a regular file", path.display())]
    NotAFile { path: PathBuf },
}

/// Checks `name` without touching the file system.
pub fn check_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong { len: name.len() });
    }
    if name.contains('\0') {
        return Err(NameError::Nul);
    }
    if name.ends_with('/') {
        return Err(NameError::TrailingSlash);
    }
    let path = Path::new(name);
    for c in path.components() {
        match c {
            Component::Normal(_) => {}
            Component::ParentDir => return Err(NameError::ParentDir),
            Component::RootDir | Component::Prefix(_) => return Err(NameError::Absolute),
            Component::CurDir => return Err(NameError::CurDir),
        }
    }
    if name.ends_with(PARTIAL_SUFFIX) {
        return Err(NameError::Reserved);
    }
    Ok(())
}

/// Resolves `name` under `root` (already canonical), creating missing directories. Any
/// directory that is a symbolic link must resolve inside the root; the image itself and its
/// partial file must not be symbolic links, nor anything but regular files.
pub(crate) fn place(root: &Path, name: &str) -> Result<Placement, PlaceError> {
    check_name(name)?;
    let rel = Path::new(name);
    let components: Vec<_> = rel.components().collect();
    let (file, dirs) = components.split_last().ok_or(NameError::Empty)?;
    let mut dir = root.to_path_buf();
    for c in dirs {
        let next = dir.join(c);
        match std::fs::symlink_metadata(&next) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => match std::fs::create_dir(&next) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => return Err(PlaceError::CreateDir { path: next, source }),
            },
            Err(source) => return Err(PlaceError::Inspect { path: next, source }),
            Ok(meta) if meta.file_type().is_symlink() => {
                let resolved = match std::fs::canonicalize(&next) {
                    Ok(r) => r,
                    Err(source) => return Err(PlaceError::ResolveLink { path: next, source }),
                };
                if !resolved.starts_with(root) {
                    return Err(PlaceError::LinkEscapes { path: next });
                }
                if !resolved.is_dir() {
                    return Err(PlaceError::NotADirectory { path: next });
                }
            }
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(PlaceError::NotADirectory { path: next }),
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
                return Err(PlaceError::Symlink { path: p.clone() })
            }
            Ok(meta) if !meta.is_file() => return Err(PlaceError::NotAFile { path: p.clone() }),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(PlaceError::Inspect {
                    path: p.clone(),
                    source,
                })
            }
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
            assert!(e.to_string().contains(why), "{name:?}: {e}");
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
        assert!(matches!(e, PlaceError::LinkEscapes { .. }), "{e:?}");
        assert!(e.to_string().contains("leads out of the root"), "{e}");
        std::fs::create_dir(root_path.join("real")).unwrap();
        std::os::unix::fs::symlink(root_path.join("real"), root_path.join("inside")).unwrap();
        let p = place(&root_path, "inside/disk.raw").unwrap();
        assert_eq!(p.target, root_path.join("inside/disk.raw"));
        std::os::unix::fs::symlink("/etc/passwd", root_path.join("link.raw")).unwrap();
        let e = place(&root_path, "link.raw").unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let p = place(&root_path, "new/dir/disk.raw").unwrap();
        assert!(root_path.join("new/dir").is_dir());
        assert_eq!(p.partial, root_path.join("new/dir/disk.raw.partial"));
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
    }
}
