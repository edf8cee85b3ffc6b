//! Output files written whole or not at all: each is written to a temporary
//! name in its own directory and renamed over its final name once complete,
//! so a reader, a signal or a kill at any moment finds the complete file or
//! none (or the previous run's), never a truncated one. A failed write (a
//! full disk, say) removes the temporary file and names the final path.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// The temporary name `path` is written under: hidden, in the same
/// directory (so the rename stays within one file system), and unique to
/// this process.
fn temporary(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Writes `path` with `write` through a buffer, atomically: the bytes go to
/// a temporary file that is renamed to `path` only once `write` succeeded
/// and everything is flushed. On any error the temporary file is removed
/// and `path` is untouched.
///
/// # Errors
///
/// `write`'s error, or the error of creating, flushing or renaming the
/// file; `E` says which path it was (see [`OutFileError`]).
pub fn write_atomically<E: From<OutFileError>>(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> Result<(), E>,
) -> Result<(), E> {
    let tmp = temporary(path);
    let failed = |source: io::Error| {
        let _ = std::fs::remove_file(&tmp);
        E::from(OutFileError {
            path: path.to_owned(),
            source,
        })
    };
    let mut w = BufWriter::new(File::create(&tmp).map_err(failed)?);
    if let Err(e) = write(&mut w) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let file = w.into_inner().map_err(|e| failed(e.into_error()))?;
    file.sync_data().map_err(failed)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(failed)
}

/// [`write_atomically`] of `bytes`.
///
/// # Errors
///
/// As [`write_atomically`].
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<(), OutFileError> {
    write_atomically(path, |w| {
        w.write_all(bytes).map_err(|source| OutFileError {
            path: path.to_owned(),
            source,
        })
    })
}

/// An output file could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {}: {source}", path.display())]
pub struct OutFileError {
    /// The final path.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: io::Error,
}

impl From<OutFileError> for io::Error {
    fn from(e: OutFileError) -> Self {
        io::Error::new(e.source.kind(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "metronome-outfile-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn test_a_written_file_is_whole_and_no_temporary_is_left() {
        let dir = dir();
        let path = dir.join("profile.folded");
        write_bytes(&path, b"a;b 1\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"a;b 1\n");
        assert_eq!(entries(&dir), ["profile.folded"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = dir();
        let path = dir.join("trace.json");
        write_bytes(&path, b"old").unwrap();
        let result: Result<(), OutFileError> = write_atomically(&path, |w| {
            w.write_all(b"half of the new").unwrap();
            Err(OutFileError {
                path: path.clone(),
                source: io::Error::from(io::ErrorKind::StorageFull),
            })
        });
        let error = result.unwrap_err();
        assert_eq!(error.source.kind(), io::ErrorKind::StorageFull);
        assert!(error.to_string().contains("trace.json"), "{error}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(entries(&dir), ["trace.json"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
