//! Every daemon's configuration mistakes, through the real binaries: `--help` and `--version`,
//! arguments refused, misspelt variables, variables of another daemon, values that are not
//! UTF-8, and tokens that cannot be sent.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use baker_client::config::vars;
use baker_tests::{bin, Proc};

const DEADLINE: Duration = Duration::from_secs(20);

/// Every Baker daemon.
const DAEMONS: [&str; 5] = [
    "baker-directory",
    "baker-registrar",
    "baker-ambassador",
    "baker-greeting",
    "baker-greeting-client",
];

/// What one run of a daemon left behind; `code` is `None` when it was still running at the
/// deadline (and was killed).
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `binary args...` with `env` (values as raw bytes) and none of the test's own `BAKER_*`
/// variables, for at most `within`.
async fn run(binary: &str, args: &[&str], env: &[(&str, &[u8])], within: Duration) -> Run {
    let mut cmd = tokio::process::Command::new(bin(binary));
    cmd.args(args).kill_on_drop(true);
    for (k, _) in std::env::vars_os() {
        if k.as_bytes().starts_with(b"BAKER_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, OsStr::from_bytes(v));
    }
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().expect("starting the daemon");
    match tokio::time::timeout(within, child.wait_with_output()).await {
        Ok(out) => {
            let out = out.expect("waiting for the daemon");
            Run {
                code: out.status.code(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        }
        Err(_) => Run {
            code: None,
            stdout: String::new(),
            stderr: format!("{binary} {args:?} was still running after {within:?}"),
        },
    }
}

/// The variables that let each daemon start on loopback, with nothing else around, if it were
/// to start (a daemon that wrongly ignores a mistake must not take a fixed port or Docker).
fn harmless(binary: &str, data: &OsStr) -> Vec<(&'static str, Vec<u8>)> {
    let v = |s: &str| s.as_bytes().to_vec();
    match binary {
        "baker-directory" => vec![
            ("BAKER_LISTEN", v("127.0.0.1:0")),
            ("BAKER_DOCKER", v("off")),
            ("BAKER_DATA", data.as_bytes().to_vec()),
        ],
        "baker-registrar" => vec![
            ("BAKER_DIRECTORY", v("http://127.0.0.1:9")),
            ("BAKER_SERVICE", v("emitter")),
            ("BAKER_TARGET", v("http://127.0.0.1:9")),
        ],
        "baker-ambassador" => vec![
            ("BAKER_DIRECTORY", v("http://127.0.0.1:9")),
            ("BAKER_ROUTES", v("emitter")),
            ("BAKER_HTTP_PORT", v("1")),
            ("BAKER_ADMIN", v("off")),
            ("BAKER_BIND", v("127.0.0.1")),
            ("BAKER_RUN_DIR", data.as_bytes().to_vec()),
        ],
        "baker-greeting" => vec![("BAKER_LISTEN", v("127.0.0.1:0"))],
        _ => vec![("GREETING_PORT_8000_TCP", v("tcp://127.0.0.1:9"))],
    }
}

async fn run_with(binary: &str, args: &[&str], extra: &[(&str, &[u8])]) -> Run {
    let data = tempfile::tempdir().expect("temp dir");
    let mut env = harmless(binary, data.path().as_os_str());
    for (k, v) in extra {
        env.retain(|(key, _)| key != k);
        env.push((k, v.to_vec()));
    }
    let env: Vec<(&str, &[u8])> = env.iter().map(|(k, v)| (*k, v.as_slice())).collect();
    run(binary, args, &env, DEADLINE).await
}

#[tokio::test]
async fn every_daemon_answers_version_and_help() {
    for binary in DAEMONS {
        let version = run(binary, &["--version"], &[], DEADLINE).await;
        assert_eq!(version.code, Some(0), "{version:#?}");
        assert_eq!(
            version.stdout,
            format!("{binary} {}\n", env!("CARGO_PKG_VERSION")),
            "{version:#?}"
        );

        let help = run(binary, &["--help"], &[], DEADLINE).await;
        assert_eq!(help.code, Some(0), "{help:#?}");
        assert!(help.stdout.contains("Usage: "), "{help:#?}");
        assert!(help.stdout.contains("Variables"), "{help:#?}");
        assert!(help.stdout.contains("BAKER_"), "{help:#?}");
        assert!(help.stdout.contains("[default: "), "{help:#?}");
        assert!(help.stdout.contains("exits 64"), "{help:#?}");
    }
    let help = run("baker-directory", &["-h"], &[], DEADLINE).await;
    assert!(
        help.stdout.contains("BAKER_LISTEN") && help.stdout.contains("[default: 0.0.0.0:7700]"),
        "{help:#?}"
    );
}

#[tokio::test]
async fn every_daemon_refuses_arguments_with_64() {
    for binary in DAEMONS {
        let r = run_with(binary, &["baker", "services"], &[]).await;
        assert_eq!(r.code, Some(64), "{r:#?}");
        assert!(r.stderr.contains("unexpected argument 'baker'"), "{r:#?}");
        assert!(r.stderr.contains("--help"), "{r:#?}");
    }
}

#[tokio::test]
async fn a_misspelt_variable_is_fatal_and_named_with_the_right_name() {
    for (binary, typo, right) in [
        ("baker-directory", "BAKER_TOKN", "BAKER_TOKEN"),
        ("baker-registrar", "BAKER_VERISON", "BAKER_VERSION"),
        ("baker-ambassador", "BAKER_DIRECTROY", "BAKER_DIRECTORY"),
        ("baker-greeting", "BAKER_INSTANCES", "BAKER_INSTANCE"),
        ("baker-greeting-client", "BAKER_CONUT", "BAKER_COUNT"),
    ] {
        let r = run_with(binary, &[], &[(typo, b"2")]).await;
        assert_eq!(r.code, Some(64), "{r:#?}");
        let line = format!("{typo}: is not a variable of {binary}; did you mean {right}?");
        assert!(r.stderr.contains(&line), "{line:?} not in {r:#?}");
        // One format everywhere: the program's name, then what is wrong, not a log line.
        assert!(
            r.stderr.starts_with(&format!("{binary}: ")),
            "{binary} reports bad configuration otherwise: {r:#?}"
        );
    }
}

#[tokio::test]
async fn a_variable_of_another_daemon_is_a_warning_naming_it() {
    let mut greeting = Proc::baker(
        "greeting",
        "baker-greeting",
        &[
            ("BAKER_LISTEN", "127.0.0.1:0"),
            ("BAKER_SERVICE", "greeting"),
        ],
    );
    greeting.listen_addr().await;
    let log = greeting.log_text();
    assert!(
        log.contains("ignoring a variable of another Baker program")
            && log.contains("variable=BAKER_SERVICE")
            && log.contains("read_by=baker-registrar"),
        "{log}"
    );
    greeting.term();
    let status = greeting.wait_exit(DEADLINE).await;
    assert_eq!(status.code(), Some(0), "{}", greeting.log_text());
}

#[tokio::test]
async fn a_value_that_is_not_utf8_is_a_bad_variable_not_a_panic() {
    let bad: &[u8] = b"emit\xffter";
    let r = run_with("baker-registrar", &[], &[("BAKER_SERVICE", bad)]).await;
    assert_eq!(r.code, Some(64), "{r:#?}");
    assert!(
        r.stderr.contains("BAKER_SERVICE: is not valid UTF-8"),
        "{r:#?}"
    );

    // Another variable that is not UTF-8 is none of Baker's business: the registrar goes on to
    // report the real problem (here a misspelt variable) instead of panicking.
    let r = run_with(
        "baker-registrar",
        &[],
        &[("JUNK", bad), ("BAKER_INTERVALL", b"1s")],
    )
    .await;
    assert_eq!(r.code, Some(64), "{r:#?}");
    assert!(r.stderr.contains("did you mean BAKER_INTERVAL?"), "{r:#?}");

    // The greeting client reads link variables: one that is not UTF-8 is skipped.
    let r = run_with(
        "baker-greeting-client",
        &[],
        &[("GREETING_PORT_8000_TCP", bad)],
    )
    .await;
    assert_eq!(r.code, Some(64), "{r:#?}");
    assert!(
        r.stderr.contains("GREETING_PORT_8000_TCP is not set"),
        "{r:#?}"
    );

    for (binary, var) in [
        ("baker-directory", "BAKER_LISTEN"),
        ("baker-ambassador", "BAKER_ROUTES"),
        ("baker-greeting", "BAKER_VERSION"),
        ("baker-greeting-client", "BAKER_INTERVAL"),
    ] {
        let r = run_with(binary, &[], &[(var, bad)]).await;
        assert_eq!(r.code, Some(64), "{r:#?}");
        let line = format!("{var}: is not valid UTF-8");
        assert!(r.stderr.contains(&line), "{line:?} not in {r:#?}");
    }
}

#[tokio::test]
async fn a_token_that_cannot_be_sent_is_refused_at_start() {
    for binary in ["baker-registrar", "baker-ambassador", "baker-directory"] {
        let r = run_with(binary, &[], &[("BAKER_TOKEN", b"s3\x07cret")]).await;
        assert_eq!(r.code, Some(64), "{r:#?}");
        assert!(
            r.stderr
                .contains("BAKER_TOKEN: must be printable ASCII without spaces"),
            "{r:#?}"
        );
        assert!(!r.stderr.contains("cret"), "the token is shown: {r:#?}");
        // The whole header value, as a curl example would show it.
        let r = run_with(binary, &[], &[("BAKER_TOKEN", b"Bearer s3cret")]).await;
        assert_eq!(r.code, Some(64), "{r:#?}");
        assert!(
            r.stderr.contains(
                "BAKER_TOKEN: must be the token alone, without the `Bearer ` prefix (Baker adds \
                 it)"
            ),
            "{r:#?}"
        );
        assert!(!r.stderr.contains("cret"), "the token is shown: {r:#?}");
    }
}

#[tokio::test]
async fn the_cli_refuses_a_value_that_is_not_utf8_and_warns_of_a_misspelt_name() {
    let r = run(
        "baker",
        &["services"],
        &[("BAKER_TOKEN", b"s3\xffcret")],
        DEADLINE,
    )
    .await;
    assert_eq!(r.code, Some(64), "{r:#?}");
    assert_eq!(
        r.stderr, "error: BAKER_TOKEN is not valid UTF-8: write the value in UTF-8 text\n",
        "{r:#?}"
    );

    // A shell's environment is not only Baker's: a misspelt name is a warning, not a failure.
    let r = run(
        "baker",
        &["links", "a=b:1"],
        &[("BAKER_TOKN", b"s3cret")],
        DEADLINE,
    )
    .await;
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert_eq!(
        r.stderr, "warning: BAKER_TOKN is not a variable of baker; did you mean BAKER_TOKEN?\n",
        "{r:#?}"
    );
    assert!(r.stdout.starts_with("A_PORT=tcp://b:1\n"), "{r:#?}");
}

/// Every variable the compose files substitute is known as theirs: a daemon that finds one
/// exported in its environment ignores it with a warning instead of refusing to start.
#[test]
fn every_variable_of_the_compose_files_is_known_as_theirs() {
    let uses = regex::Regex::new(r"\$\{(BAKER_[A-Z0-9_]+)").expect("a regex");
    let dir = baker_tests::docker::repo_root().join("compose");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("reading compose/") {
        let path = entry.expect("a compose/ entry").path();
        let text = std::fs::read_to_string(&path).expect("reading a compose file");
        for name in uses.captures_iter(&text).map(|c| c[1].to_owned()) {
            seen += 1;
            let readers = vars::readers_of(&name, &vars::DIRECTORY);
            assert!(
                readers.contains(&"the compose files"),
                "{}: {name} is not listed with the compose files' variables in \
                 client/src/config/vars.rs (TOOLS), so a daemon that sees it exported refuses \
                 to start",
                path.display()
            );
        }
    }
    assert!(seen > 0, "no BAKER_ variable found in {}", dir.display());
}
