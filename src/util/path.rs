//! Paths as a user reads them: `tidy_path` folds `.` and `..` for display.

use std::path::{Path, PathBuf};

/// `a/b/../c` as `a/c`: drop `.` and fold `..` into the folder before it, for display.
pub fn tidy_path(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out: Vec<Component> = Vec::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.last(), Some(Component::Normal(_))) => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    if out.is_empty() {
        PathBuf::from(".")
    } else {
        out.iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tidy_path_folds_parent_components() {
        assert_eq!(tidy_path(Path::new("pipelines/../tests/x")), Path::new("tests/x"));
        assert_eq!(tidy_path(Path::new("bases/../../x")), Path::new("../x"));
        assert_eq!(tidy_path(Path::new("./a/./b")), Path::new("a/b"));
        assert_eq!(tidy_path(Path::new("a/..")), Path::new("."));
    }
}
