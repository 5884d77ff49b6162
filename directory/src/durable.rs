//! Hard state on disk, one small file per key: `<dir>/<key>.json`.
//!
//! A [`DurableMap`] keeps a map from names (service names, say) to values of any serde type in
//! one sub-directory of the data directory, each entry in a file of its own. Changing one entry
//! writes that entry's file alone, so its cost does not grow with the number of entries.
//! Routes live in `routes/` this way ([`crate::routes`]); any other kind of hard state gets its
//! own sub-directory and its own `DurableMap` with the same guarantees:
//!
//! - [`DurableMap::put`] writes `<key>.json.tmp`, fsyncs it, renames it over `<key>.json`, and
//!   fsyncs the directory: after a crash at any point the entry holds its old value or its new
//!   one, never a torn mix, and once `put` returns the new value survives a power cut.
//! - [`DurableMap::remove`] unlinks `<key>.json` and fsyncs the directory: once it returns the
//!   entry stays gone.
//! - [`DurableMap::load`] reads every entry at start. A leftover `*.tmp` (a write a crash cut
//!   short, never acknowledged) is removed. An entry that cannot be read, parsed, or passed by
//!   the map's check is an error naming its file: hard state is never dropped silently.
//!
//! Keys become file names, so a key is written only if its text is a safe file name: lowercase
//! ASCII letters, digits, `.`, `_` and `-`, not starting with `.`, at most
//! [`MAX_KEY_LEN`] bytes. No key can name a path outside the map's directory (`..`, `a/b`), a
//! hidden file, or a temporary file; a key that could would be refused with
//! [`StoreError::BadKey`] before anything is written. Service names always qualify.
//!
//! Writes of different keys may run at once; writes of one key must be serialized by the
//! caller (they share the key's temporary file). The calls block on the disk: from async code,
//! run them in `tokio::task::spawn_blocking`.
//!
//! ```no_run
//! use baker_client::model::ServiceName;
//! use baker_directory::durable::DurableMap;
//!
//! # fn main() -> Result<(), baker_directory::durable::StoreError> {
//! // Entries of a u32 per service in `<data>/counters/`, each checked as it is loaded.
//! let map: DurableMap<ServiceName, u32> = DurableMap::open(
//!     std::path::Path::new("/var/lib/baker/counters"),
//!     "counter",
//!     |_service, n| if n > 0 { Ok(n) } else { Err("must be positive".into()) },
//! )?;
//! let all = map.load()?;
//! let emitter: ServiceName = "emitter".parse().expect("a valid name");
//! map.put(&emitter, &7)?;
//! map.remove(&emitter)?;
//! # let _ = all;
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::fmt::Display;
use std::fs::{self, File};
use std::io::{self, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The extension of an entry's file.
pub const EXTENSION: &str = ".json";
/// The extension of a write in progress.
pub const TMP_EXTENSION: &str = ".json.tmp";
/// Longest key, in bytes, that makes a file name.
pub const MAX_KEY_LEN: usize = 200;

/// What can go wrong loading or saving hard state. Each error names the file or directory it
/// failed on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the data directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is corrupt ({reason}); fix it, or remove it to start without it")]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot rename {from} to {to}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{key:?} cannot name a file in {dir}: {reason}")]
    BadKey {
        key: String,
        dir: PathBuf,
        reason: &'static str,
    },
}

/// Why `text` is not a safe file stem, if it is not.
fn unsafe_stem(text: &str) -> Option<&'static str> {
    if text.is_empty() {
        return Some("it is empty");
    }
    if text.len() > MAX_KEY_LEN {
        return Some("it is too long");
    }
    if text.starts_with('.') {
        return Some("it starts with '.'");
    }
    if !text
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Some("it may hold only a-z, 0-9, '.', '_' and '-'");
    }
    None
}

