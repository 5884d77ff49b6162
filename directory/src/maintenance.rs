//! Durable drains: one file per service, `maintenance/<service>.json` in the data directory.
//!
//! A drain is hard state, like a route: the directory writes it before the call that made it
//! answers, and loads every file at start. The files are a [`DurableMap`], with its guarantees:
//! a write is atomic and fsynced, a crash leaves a service's old drains or its new ones, never
//! a torn mix, and a file that cannot be read back is a start-up error naming it. A service with
//! no drain left has no file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use baker_client::maintenance::Maintenance;
use baker_client::model::ServiceName;

use crate::durable::{DurableMap, StoreError};

/// The folder inside the data directory.
pub const DIR_NAME: &str = "maintenance";

/// Where drains persist.
#[derive(Debug, Clone)]
pub struct MaintenanceFiles {
    dir: PathBuf,
}

impl MaintenanceFiles {
    /// The files under `data` (in `data/maintenance`, created with its parents).
    pub fn open(data: &Path) -> Result<MaintenanceFiles, StoreError> {
        let files = MaintenanceFiles::under(data);
        files.map()?;
        Ok(files)
    }

    /// The files under `data`, whose folder is created by the first write.
    pub fn under(data: &Path) -> MaintenanceFiles {
        MaintenanceFiles {
            dir: data.join(DIR_NAME),
        }
    }

    /// The folder holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn map(&self) -> Result<DurableMap<ServiceName, Maintenance>, StoreError> {
        // The drains' fields are checked by their types as they are read.
        DurableMap::open(&self.dir, "service's drains", |_, drains| Ok(drains))
    }

    /// Every service's drains.
    pub fn load(&self) -> Result<BTreeMap<ServiceName, Maintenance>, StoreError> {
        let mut all = self.map()?.load()?;
        all.retain(|_, drains| !drains.is_empty());
        Ok(all)
    }

    /// Replaces `service`'s stored drains with `drains` (removes its file when it is empty),
    /// atomically and durably.
    pub fn save(&self, service: &ServiceName, drains: &Maintenance) -> Result<(), StoreError> {
        let map = self.map()?;
        if drains.is_empty() {
            map.remove(service).map(|_| ())
        } else {
            map.put(service, drains)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baker_client::maintenance::{Drain, Target};

    #[test]
    fn drains_round_trip_and_an_empty_service_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let files = MaintenanceFiles::open(dir.path()).unwrap();
        assert!(files.load().unwrap().is_empty());
        let web: ServiceName = "web".parse().unwrap();
        let mut drains = Maintenance::default();
        drains.insert(
            Target::Instance("web-1".parse().unwrap()),
            Drain {
                reason: Some("disk swap".parse().unwrap()),
                since: 42,
                origin: "cli from 127.0.0.1".into(),
            },
        );
        files.save(&web, &drains).unwrap();
        assert_eq!(files.load().unwrap(), [(web.clone(), drains)].into());
        files.save(&web, &Maintenance::default()).unwrap();
        assert!(!files.dir().join("web.json").exists());
        assert!(files.load().unwrap().is_empty());
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let files = MaintenanceFiles::open(dir.path()).unwrap();
        std::fs::write(
            files.dir().join("web.json"),
            r#"{"instances":{"a":{"since":1,"origin":"x","reason":"b\nad"}}}"#,
        )
        .unwrap();
        let e = files.load().unwrap_err().to_string();
        assert!(e.contains("web.json") && e.contains("corrupt"), "{e}");
    }
}
