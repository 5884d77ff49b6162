//! The tokens' secrets the tests give the processes they run, and the check that no process
//! ever prints one.
//!
//! Every plain-text secret a test hands out is known here: the fixed ones in [`SECRETS`], a
//! tokens file's through [`token_line`] (which registers the secret as it writes its line),
//! any other through [`register`]; and [`Proc`](crate::Proc) registers the values of
//! `BAKER_TOKEN` and `BAKER_WATCH_TOKEN` it starts a process with. When a `Proc` is dropped
//! (unless its test is failing already), every line its process printed is checked against
//! them, and a line that shows one fails the test, naming the process and the line (the secret
//! masked). [`crate::cli::baker`] checks the CLI's output the same way. A secret shorter than
//! [`MIN_LEN`] is not looked for: it would be found by chance.

use std::collections::BTreeSet;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// The plain-text secrets the tests use as they are, in `BAKER_TOKEN`, `BAKER_WATCH_TOKEN` or
/// a bearer header.
pub const SECRETS: &[&str] = &[
    "s3cret",
    "s3cret-token",
    "s3cret-ui",
    "main-token",
    "watch-token",
    "watch-only",
];

/// Shortest secret looked for in the logs.
pub const MIN_LEN: usize = 6;

/// Secrets registered while the tests run, beside [`SECRETS`].
static REGISTERED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Makes `secret` one the logs are checked for.
pub fn register(secret: &str) {
    if secret.len() >= MIN_LEN {
        REGISTERED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(secret.to_owned());
    }
}

/// The line of a tokens file (`BAKER_TOKENS`) for the token `name` of `role` over `scope`
/// whose secret is `secret`, which is registered.
pub fn token_line(name: &str, role: &str, scope: &str, secret: &str) -> String {
    register(secret);
    let hash = hex::encode(Sha256::digest(secret.as_bytes()));
    format!("{name} {role} {scope} sha256:{hash}\n")
}

/// Every secret the logs are checked for.
pub fn all() -> Vec<String> {
    let registered = REGISTERED.lock().unwrap_or_else(|p| p.into_inner());
    SECRETS
        .iter()
        .map(|s| (*s).to_owned())
        .chain(registered.iter().cloned())
        .filter(|s| s.len() >= MIN_LEN)
        .collect()
}

/// The first of `lines` that shows one of `secrets`: its number (from 1) and the line with
/// every secret masked.
pub fn leak_in<S: AsRef<str>>(secrets: &[String], lines: &[S]) -> Option<(usize, String)> {
    lines.iter().enumerate().find_map(|(n, line)| {
        let line = line.as_ref();
        secrets.iter().any(|s| line.contains(s.as_str())).then(|| {
            let masked = secrets
                .iter()
                .fold(line.to_owned(), |l, s| l.replace(s.as_str(), "<SECRET>"));
            (n + 1, masked)
        })
    })
}

/// Panics when `output`, what the process `name` printed, shows a registered secret: the
/// message names the process and the line.
pub fn check(name: &str, output: &[impl AsRef<str>]) {
    if let Some((n, line)) = leak_in(&all(), output) {
        panic!("{name} printed a token's secret, on line {n} of its output (masked here): {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_with_a_secret_is_found_and_masked() {
        let secrets = vec!["reg-secret-1".to_owned(), "s3cret".to_owned()];
        let log = [
            "INFO listening on 127.0.0.1:7700",
            "DEBUG header authorization: Bearer reg-secret-1",
            "INFO s3cret again",
        ];
        assert_eq!(
            leak_in(&secrets, &log),
            Some((2, "DEBUG header authorization: Bearer <SECRET>".to_owned()))
        );
        assert_eq!(leak_in(&secrets, &log[..1]), None);
    }

    #[test]
    fn registered_secrets_are_checked_and_short_ones_ignored() {
        let line = token_line("t", "read", "*", "a-registered-secret");
        assert!(line.starts_with("t read * sha256:"), "{line}");
        assert!(!line.contains("a-registered-secret"));
        register("abc");
        let all = all();
        assert!(all.iter().any(|s| s == "a-registered-secret"));
        assert!(!all.iter().any(|s| s == "abc"), "too short to look for");
        let caught = std::panic::catch_unwind(|| {
            check("directory", &["fine", "token a-registered-secret"]);
        })
        .expect_err("a leak fails");
        let message = caught.downcast_ref::<String>().cloned().unwrap_or_default();
        assert_eq!(
            message,
            "directory printed a token's secret, on line 2 of its output (masked here): token \
             <SECRET>"
        );
        check("directory", &["fine"]);
    }
}
