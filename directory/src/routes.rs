//! Durable routes: one file per service, `routes/<service>.json` in the data directory.
//!
//! Routes are hard state. Each lives in its own file, written by a [`DurableMap`]: to
//! `<service>.json.tmp`, fsynced, renamed over `<service>.json`, and the directory fsynced, so a
//! route change writes one small file whatever the number of routes, and after a crash each file
//! holds either the old or the new route, never a torn mix. Clearing a route removes its file,
//! durably too. A file that cannot be read back is a start-up error naming it: routes are never
//! dropped silently.
//!
//! A file holds the route as the API shows it (`{"1": 90, "2": 10}`), checked at load as the
//! API checks a route it is sent.
//!
//! Earlier builds kept every route in one file, `routes.json`. [`RouteStore::load`] moves such a
//! file's routes into `routes/` first ([`RouteStore::migration`]): it writes each route's file
//! durably, removes the files of services `routes.json` has no route for (left by a build that
//! ran meanwhile), and only then renames `routes.json` to `routes.json.migrated`. Every step is
//! computed from what is on disk, so a crash at any point leaves `routes.json` in place and the
//! next start does what remains, no more.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use baker_client::model::{printable, validate_route, Route, ServiceName};
use serde::Deserialize;

use crate::durable::DurableMap;
pub use crate::durable::StoreError;

/// The sub-directory of the data directory that holds the routes.
pub const DIR_NAME: &str = "routes";
/// The single file earlier builds kept every route in, moved into [`DIR_NAME`] at start.
pub const LEGACY_FILE: &str = "routes.json";
/// What [`LEGACY_FILE`] is renamed to once its routes are in [`DIR_NAME`]: kept, never read.
pub const MIGRATED_FILE: &str = "routes.json.migrated";

/// The layout of [`LEGACY_FILE`]: `{"routes": {"emitter": {"1": 90, "2": 10}}}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyFile {
    routes: BTreeMap<String, BTreeMap<String, u64>>,
}

/// One step of moving [`LEGACY_FILE`] into [`DIR_NAME`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Write this route's file.
    Put(ServiceName, Route),
    /// Remove the file of a service that `routes.json` has no route for.
    Remove(ServiceName),
    /// Rename `routes.json` to `routes.json.migrated`: the move is done.
    Retire,
}

/// Checks a route read from disk as the API checks one it is sent.
fn check_route(_service: &ServiceName, route: Route) -> Result<Route, String> {
    let splits = route
        .iter()
        .map(|(v, p)| (v.to_string(), u64::from(*p)))
        .collect();
    validate_route(&splits).map_err(|errs| {
        errs.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    })
}

/// Where routes persist.
#[derive(Debug, Clone)]
pub struct RouteStore {
    data: PathBuf,
    map: DurableMap<ServiceName, Route>,
}

impl RouteStore {
    /// The routes of the data directory `data`; both are created (with parents) if missing.
    pub fn open(data: &Path) -> Result<RouteStore, StoreError> {
        Ok(RouteStore {
            data: data.to_owned(),
            map: DurableMap::open(&data.join(DIR_NAME), "route", check_route)?,
        })
    }

    /// The directory holding one file per route.
    pub fn dir(&self) -> &Path {
        self.map.dir()
    }

    /// The data directory the routes' folder is in.
    pub fn data(&self) -> &Path {
        &self.data
    }

    /// The file of `service`'s route.
    pub fn path_of(&self, service: &ServiceName) -> PathBuf {
        // A service name (`^[a-z0-9][a-z0-9._-]{0,62}$`) is always a safe file name.
        self.map
            .path_of(service)
            .expect("a service name names a file")
    }

    /// Path of the file earlier builds used.
    pub fn legacy_path(&self) -> PathBuf {
        self.data.join(LEGACY_FILE)
    }

    /// Every route, after moving a `routes.json` of an earlier build into `routes/`. Anything
    /// unreadable is an error naming its file.
    pub fn load(&self) -> Result<BTreeMap<ServiceName, Route>, StoreError> {
        let steps = self.migration()?;
        if !steps.is_empty() {
            tracing::info!(
                "moving the routes of {} into {}",
                self.legacy_path().display(),
                self.dir().display()
            );
            for step in steps {
                self.apply(step)?;
            }
        }
        self.map.load()
    }

    /// Sets `service`'s route, durably.
    pub fn put(&self, service: &ServiceName, route: &Route) -> Result<(), StoreError> {
        self.map.put(service, route)
    }

    /// Clears `service`'s route, durably.
    pub fn clear(&self, service: &ServiceName) -> Result<(), StoreError> {
        self.map.remove(service).map(|_| ())
    }

