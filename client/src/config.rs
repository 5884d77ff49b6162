//! Helpers every binary uses to read its `BAKER_*` variables and report all bad ones at once.
//!
//! Each binary reads its variables with `envy::prefixed("BAKER_")` into a struct of
//! `Option<String>` (which cannot fail), then parses every field through a [`ConfigErrors`]
//! collector, so a user with three typos sees three messages in one run, and exits 64.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Exit code for bad configuration (`EX_USAGE`).
pub const EXIT_BAD_CONFIG: i32 = 64;

/// Every problem found in a configuration.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<(String, String)>);

impl ConfigErrors {
    /// Records that `var` is wrong, and why.
    pub fn push(&mut self, var: impl Into<String>, message: impl Into<String>) {
        self.0.push((var.into(), message.into()));
    }

    /// Parses `value` of `var` with `parse`, or records the error and returns `None`.
    pub fn parse<T, E: fmt::Display>(
        &mut self,
        var: &str,
        value: Option<&str>,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Option<T> {
        let value = value?;
        match parse(value.trim()) {
            Ok(v) => Some(v),
            Err(e) => {
                self.push(
                    var,
                    format!("{e} (got {:?})", crate::model::printable(value)),
                );
                None
            }
        }
    }

    /// Parses `value` with [`FromStr`], falling back to `default` when unset or invalid.
    pub fn value<T: FromStr>(&mut self, var: &str, value: Option<&str>, default: T) -> T
    where
        T::Err: fmt::Display,
    {
        self.parse(var, value, T::from_str).unwrap_or(default)
    }

    /// Parses a duration (`500ms`, `2s`, `1m`), falling back to `default`.
    pub fn duration(&mut self, var: &str, value: Option<&str>, default: Duration) -> Duration {
        self.parse(var, value, parse_duration).unwrap_or(default)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(value)` when nothing was recorded, else `Err(self)`.
    pub fn finish<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration ({} problem{}):",
            self.0.len(),
            if self.0.len() == 1 { "" } else { "s" }
        )?;
        for (var, msg) in &self.0 {
            write!(f, "\n  {var}: {msg}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Parses a duration written as `500ms`, `2s`, `1m`, `1m30s`; a bare number is rejected.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let msg = || "must be a duration such as 500ms, 2s or 1m".to_string();
    let d = humantime::parse_duration(value.trim()).map_err(|_| msg())?;
    if d.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(d)
}

/// Reads the process's `BAKER_*` variables into `T` (a struct of `Option<String>` fields).
///
/// Values that are not valid Unicode are reported by name.
pub fn read_env<T: serde::de::DeserializeOwned>() -> Result<T, ConfigErrors> {
    read_env_from(std::env::vars_os().filter_map(|(k, v)| {
        let k = k.into_string().ok()?;
        Some((k, v.into_string().unwrap_or_else(|_| "\u{fffd}".into())))
    }))
}

/// Like [`read_env`], from an explicit list of variables (tests use this).
pub fn read_env_from<T: serde::de::DeserializeOwned>(
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigErrors> {
    envy::prefixed("BAKER_").from_iter(vars).map_err(|e| {
        let mut errs = ConfigErrors::default();
        errs.push("BAKER_*", e.to_string());
        errs
    })
}

/// Reads `T` from `(name, value)` pairs, for tests and tools: variables given without their
/// `BAKER_` prefix (`("LISTEN", "127.0.0.1:0")` is `BAKER_LISTEN`).
pub fn read_env_pairs<T: serde::de::DeserializeOwned>(
    pairs: &[(&str, &str)],
) -> Result<T, ConfigErrors> {
    read_env_from(
        pairs
            .iter()
            .map(|(k, v)| (format!("BAKER_{k}"), (*v).to_owned())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        for bad in ["", "2", "s", "2x", "-1s", "0s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn collects_every_error() {
        let mut errs = ConfigErrors::default();
        let a: u32 = errs.value("BAKER_A", Some("x"), 1);
        let d = errs.duration("BAKER_D", Some("2"), Duration::from_secs(1));
        let ok: u32 = errs.value("BAKER_OK", None, 7);
        assert_eq!((a, d, ok), (1, Duration::from_secs(1), 7));
        assert_eq!(errs.0.len(), 2);
        let text = errs.to_string();
        assert!(
            text.contains("BAKER_A") && text.contains("BAKER_D"),
            "{text}"
        );
    }
}
