//! Running the `baker` CLI as a user would, with a deadline, and reading what it printed.

use std::time::Duration;

use crate::bin;

/// Longest a `baker` command may run in a test.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// What one run of `baker` left behind.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Asserts the command succeeded.
    pub fn ok(self) -> Run {
        assert_eq!(self.code, 0, "baker failed: {self:#?}");
        self
    }

    /// Stdout, decoded as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not the expected JSON ({e}): {self:#?}"))
    }
}

/// Runs `baker args...` with `BAKER_DIRECTORY=directory` (and `BAKER_TOKEN` when given) and
/// none of the test's own `BAKER_*` variables. What it printed must show no token's secret
/// ([`crate::secrets`]).
pub async fn baker(directory: &str, token: Option<&str>, args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(bin("baker"));
    cmd.args(args).kill_on_drop(true);
    for (k, _) in std::env::vars() {
        if k.starts_with("BAKER_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("BAKER_DIRECTORY", directory);
    if let Some(t) = token {
        crate::secrets::register(t);
        cmd.env("BAKER_TOKEN", t);
    }
    let out = tokio::time::timeout(DEADLINE, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("baker {args:?} did not finish within {DEADLINE:?}"))
        .expect("running baker");
    let run = Run {
        code: out.status.code().expect("baker exited by a signal"),
        stdout: String::from_utf8(out.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8(out.stderr).expect("stderr is UTF-8"),
    };
    let printed: Vec<&str> = run.stdout.lines().chain(run.stderr.lines()).collect();
    crate::secrets::check(&format!("baker {}", args.join(" ")), &printed);
    run
}
