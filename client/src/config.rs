//! One way to read the environment, shared by every Baker daemon.
//!
//! A daemon reads the process's environment once into an [`Environment`] (with
//! `std::env::vars_os`, so no value can make it panic), then parses each of its variables through
//! a [`Reader`]: `reader.parse(ENV_LISTEN, parse_listen)`, with the names and defaults listed in
//! [`vars`]. The reader applies the rules every daemon shares:
//!
//! - a variable set to nothing (or only spaces) counts as unset, so its default applies;
//! - a value that is not valid UTF-8 is a bad variable;
//! - a `BAKER_*` name no Baker program reads is a bad variable, reported with the closest name
//!   the daemon does read (`BAKER_TOKN` … did you mean `BAKER_TOKEN`?);
//! - a `BAKER_*` name of another Baker program (a shared env file) is ignored with a warning
//!   naming that program;
//! - every problem is collected into one [`ConfigErrors`], reported at once, and the daemon
//!   exits 64 ([`EXIT_BAD_CONFIG`]) before opening any socket.
//!
//! [`command_line`] gives every daemon the same `--help` (with its variables and their
//! defaults), `--version`, and exit 64 for any other argument.
//!
//! - [`vars`]: every program's variables (`ENV_*` names, defaults, meanings).
//! - `strays`: the `BAKER_*` names a program does not read, and the closest it does.
//! - `command_line`: `--help`, `--version`, and nothing else.

mod command_line;
mod strays;
pub mod vars;

pub use command_line::{command_line, handle_command_line, variables_help, Invocation};
pub use strays::{strays, Stray};

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::model::printable;
use vars::Program;

/// Exit code for bad configuration or arguments (`EX_USAGE`).
pub const EXIT_BAD_CONFIG: i32 = 64;
/// The prefix of every Baker variable.
pub const PREFIX: &str = "BAKER_";

/// Every problem found in a configuration.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<(String, String)>);

impl ConfigErrors {
    /// Records that `var` is wrong, and why (once: the same problem twice is recorded once).
    pub fn push(&mut self, var: impl Into<String>, message: impl Into<String>) {
        let entry = (var.into(), message.into());
        if !self.0.contains(&entry) {
            self.0.push(entry);
        }
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

/// A process's environment, read once.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    /// The `BAKER_*` variables by name; `None` for a value that is not valid UTF-8.
    baker: BTreeMap<String, Option<String>>,
    /// Every other variable whose name and value are valid UTF-8 (Docker-link variables).
    other: Vec<(String, String)>,
}

impl Environment {
    /// The environment of this process.
    pub fn from_process() -> Self {
        Self::from_os(std::env::vars_os())
    }

    /// The environment made of `vars`, which may hold anything an OS string can.
    pub fn from_os(vars: impl IntoIterator<Item = (OsString, OsString)>) -> Self {
        let mut env = Environment::default();
        for (name, value) in vars {
            let lossy = name.to_string_lossy();
            if lossy.starts_with(PREFIX) {
                env.baker
                    .insert(lossy.into_owned(), value.into_string().ok());
            } else if let (Ok(name), Ok(value)) = (name.into_string(), value.into_string()) {
                env.other.push((name, value));
            }
        }
        env
    }

    /// The environment made of `pairs` of full names and values (tests use this).
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Self {
        Self::from_os(
            pairs
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        )
    }

    /// For tests: every variable of `program` set to a value that is not valid UTF-8, so that a
    /// configuration that reads them all reports each one (and no other).
    pub fn unreadable(program: &Program) -> Self {
        use std::os::unix::ffi::OsStringExt;
        Self::from_os(
            program
                .vars
                .iter()
                .map(|v| (OsString::from(v.name), OsString::from_vec(vec![0xff]))),
        )
    }

