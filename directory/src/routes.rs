//! Durable routes: `routes.json` in the data directory, written atomically.
//!
//! Routes are the directory's only hard state. A write goes to `routes.json.tmp`, is fsynced,
//! renamed over `routes.json`, and the directory itself is fsynced, so after a crash the file
//! holds either the old or the new routes, never a torn mix. A file that cannot be read back is
//! a start-up error: routes are never dropped silently.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use baker_client::model::{printable, validate_route, Route, ServiceName};
use serde::{Deserialize, Serialize};

/// The file name inside the data directory.
pub const FILE_NAME: &str = "routes.json";

/// What can go wrong loading or saving routes.
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
    #[error("{path} is corrupt ({reason}); fix or remove it to start with no routes")]
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
}

/// The file's layout: `{"routes": {"emitter": {"1": 90, "2": 10}}}`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesFile {
    routes: BTreeMap<String, BTreeMap<String, u64>>,
}

/// Where routes persist.
#[derive(Debug, Clone)]
pub struct RouteStore {
    dir: PathBuf,
}

impl RouteStore {
    /// A store in `dir`, created (with parents) if it does not exist.
    pub fn open(dir: &Path) -> Result<RouteStore, StoreError> {
        fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
        Ok(RouteStore {
            dir: dir.to_owned(),
        })
    }

    /// Path of `routes.json`.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// Reads the routes; a missing file means none, anything unreadable is an error.
    pub fn load(&self) -> Result<BTreeMap<ServiceName, Route>, StoreError> {
        let path = self.path();
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        let corrupt = |reason: String| StoreError::Corrupt {
            path: path.clone(),
            reason,
        };
        let file: RoutesFile = serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
        let mut routes = BTreeMap::new();
        for (service, splits) in file.routes {
            let service: ServiceName = service
                .parse()
                .map_err(|e| corrupt(format!("route of {:?}: {e}", printable(&service))))?;
            let route = validate_route(&splits).map_err(|errs| {
                let list: Vec<String> = errs.iter().map(ToString::to_string).collect();
                corrupt(format!("route of {service}: {}", list.join("; ")))
            })?;
            routes.insert(service, route);
        }
        Ok(routes)
    }

    /// Replaces the stored routes with `routes`, atomically and durably.
    pub fn save(&self, routes: &BTreeMap<ServiceName, Route>) -> Result<(), StoreError> {
        let path = self.path();
        let tmp = self.dir.join(format!("{FILE_NAME}.tmp"));
        let file = RoutesFile {
            routes: routes
                .iter()
                .map(|(s, r)| {
                    (
                        s.to_string(),
                        r.iter()
                            .map(|(v, p)| (v.to_string(), u64::from(*p)))
                            .collect(),
                    )
                })
                .collect(),
        };
        let mut text = serde_json::to_vec_pretty(&file).map_err(|e| StoreError::Write {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        text.push(b'\n');
        // Each step's error names the file it failed on: the temporary file, the rename onto
        // `routes.json`, or the data directory's own sync.
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
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(on(&self.dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(pairs: &[(&str, u8)]) -> Route {
        pairs
            .iter()
            .map(|(v, p)| (v.parse().unwrap(), *p))
            .collect()
    }

    #[test]
    fn missing_file_is_no_routes_and_dir_is_created() {
        let tmp = tempfile::tempdir().unwrap();
        let store = RouteStore::open(&tmp.path().join("a/b")).unwrap();
        assert!(store.load().unwrap().is_empty());
        assert!(tmp.path().join("a/b").is_dir());
    }

    #[test]
    fn save_then_load_round_trips_and_leaves_no_temp_file() {
        let tmp = tempfile::tempdir().unwrap();
        let store = RouteStore::open(tmp.path()).unwrap();
        let mut routes = BTreeMap::new();
        routes.insert("emitter".parse().unwrap(), route(&[("1", 90), ("2", 10)]));
        routes.insert("transform".parse().unwrap(), route(&[("3", 100)]));
        store.save(&routes).unwrap();
        assert_eq!(store.load().unwrap(), routes);
        routes.remove("emitter");
        store.save(&routes).unwrap();
        assert_eq!(store.load().unwrap(), routes);
        let names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [FILE_NAME]);
    }

    #[test]
    fn corrupt_files_are_errors_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let store = RouteStore::open(tmp.path()).unwrap();
        for bad in [
            "",
            "{",
            "{\"routes\": {\"emitter\": {\"1\": 90, \"2\": 20}}}",
            "{\"routes\": {\"Emitter\": {\"1\": 100}}}",
            "{\"routes\": {\"emitter\": {\"B#\": 100}}}",
            "{\"routes\": {}, \"extra\": 1}",
            "[]",
        ] {
            fs::write(store.path(), bad).unwrap();
            let err = store.load().unwrap_err();
            assert!(matches!(err, StoreError::Corrupt { .. }), "{bad}: {err}");
            assert!(err.to_string().contains("routes.json"), "{err}");
        }
    }

    #[test]
    fn write_errors_name_the_file_that_failed() {
        let tmp = tempfile::tempdir().unwrap();
        let store = RouteStore::open(tmp.path()).unwrap();
        let routes: BTreeMap<_, _> = [("a".parse().unwrap(), route(&[("1", 100)]))].into();
        // The temporary file cannot be created: a directory is in its way.
        fs::create_dir(tmp.path().join("routes.json.tmp")).unwrap();
        let err = store.save(&routes).unwrap_err();
        assert!(
            matches!(&err, StoreError::Write { path, .. } if path.ends_with("routes.json.tmp")),
            "{err:?}"
        );
        assert!(err.to_string().ends_with("routes.json.tmp"), "{err}");
        fs::remove_dir(tmp.path().join("routes.json.tmp")).unwrap();
        // The rename cannot replace routes.json: a non-empty directory is in its way.
        fs::create_dir_all(tmp.path().join("routes.json/x")).unwrap();
        let err = store.save(&routes).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("cannot rename ")
                && text.contains("routes.json.tmp to ")
                && text.ends_with("routes.json"),
            "{text}"
        );
    }

    #[test]
    fn a_stale_temp_file_is_ignored_and_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let store = RouteStore::open(tmp.path()).unwrap();
        fs::write(tmp.path().join("routes.json.tmp"), "garbage").unwrap();
        assert!(store.load().unwrap().is_empty());
        let routes: BTreeMap<_, _> = [("a".parse().unwrap(), route(&[("1", 100)]))].into();
        store.save(&routes).unwrap();
        assert_eq!(store.load().unwrap(), routes);
        assert!(!tmp.path().join("routes.json.tmp").exists());
    }
}