    /// What remains to move `routes.json` into `routes/`: nothing when there is no
    /// `routes.json`; else the writes and removals that make `routes/` hold exactly its routes,
    /// then [`Step::Retire`]. A corrupt `routes.json` is an error, and nothing is moved.
    pub fn migration(&self) -> Result<Vec<Step>, StoreError> {
        let Some(legacy) = self.read_legacy()? else {
            return Ok(Vec::new());
        };
        let present = self.map.load()?;
        let mut steps: Vec<Step> = legacy
            .iter()
            .filter(|(service, route)| present.get(*service) != Some(*route))
            .map(|(service, route)| Step::Put(service.clone(), route.clone()))
            .collect();
        steps.extend(
            present
                .keys()
                .filter(|service| !legacy.contains_key(*service))
                .map(|service| Step::Remove(service.clone())),
        );
        steps.push(Step::Retire);
        Ok(steps)
    }

    /// Carries out one step of the migration, durably.
    pub fn apply(&self, step: Step) -> Result<(), StoreError> {
        match step {
            Step::Put(service, route) => self.put(&service, &route),
            Step::Remove(service) => self.clear(&service),
            Step::Retire => {
                let (from, to) = (self.legacy_path(), self.data.join(MIGRATED_FILE));
                fs::rename(&from, &to).map_err(|source| StoreError::Rename {
                    from: from.clone(),
                    to: to.clone(),
                    source,
                })?;
                File::open(&self.data)
                    .and_then(|d| d.sync_all())
                    .map_err(|source| StoreError::Write {
                        path: self.data.clone(),
                        source,
                    })
            }
        }
    }