    /// The names `errs` reports, sorted and each once, for comparison with a program's list.
    pub fn reported(errs: &ConfigErrors) -> Vec<&str> {
        let mut names: Vec<&str> = errs.0.iter().map(|(v, _)| v.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// The variables whose names do not start with `BAKER_` (Docker-link variables), less any
    /// that is not valid UTF-8.
    pub fn others(&self) -> impl Iterator<Item = (&str, &str)> {
        self.other.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The names of the `BAKER_*` variables.
    pub fn baker_names(&self) -> impl Iterator<Item = &str> {
        self.baker.keys().map(String::as_str)
    }
}

/// Reads one program's variables from an [`Environment`], collecting every problem.
#[derive(Debug)]
pub struct Reader<'e> {
    program: &'static Program,
    env: &'e Environment,
    errs: ConfigErrors,
}

impl<'e> Reader<'e> {
    pub fn new(program: &'static Program, env: &'e Environment) -> Self {
        Reader {
            program,
            env,
            errs: ConfigErrors::default(),
        }
    }

    /// The value of `name`, as set; `None` when unset, empty or only spaces (the default then
    /// applies), or not valid UTF-8 (recorded as a problem).
    pub fn get(&mut self, name: &str) -> Option<&'e str> {
        debug_assert!(
            self.program.reads(name),
            "{name} is not listed as a variable of {} in baker_client::config::vars",
            self.program.name
        );
        match self.env.baker.get(name)? {
            None => {
                self.errs
                    .push(name, "is not valid UTF-8: write the value in UTF-8 text");
                None
            }
            Some(v) if v.trim().is_empty() => None,
            Some(v) => Some(v.as_str()),
        }
    }

    /// Whether `name` has a value (see [`Reader::get`]).
    pub fn is_set(&mut self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Parses the value of `name` (trimmed) with `parse`; `None` when unset or bad, a bad value
    /// being recorded with the value quoted.
    pub fn parse<T, E: fmt::Display>(
        &mut self,
        name: &str,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Option<T> {
        let value = self.get(name)?;
        match parse(value.trim()) {
            Ok(v) => Some(v),
            Err(e) => {
                self.errs
                    .push(name, format!("{e} (got {:?})", printable(value)));
                None
            }
        }
    }

    /// Like [`Reader::parse`] for a secret (a token): a bad value is reported without quoting
    /// it, so it does not end up in logs.
    pub fn parse_secret<T, E: fmt::Display>(
        &mut self,
        name: &str,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Option<T> {
        let value = self.get(name)?;
        match parse(value.trim()) {
            Ok(v) => Some(v),
            Err(e) => {
                self.errs.push(name, format!("{e} (value not shown)"));
                None
            }
        }
    }

    /// Like [`Reader::parse`], and records that `name` is required when it is unset.
    pub fn required<T, E: fmt::Display>(
        &mut self,
        name: &str,
        what: &str,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Option<T> {
        if !self.is_set(name) {
            self.push(name, format!("is required: {what}"));
            return None;
        }
        self.parse(name, parse)
    }

    /// Parses the value of `name` with [`FromStr`], or `default` when unset or bad.
    pub fn value<T: FromStr>(&mut self, name: &str, default: T) -> T
    where
        T::Err: fmt::Display,
    {
        self.parse(name, T::from_str).unwrap_or(default)
    }

    /// Parses a duration (`500ms`, `2s`, `1m`), or `default` when unset or bad.
    pub fn duration(&mut self, name: &str, default: Duration) -> Duration {
        self.parse(name, parse_duration).unwrap_or(default)
    }

    /// Records a problem with `name` found by the caller.
    pub fn push(&mut self, name: &str, message: impl Into<String>) {
        self.errs.push(name, message);
    }

    /// Checks the names of the environment's `BAKER_*` variables against the program's, then
    /// returns `value`, or every problem found. A variable of another Baker program is logged
    /// as a warning and otherwise ignored.
    pub fn finish<T>(self, value: T) -> Result<T, ConfigErrors> {
        self.into_errors().finish(value)
    }

    /// The problems with the values read so far, without checking the names (for a program
    /// whose environment is not only Baker's, such as the CLI in a shell).
    pub fn value_errors(self) -> ConfigErrors {
        self.errs
    }

    /// Checks the names as [`Reader::finish`] does, and returns every problem found (for a
    /// configuration that cannot be built, whose reason is already recorded).
    pub fn into_errors(mut self) -> ConfigErrors {
        for stray in strays(self.program, self.env.baker_names()) {
            match &stray {
                Stray::Unknown { name, .. } => self.errs.push(name, stray.message()),
                Stray::Elsewhere { name, readers, .. } => tracing::warn!(
                    variable = %name,
                    read_by = %readers.join(", "),
                    "ignoring a variable of another Baker program"
                ),
            }
        }
        self.errs
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::ffi::OsStringExt;

    use super::vars::*;
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
        let env = Environment::from_pairs(&[
            ("BAKER_MAX_CONNECTIONS", "x"),
            ("BAKER_REQUEST_TIMEOUT", "2"),
        ]);
        let mut r = Reader::new(&DIRECTORY, &env);
        let a: u32 = r.value(ENV_MAX_CONNECTIONS, 1);
        let d = r.duration(ENV_REQUEST_TIMEOUT, Duration::from_secs(1));
        let ok: u32 = r.value(ENV_LISTEN, 7);
        assert_eq!((a, d, ok), (1, Duration::from_secs(1), 7));
        let errs = r.finish(()).unwrap_err();
        assert_eq!(errs.0.len(), 2);
        let text = errs.to_string();
        assert!(
            text.contains("BAKER_MAX_CONNECTIONS: invalid digit found in string (got \"x\")")
                && text.contains("BAKER_REQUEST_TIMEOUT: must be a duration"),
            "{text}"
        );
    }

    #[test]
    fn a_secret_is_not_quoted_in_errors() {
        let env = Environment::from_pairs(&[("BAKER_TOKEN", "my secret")]);
        let mut r = Reader::new(&DIRECTORY, &env);
        let token = r.parse_secret(ENV_TOKEN, |t| {
            if t.contains(' ') {
                Err("must have no spaces")
            } else {
                Ok(t.to_owned())
            }
        });
        assert_eq!(token, None);
        let text = r.finish(()).unwrap_err().to_string();
        assert!(!text.contains("secret"), "{text}");
        assert!(
            text.ends_with("BAKER_TOKEN: must have no spaces (value not shown)"),
            "{text}"
        );
    }

    #[test]
    fn an_empty_value_is_unset() {
        let env = Environment::from_pairs(&[("BAKER_LISTEN", ""), ("BAKER_DATA", "  ")]);
        let mut r = Reader::new(&DIRECTORY, &env);
        assert_eq!(r.get(ENV_LISTEN), None);
        assert!(!r.is_set(ENV_DATA));
        assert_eq!(r.value(ENV_MAX_CONNECTIONS, 3u32), 3);
        assert!(r.finish(()).is_ok());
    }

    #[test]
    fn a_value_that_is_not_utf8_is_a_bad_variable() {
        let env = Environment::from_os([
            (
                OsString::from("BAKER_TOKEN"),
                OsString::from_vec(b"s3\xffcret".to_vec()),
            ),
            (
                OsString::from("APP_PORT_80_TCP"),
                OsString::from_vec(b"\xfe".to_vec()),
            ),
            (OsString::from("HOME"), OsString::from("/root")),
        ]);
        assert_eq!(env.others().collect::<Vec<_>>(), [("HOME", "/root")]);
        let mut r = Reader::new(&DIRECTORY, &env);
        assert_eq!(r.get(ENV_TOKEN), None);
        assert_eq!(r.get(ENV_TOKEN), None);
        let errs = r.finish(()).unwrap_err();
        assert_eq!(
            errs.0,
            [(
                "BAKER_TOKEN".to_owned(),
                "is not valid UTF-8: write the value in UTF-8 text".to_owned()
            )]
        );
    }

    #[test]
    fn every_program_lists_each_variable_once() {
        for p in PROGRAMS {
            let mut names: Vec<_> = p.vars.iter().map(|v| v.name).collect();
            names.sort();
            names.dedup();
            assert_eq!(names.len(), p.vars.len(), "{}", p.name);
            assert!(names.iter().all(|n| n.starts_with(PREFIX)), "{}", p.name);
        }
    }
}