/// Hard state: a map from keys to values, one durable file per entry in one directory.
///
/// `K` is the key (its `Display` text is the file name, and `FromStr` reads it back); `V` is
/// any value serde can write as JSON. See the [module](self) for the guarantees.
pub struct DurableMap<K, V> {
    dir: PathBuf,
    what: &'static str,
    check: fn(&K, V) -> Result<V, String>,
    _entries: PhantomData<fn() -> (K, V)>,
}

impl<K, V> Clone for DurableMap<K, V> {
    fn clone(&self) -> Self {
        DurableMap {
            dir: self.dir.clone(),
            what: self.what,
            check: self.check,
            _entries: PhantomData,
        }
    }
}

impl<K, V> std::fmt::Debug for DurableMap<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableMap")
            .field("dir", &self.dir)
            .field("what", &self.what)
            .finish()
    }
}

impl<K, V> DurableMap<K, V>
where
    K: Display + FromStr + Ord,
    K::Err: Display,
    V: Serialize + DeserializeOwned,
{
    /// A map kept in `dir`, created (with its parents, and made durable in its parent) if
    /// missing. `what` names one entry in messages (`route`); `check` validates each value as
    /// it is loaded (a value written by hand, or by an older build), returning it (possibly
    /// normalized) or what is wrong.
    pub fn open(
        dir: &Path,
        what: &'static str,
        check: fn(&K, V) -> Result<V, String>,
    ) -> Result<DurableMap<K, V>, StoreError> {
        let existed = dir.is_dir();
        fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
        if !existed {
            // The new directory's own entry must be durable too, or a power cut could take it,
            // and every entry written in it, away.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                File::open(parent)
                    .and_then(|d| d.sync_all())
                    .map_err(|source| StoreError::Write {
                        path: parent.to_owned(),
                        source,
                    })?;
            }
        }
        Ok(DurableMap {
            dir: dir.to_owned(),
            what,
            check,
            _entries: PhantomData,
        })
    }

    /// The directory holding the entries.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of `key`'s entry, or why `key` cannot name one.
    pub fn path_of(&self, key: &K) -> Result<PathBuf, StoreError> {
        Ok(self.dir.join(format!("{}{EXTENSION}", self.stem(key)?)))
    }

    fn stem(&self, key: &K) -> Result<String, StoreError> {
        let text = key.to_string();
        match unsafe_stem(&text) {
            None => Ok(text),
            Some(reason) => Err(StoreError::BadKey {
                key: text,
                dir: self.dir.clone(),
                reason,
            }),
        }
    }

    /// Every entry. Removes leftover temporary files; an entry that cannot be read, parsed or
    /// checked is an error naming its file. Files of other names are left alone.
    pub fn load(&self) -> Result<BTreeMap<K, V>, StoreError> {
        let read_err = |source| StoreError::Read {
            path: self.dir.clone(),
            source,
        };
        let mut entries = BTreeMap::new();
        let mut removed = false;
        for entry in fs::read_dir(&self.dir).map_err(read_err)? {
            let entry = entry.map_err(read_err)?;
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                tracing::warn!(path = %path.display(), "ignoring a file whose name is not UTF-8");
                continue;
            };
            if name.ends_with(TMP_EXTENSION) {
                // A write that a crash cut short: it was never acknowledged.
                fs::remove_file(&path).map_err(|source| StoreError::Remove {
                    path: path.clone(),
                    source,
                })?;
                tracing::info!(path = %path.display(), "removed an unfinished write");
                removed = true;
                continue;
            }
            let Some(stem) = name.strip_suffix(EXTENSION) else {
                tracing::warn!(path = %path.display(), "ignoring a file that is not a {}", self.what);
                continue;
            };
            let (key, value) = self.read_entry(&path, stem)?;
            entries.insert(key, value);
        }
        if removed {
            self.sync_dir()?;
        }
        Ok(entries)
    }

    fn read_entry(&self, path: &Path, stem: &str) -> Result<(K, V), StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        if let Some(reason) = unsafe_stem(stem) {
            return Err(corrupt(format!("its name is no {}'s: {reason}", self.what)));
        }
        let key: K = stem
            .parse()
            .map_err(|e| corrupt(format!("its name is no {}'s: {e}", self.what)))?;
        let bytes = fs::read(path).map_err(|source| StoreError::Read {
            path: path.to_owned(),
            source,
        })?;
        let value: V = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        let value = (self.check)(&key, value)
            .map_err(|reason| corrupt(format!("{} of {key}: {reason}", self.what)))?;
        Ok((key, value))
    }

    /// Sets `key`'s entry to `value`, atomically and durably.
    pub fn put(&self, key: &K, value: &V) -> Result<(), StoreError> {
        let stem = self.stem(key)?;
        let path = self.dir.join(format!("{stem}{EXTENSION}"));
        let tmp = self.dir.join(format!("{stem}{TMP_EXTENSION}"));
        let mut text = serde_json::to_vec_pretty(value).map_err(|e| StoreError::Write {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        text.push(b'\n');
        let on = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Write { path, source }
        };
        let mut f = File::create(&tmp).map_err(on(&tmp))?;
        f.write_all(&text).map_err(on(&tmp))?;
        f.sync_all().map_err(on(&tmp))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(|source| StoreError::Rename {
            from: tmp.clone(),
            to: path.clone(),
            source,
        })?;
        self.sync_dir()
    }

    /// Removes `key`'s entry durably; `false` if it had none.
    pub fn remove(&self, key: &K) -> Result<bool, StoreError> {
        let path = self.path_of(key)?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(source) => return Err(StoreError::Remove { path, source }),
        }
        self.sync_dir()?;
        Ok(true)
    }

    /// Makes the directory's entries (their creation, rename or removal) durable.
    fn sync_dir(&self) -> Result<(), StoreError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| StoreError::Write {
                path: self.dir.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Entry {
        weight: u32,
    }

    fn positive(_: &String, e: Entry) -> Result<Entry, String> {
        if e.weight == 0 {
            return Err("weight must be positive".into());
        }
        Ok(e)
    }

    fn map(dir: &Path) -> DurableMap<String, Entry> {
        DurableMap::open(dir, "entry", positive).unwrap()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn entries_round_trip_one_file_each_and_the_directory_is_created() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/entries");
        let m = map(&dir);
        assert!(m.load().unwrap().is_empty());
        m.put(&"emitter".into(), &Entry { weight: 1 }).unwrap();
        m.put(&"transform".into(), &Entry { weight: 2 }).unwrap();
        m.put(&"emitter".into(), &Entry { weight: 3 }).unwrap();
        assert_eq!(names(&dir), ["emitter.json", "transform.json"]);
        let loaded = map(&dir).load().unwrap();
        assert_eq!(
            loaded,
            [
                ("emitter".into(), Entry { weight: 3 }),
                ("transform".into(), Entry { weight: 2 })
            ]
            .into()
        );
        assert!(m.remove(&"emitter".into()).unwrap());
        assert!(!m.remove(&"emitter".into()).unwrap());
        assert_eq!(names(&dir), ["transform.json"]);
        assert_eq!(map(&dir).load().unwrap().len(), 1);
    }

    #[test]
    fn a_write_changes_its_own_file_only() {
        let tmp = tempfile::tempdir().unwrap();
        let m = map(tmp.path());
        m.put(&"a".into(), &Entry { weight: 1 }).unwrap();
        let other = tmp.path().join("a.json");
        let before = fs::metadata(&other).unwrap().modified().unwrap();
        let inode = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&other).unwrap());
        for w in 1..20 {
            m.put(&"b".into(), &Entry { weight: w }).unwrap();
        }
        m.remove(&"b".into()).unwrap();
        let after = fs::metadata(&other).unwrap();
        assert_eq!(after.modified().unwrap(), before);
        assert_eq!(std::os::unix::fs::MetadataExt::ino(&after), inode);
    }

    #[test]
    fn keys_that_could_leave_the_directory_are_refused_and_write_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("entries");
        let m = map(&dir);
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "../../etc/passwd",
            "a/b",
            "/abs",
            ".hidden",
            "a\\b",
            "A",
            "x\0y",
            "é",
        ] {
            let err = m.put(&bad.to_owned(), &Entry { weight: 1 }).unwrap_err();
            assert!(matches!(err, StoreError::BadKey { .. }), "{bad:?}: {err}");
            assert!(err.to_string().contains("cannot name a file"), "{err}");
            assert!(
                matches!(m.remove(&bad.to_owned()), Err(StoreError::BadKey { .. })),
                "{bad:?}"
            );
        }
        let long = "a".repeat(MAX_KEY_LEN + 1);
        assert!(matches!(
            m.put(&long, &Entry { weight: 1 }),
            Err(StoreError::BadKey { .. })
        ));
        assert!(names(&dir).is_empty());
        assert_eq!(names(tmp.path()), ["entries"]);
        // Every service name is a good key.
        let s: baker_client::model::ServiceName = "a.b_c-9".parse().unwrap();
        assert!(unsafe_stem(s.as_str()).is_none());
    }

    #[test]
    fn corrupt_entries_are_errors_naming_their_file() {
        for (file, text, needle) in [
            ("a.json", "", "EOF"),
            ("a.json", "{\"weight\": ", "EOF"),
            (
                "a.json",
                "{\"weight\": 0}",
                "entry of a: weight must be positive",
            ),
            ("a.json", "[]", "expected struct Entry"),
            (".a.json", "{\"weight\": 1}", "starts with '.'"),
            ("A.json", "{\"weight\": 1}", "may hold only"),
        ] {
            let tmp = tempfile::tempdir().unwrap();
            fs::write(tmp.path().join(file), text).unwrap();
            let err = map(tmp.path()).load().unwrap_err();
            assert!(matches!(err, StoreError::Corrupt { .. }), "{text}: {err}");
            let message = err.to_string();
            assert!(
                message.contains(&format!("/{file} is corrupt")) && message.contains(needle),
                "{message}"
            );
            // Nothing was changed.
            assert_eq!(fs::read_to_string(tmp.path().join(file)).unwrap(), text);
        }
    }

    #[test]
    fn leftover_temporary_files_are_removed_and_other_files_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let m = map(tmp.path());
        m.put(&"a".into(), &Entry { weight: 1 }).unwrap();
        // A crash in the middle of a write of `a` and of a first write of `b`.
        fs::write(tmp.path().join("a.json.tmp"), "{\"wei").unwrap();
        fs::write(tmp.path().join("b.json.tmp"), "").unwrap();
        fs::write(tmp.path().join("README"), "notes").unwrap();
        let loaded = m.load().unwrap();
        assert_eq!(loaded, [("a".into(), Entry { weight: 1 })].into());
        assert_eq!(names(tmp.path()), ["README", "a.json"]);
    }

    #[test]
    fn write_errors_name_the_file_that_failed() {
        let tmp = tempfile::tempdir().unwrap();
        let m = map(tmp.path());
        // The temporary file cannot be created: a directory is in its way.
        fs::create_dir(tmp.path().join("a.json.tmp")).unwrap();
        let err = m.put(&"a".into(), &Entry { weight: 1 }).unwrap_err();
        assert!(
            matches!(&err, StoreError::Write { path, .. } if path.ends_with("a.json.tmp")),
            "{err:?}"
        );
        fs::remove_dir(tmp.path().join("a.json.tmp")).unwrap();
        // The rename cannot replace a.json: a non-empty directory is in its way.
        fs::create_dir_all(tmp.path().join("a.json/x")).unwrap();
        let err = m.put(&"a".into(), &Entry { weight: 1 }).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("cannot rename ")
                && text.contains("a.json.tmp to ")
                && text.ends_with("a.json"),
            "{text}"
        );
        let err = m.remove(&"a".into()).unwrap_err();
        assert!(
            matches!(&err, StoreError::Remove { path, .. } if path.ends_with("a.json")),
            "{err:?}"
        );
    }
}