    /// The routes of `routes.json`, if there is one.
    fn read_legacy(&self) -> Result<Option<BTreeMap<ServiceName, Route>>, StoreError> {
        let path = self.legacy_path();
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        let corrupt = |reason: String| StoreError::Corrupt {
            path: path.clone(),
            reason,
        };
        let file: LegacyFile = serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
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
        Ok(Some(routes))
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

    fn svc(name: &str) -> ServiceName {
        name.parse().unwrap()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// `routes.json` exactly as the build before one file per route wrote it.
    const LEGACY: &str = r#"{
  "routes": {
    "emitter": {
      "1": 90,
      "2": 10
    },
    "transform": {
      "3": 100
    }
  }
}
"#;

    fn legacy_routes() -> BTreeMap<ServiceName, Route> {
        [
            (svc("emitter"), route(&[("1", 90), ("2", 10)])),
            (svc("transform"), route(&[("3", 100)])),
        ]
        .into()
    }

    #[test]
    fn no_routes_at_first_and_the_directories_are_created() {
        let tmp = tempfile::tempdir().unwrap();
        let store = RouteStore::open(&tmp.path().join("a/b")).unwrap();
        assert!(store.load().unwrap().is_empty());
        assert!(tmp.path().join("a/b/routes").is_dir());
    }

    #[test]
    fn each_route_is_a_file_of_its_own_as_the_api_shows_it() {
        let tmp = tempfile::tempdir().unwrap();
        let store = RouteStore::open(tmp.path()).unwrap();
        store
            .put(&svc("emitter"), &route(&[("1", 90), ("2", 10)]))
            .unwrap();
        store.put(&svc("transform"), &route(&[("3", 100)])).unwrap();
        assert_eq!(store.load().unwrap(), legacy_routes());
        let text = fs::read_to_string(tmp.path().join("routes/emitter.json")).unwrap();
        assert_eq!(text, "{\n  \"1\": 90,\n  \"2\": 10\n}\n");
        assert_eq!(
            store.path_of(&svc("emitter")),
            tmp.path().join("routes/emitter.json")
        );
        store.clear(&svc("emitter")).unwrap();
        store.clear(&svc("emitter")).unwrap();
        assert_eq!(names(&tmp.path().join("routes")), ["transform.json"]);
        assert_eq!(
            RouteStore::open(tmp.path()).unwrap().load().unwrap().len(),
            1
        );
    }

    #[test]
    fn a_route_file_that_is_no_valid_route_stops_the_load() {
        for (file, text) in [
            ("emitter.json", "{\"1\": 90, \"2\": 20}"),
            ("emitter.json", "{\"B#\": 100}"),
            ("emitter.json", "{}"),
            ("emitter.json", "{\"1\": 300}"),
            ("Emitter.json", "{\"1\": 100}"),
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let store = RouteStore::open(tmp.path()).unwrap();
            fs::write(tmp.path().join("routes").join(file), text).unwrap();
            let err = store.load().unwrap_err();
            assert!(matches!(err, StoreError::Corrupt { .. }), "{text}: {err}");
            assert!(
                err.to_string()
                    .contains(&format!("routes/{file} is corrupt")),
                "{err}"
            );
        }
    }

    #[test]
    fn a_routes_json_of_an_earlier_build_is_moved_into_one_file_per_route() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join(LEGACY_FILE), LEGACY).unwrap();
        let store = RouteStore::open(tmp.path()).unwrap();
        assert_eq!(store.load().unwrap(), legacy_routes());
        assert_eq!(
            names(&tmp.path().join("routes")),
            ["emitter.json", "transform.json"]
        );
        assert_eq!(names(tmp.path()), ["routes", "routes.json.migrated"]);
        assert_eq!(
            fs::read_to_string(tmp.path().join(MIGRATED_FILE)).unwrap(),
            LEGACY
        );
        // Done once: a change made since is not undone by the next start.
        store.clear(&svc("transform")).unwrap();
        assert!(store.migration().unwrap().is_empty());
        let again = RouteStore::open(tmp.path()).unwrap().load().unwrap();
        assert_eq!(again.keys().collect::<Vec<_>>(), [&svc("emitter")]);
    }

    #[test]
    fn a_crash_at_any_point_of_the_migration_loses_nothing_and_applies_nothing_twice() {
        let fresh = || {
            let tmp = tempfile::tempdir().unwrap();
            fs::write(tmp.path().join(LEGACY_FILE), LEGACY).unwrap();
            // A route file left by a later build that ran before an earlier one wrote this
            // routes.json: routes.json is the newer truth, so it goes.
            let store = RouteStore::open(tmp.path()).unwrap();
            store.put(&svc("stale"), &route(&[("9", 100)])).unwrap();
            tmp
        };
        let steps = RouteStore::open(fresh().path())
            .unwrap()
            .migration()
            .unwrap();
        assert_eq!(
            steps,
            [
                Step::Put(svc("emitter"), route(&[("1", 90), ("2", 10)])),
                Step::Put(svc("transform"), route(&[("3", 100)])),
                Step::Remove(svc("stale")),
                Step::Retire,
            ]
        );
        for done in 0..=steps.len() {
            for torn in [false, true] {
                let tmp = fresh();
                let store = RouteStore::open(tmp.path()).unwrap();
                // The crash comes after `done` steps, maybe in the middle of the next write.
                for step in steps.iter().take(done) {
                    store.apply(step.clone()).unwrap();
                }
                if torn {
                    if let Some(Step::Put(service, _)) = steps.get(done) {
                        let tmp_file = store.dir().join(format!("{service}.json.tmp"));
                        fs::write(tmp_file, "{\"1\": 9").unwrap();
                    }
                }
                // The next start ends with the routes of routes.json, each written once more
                // at most, and nothing of the stale one.
                let restarted = RouteStore::open(tmp.path()).unwrap();
                let remaining = restarted.migration().unwrap();
                assert_eq!(remaining.len(), steps.len() - done, "after {done} steps");
                assert_eq!(restarted.load().unwrap(), legacy_routes(), "after {done}");
                assert_eq!(
                    names(&tmp.path().join("routes")),
                    ["emitter.json", "transform.json"]
                );
                assert!(!tmp.path().join(LEGACY_FILE).exists());
                assert!(restarted.migration().unwrap().is_empty());
            }
        }
    }

    #[test]
    fn a_corrupt_routes_json_stops_the_start_and_moves_nothing() {
        for bad in [
            "",
            "{",
            "{\"routes\": {\"emitter\": {\"1\": 90, \"2\": 20}}}",
            "{\"routes\": {\"Emitter\": {\"1\": 100}}}",
            "{\"routes\": {\"emitter\": {\"B#\": 100}}}",
            "{\"routes\": {}, \"extra\": 1}",
            "[]",
        ] {
            let tmp = tempfile::tempdir().unwrap();
            fs::write(tmp.path().join(LEGACY_FILE), bad).unwrap();
            let store = RouteStore::open(tmp.path()).unwrap();
            let err = store.load().unwrap_err();
            assert!(matches!(err, StoreError::Corrupt { .. }), "{bad}: {err}");
            assert!(err.to_string().contains("routes.json is corrupt"), "{err}");
            assert_eq!(
                fs::read_to_string(tmp.path().join(LEGACY_FILE)).unwrap(),
                bad
            );
            assert!(names(&tmp.path().join("routes")).is_empty());
        }
    }
}
