//! The docs' shell examples, run as written: each Markdown file's marked blocks (see
//! `baker_tests::doc` for the markers) run in order in one shell, with the workspace's binaries
//! first on `PATH`, from the repository's root, and what they print is compared with what the
//! file quotes. A doc that no longer tells the truth fails here.
//!
//! Each file's shell gets its own process namespace (every process it starts ends with the test)
//! and, unless its examples reach ports Docker publishes on the host, its own network namespace,
//! so its fixed ports (`127.0.0.1:7700`, ...) collide with nothing. Files that drive Docker run
//! one at a time (nextest's `docker-host` group), and every container, network and volume they
//! created is removed at the end.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use baker_tests::doc::{self, Step};
use baker_tests::docker::{docker, repo_root, require_images};
use baker_tests::{bin, require, Needs};

/// Longest a foreground command may take (the quick start's image build included).
const COMMAND_DEADLINE: Duration = Duration::from_secs(300);
/// Longest the lines quoted for a background process may take to appear.
const LOG_DEADLINE: Duration = Duration::from_secs(120);
const DONE: &str = "__baker_doc_step_done__";

struct Background {
    pgid: String,
    log: PathBuf,
    positions: HashMap<String, usize>,
}

/// One bash for a whole file, fed step by step on its stdin.
struct Shell {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    dir: tempfile::TempDir,
    /// Background processes by name: process group id in the shell, log file, and where the
    /// lines quoted so far were found.
    bg: HashMap<String, Background>,
}

impl Shell {
    /// `isolated`: its own network namespace; `docker`: the doc drives Docker, so the
    /// engine's socket stays in sight (other docs see an empty /run).
    fn start(isolated: bool, docker: bool) -> Shell {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let bin_dir = bin("baker").parent().expect("bin dir").to_path_buf();
        let mut cmd = if isolated && !docker {
            // Its own mount namespace too, with an empty /run: a directory started by the
            // doc finds no Docker socket, so containers that other tests label meanwhile
            // never show up in what the doc quotes.
            let mut c = Command::new("unshare");
            c.args([
                "--net",
                "--mount",
                "--pid",
                "--fork",
                "--mount-proc",
                "--kill-child",
                "bash",
                "-c",
                "mount -t tmpfs -o mode=755 baker-docs /run && exec bash --noprofile --norc",
            ]);
            c
        } else if isolated {
            let mut c = Command::new("unshare");
            c.args([
                "--net",
                "--pid",
                "--fork",
                "--mount-proc",
                "--kill-child",
                "bash",
            ]);
            c
        } else {
            let mut c = Command::new("unshare");
            c.args(["--pid", "--fork", "--mount-proc", "--kill-child", "bash"]);
            c
        };
        cmd.args(["--noprofile", "--norc"])
            .current_dir(repo_root())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, _) in std::env::vars() {
            if k.starts_with("BAKER_") || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
        let path = std::env::var("PATH").unwrap_or_default();
        cmd.env("PATH", format!("{}:{path}", bin_dir.display()))
            .env("NO_COLOR", "1")
            // docker-compose v1 is Python: unbuffered, its output reaches the log as a terminal
            // would show it.
            .env("PYTHONUNBUFFERED", "1");
        let mut child = cmd
            .spawn()
            .expect("starting bash under unshare (util-linux)");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut shell = Shell {
            child,
            stdin,
            lines,
            dir,
            bg: HashMap::new(),
        };
        // Job control: each background process leads its own group, which signals reach whole.
        let setup = format!(
            "set -m\n__status=0\n__out={}\n",
            shell.dir.path().join("out").display()
        );
        shell.send(&setup);
        let (code, out) = shell.run(if isolated {
            "ip link set lo up"
        } else {
            "true"
        });
        assert_eq!(code, 0, "setting up the doc shell failed: {out}");
        shell
    }

    fn send(&mut self, text: &str) {
        self.stdin
            .write_all(text.as_bytes())
            .and_then(|()| self.stdin.flush())
            .expect("writing to the doc shell");
    }

    /// Waits for the line the shell prints after a step, returning its number.
    fn done(&mut self, what: &str) -> i32 {
        let deadline = Instant::now() + COMMAND_DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(n) = line.strip_prefix(DONE) {
                        return n.trim().parse().expect("a number after the marker");
                    }
                }
                Err(_) => panic!("{what} did not finish within {COMMAND_DEADLINE:?}"),
            }
        }
    }

    /// Runs `command` in the shell (so `export` and `cd` carry over), returning its exit code
    /// and everything it printed.
    fn run(&mut self, command: &str) -> (i32, String) {
        self.send(&format!(
            "{{ (exit $__status); {command}\n}} >\"$__out\" 2>&1 </dev/null; __status=$?; \
             printf '\\n{DONE} %d\\n' $__status\n"
        ));
        let code = self.done(command);
        let out = std::fs::read_to_string(self.dir.path().join("out")).unwrap_or_default();
        (code, out)
    }

    /// Runs a script: like [`Shell::run`], but any command of it that fails (as `set -e` would
    /// see it) makes the status non-zero, without ending the shell.
    fn script(&mut self, script: &str) -> (i32, String) {
        let (code, out) = self.run(&format!(
            "__failed=0; trap '__failed=$?' ERR\n{script}\ntrap - ERR; (exit $__failed)"
        ));
        (code, out)
    }

    /// Starts `command` in the background as `name`.
    fn background(&mut self, name: &str, command: &str) {
        let log = self.dir.path().join(format!("{name}.log"));
        self.send(&format!(
            "{{ {command}\n}} >{} 2>&1 </dev/null &\nprintf '\\n{DONE} %d\\n' \"$!\"\n",
            log.display()
        ));
        let pid = self.done(command);
        self.bg.insert(
            name.to_owned(),
            Background {
                pgid: pid.to_string(),
                log,
                positions: HashMap::new(),
            },
        );
    }

    /// Sends a signal to a background process, through the shell (its pid namespace). The
    /// process is the child of the subshell that leads its group; after a signal that stops,
    /// waits until every process of the group (its own children too) has exited.
    fn signal(&mut self, name: &str, signal: &str) {
        let pgid = self
            .bg
            .get(name)
            .map(|b| b.pgid.clone())
            .unwrap_or_else(|| {
                panic!("no background process {name} to signal: start it with `run bg={name}`")
            });
        let wait = if matches!(signal, "TERM" | "INT" | "QUIT" | "KILL") {
            format!(" && while kill -0 -- -{pgid} 2>/dev/null; do sleep 0.05; done")
        } else {
            String::new()
        };
        let (code, out) = self.run(&format!("pkill -{signal} -P {pgid}{wait}"));
        assert_eq!(code, 0, "signalling {name} ({signal}) failed: {out}");
    }

    /// Waits until the quoted lines appear in `name`'s log after those already matched.
    fn expect_log(
        &mut self,
        file: &Path,
        line: usize,
        name: &str,
        quoted: &[String],
    ) -> Result<(), String> {
        let deadline = Instant::now() + LOG_DEADLINE;
        let Some((log, pgid)) = self.bg.get(name).map(|b| (b.log.clone(), b.pgid.clone())) else {
            panic!("no background process {name}: start it with `run bg={name}`")
        };
        let mut polls = 0u32;
        let mut gone = false;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let positions = &mut self.bg.get_mut(name).expect("known").positions;
            let missing = match doc::find_in_log(quoted, &lines, positions) {
                Ok(()) => return Ok(()),
                Err(missing) => missing,
            };
            let why = if gone {
                "before it exited".to_owned()
            } else if Instant::now() > deadline {
                format!("within {LOG_DEADLINE:?}")
            } else {
                std::thread::sleep(Duration::from_millis(100));
                polls += 1;
                // Once a second: has it exited? Then one more look at its log decides.
                if polls % 10 == 0 {
                    gone = self.run(&format!("kill -0 -- -{pgid} 2>/dev/null")).0 != 0;
                }
                continue;
            };
            return Err(format!(
                "{}:{line}: {name} did not print the quoted line\n  {missing}\n(normalised: {})\n\
                 {why}; its output so far:\n{text}",
                file.display(),
                doc::normalize(missing)
            ));
        }
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        // The shell is PID 1 of its namespace: when it goes, every process it started goes.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What exists on the engine, to remove what a doc created: the ids of containers, networks
/// and volumes, leaving out those of the other Docker tests (`baker-t-...`, `bakert...`), which
/// remove their own and may run meanwhile in another process.
fn docker_state() -> [BTreeSet<String>; 3] {
    let list = |args: &[&str]| -> BTreeSet<String> {
        String::from_utf8_lossy(&docker(args).stdout)
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(_, name)| !name.starts_with("baker-t-") && !name.starts_with("bakert"))
            .map(|(id, _)| id.to_owned())
            .collect()
    };
    [
        list(&["ps", "-a", "--no-trunc", "--format", "{{.ID}} {{.Names}}"]),
        list(&[
            "network",
            "ls",
            "--no-trunc",
            "--format",
            "{{.ID}} {{.Name}}",
        ]),
        list(&["volume", "ls", "--format", "{{.Name}} {{.Name}}"]),
    ]
}

/// Removes the containers, networks and volumes created since `before`.
struct DockerCleanup {
    before: [BTreeSet<String>; 3],
}

impl Drop for DockerCleanup {
    fn drop(&mut self) {
        let now = docker_state();
        let new =
            |i: usize| -> Vec<String> { now[i].difference(&self.before[i]).cloned().collect() };
        for (i, args) in [
            ["rm", "-f", "-v"].as_slice(),
            ["network", "rm"].as_slice(),
            ["volume", "rm", "-f"].as_slice(),
        ]
        .into_iter()
        .enumerate()
        {
            let items = new(i);
            if !items.is_empty() {
                let mut all: Vec<&str> = args.to_vec();
                all.extend(items.iter().map(String::as_str));
                let _ = docker(&all);
            }
        }
    }
}

/// Runs every marked block of `file` (relative to the repository's root).
fn run_doc(file: &str, isolated: bool, docker: bool) {
    let path = repo_root().join(file);
    let markdown = std::fs::read_to_string(&path).expect("reading the doc");
    let steps = doc::steps(&markdown).unwrap_or_else(|e| panic!("{file}: {e}"));
    assert!(!steps.is_empty(), "{file} has no runnable block");
    let mut shell = Shell::start(isolated, docker);
    let echo = std::env::var_os("BAKER_TEST_ECHO").is_some();
    // Outputs that differ are all reported at the end, so one run shows every place to fix.
    let mut wrong = Vec::new();
    let mut fixes = Vec::new();
    // A quoted log line that never came stops the file: what follows depends on it.
    let mut stopped = None;
    for step in &steps {
        let line = step.line();
        if echo {
            eprintln!("--- {file}:{line}: {step:?}");
        }
        match step {
            Step::Command {
                command,
                output,
                exit,
                ..
            } => {
                let (code, out) = shell.run(command);
                if echo {
                    eprintln!("{out}[exit {code}]");
                }
                let fits = doc::output_matches(output, &out) && exit.is_none_or(|e| e == code);
                if !fits {
                    fixes.push((line, out.clone()));
                    wrong.push(format!(
                        "{file}:{line}: `{command}` printed (exit {code}):\n{out}\n--- but the \
                         doc quotes{}:\n{}\n--- normalised, the output was:\n{}\n",
                        exit.map(|e| format!(" (exit {e})")).unwrap_or_default(),
                        output.join("\n"),
                        out.lines()
                            .map(doc::normalize)
                            .collect::<Vec<_>>()
                            .join("\n"),
                    ));
                }
            }
            Step::Script { script, output, .. } => {
                let (code, out) = shell.script(script);
                if echo {
                    eprintln!("{out}[exit {code}]");
                }
                assert_eq!(
                    code, 0,
                    "{file}:{line}: the script failed:\n{script}\n---\n{out}"
                );
                if let Some(quoted) = output {
                    if !doc::output_matches(quoted, &out) {
                        wrong.push(format!(
                            "{file}:{line}: the script printed:\n{out}\n--- but the doc \
                             quotes:\n{}\n",
                            quoted.join("\n")
                        ));
                    }
                }
            }
            Step::Background {
                name,
                command,
                output,
                ..
            } => {
                shell.background(name, command);
                if let Err(e) = shell.expect_log(&path, line, name, output) {
                    stopped = Some(e);
                    break;
                }
            }
            Step::Log {
                name,
                signal,
                output,
                ..
            } => {
                if let Some(sig) = signal {
                    shell.signal(name, sig);
                }
                if let Err(e) = shell.expect_log(&path, line, name, output) {
                    stopped = Some(e);
                    break;
                }
            }
        }
    }
    if std::env::var_os("BAKER_DOCS_UPDATE").is_some() && !fixes.is_empty() {
        let updated = rewrite_outputs(&markdown, &fixes);
        std::fs::write(&path, updated).expect("rewriting the doc");
        eprintln!(
            "BAKER_DOCS_UPDATE: rewrote {} output(s) in {file}",
            fixes.len()
        );
    }
    if let Some(e) = stopped {
        wrong.push(e);
    }
    assert!(
        wrong.is_empty(),
        "{} example(s) of {file} print something else than the doc says (BAKER_DOCS_UPDATE=1 \
         writes what they printed into the doc, for review):\n\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// The doc with the quoted output of the transcript commands at `fixes` (their 1-based line,
/// what they printed) replaced by what they printed; `[exit N]` lines and blank lines after
/// the output stay.
fn rewrite_outputs(markdown: &str, fixes: &[(usize, String)]) -> String {
    let mut lines: Vec<String> = markdown.lines().map(str::to_owned).collect();
    let mut fixes = fixes.to_vec();
    fixes.sort_by_key(|f| std::cmp::Reverse(f.0));
    for (line, out) in fixes {
        let first = line - 1;
        let indent: String = lines[first]
            .chars()
            .take_while(|c| c.is_whitespace())
            .collect();
        let mut start = first;
        while lines[start].ends_with('\\') {
            start += 1;
        }
        start += 1;
        let mut end = start;
        while end < lines.len() {
            let t = lines[end].trim_start();
            if t.starts_with("$ ") || t.starts_with("```") {
                break;
            }
            end += 1;
        }
        let mut keep = end;
        while keep > start && lines[keep - 1].trim().is_empty() {
            keep -= 1;
        }
        if keep > start && lines[keep - 1].trim().starts_with("[exit ") {
            keep -= 1;
            while keep > start && lines[keep - 1].trim().is_empty() {
                keep -= 1;
            }
        }
        let new: Vec<String> = out
            .trim_end()
            .lines()
            .map(|l| format!("{indent}{}", l.trim_end()))
            .collect();
        lines.splice(start..keep, new);
    }
    lines.join("\n") + "\n"
}

/// A doc whose examples run only host processes.
fn host_doc(file: &str, needs_haproxy: bool) {
    if needs_haproxy && !require(Needs::Haproxy) {
        return;
    }
    run_doc(file, true, false);
}

/// A doc whose examples drive Docker; `publishes` when they reach published ports, which only
/// the host's network namespace sees.
fn docker_doc(file: &str, publishes: bool) {
    if !require_images() || !require(Needs::Haproxy) {
        return;
    }
    let _cleanup = DockerCleanup {
        before: docker_state(),
    };
    run_doc(file, !publishes, true);
}

#[test]
fn readme() {
    docker_doc("README.md", true);
}

#[test]
fn docker_md() {
    docker_doc("docs/docker.md", true);
}

#[test]
fn ha_md() {
    docker_doc("docs/ha.md", true);
}

#[test]
fn registrar_md() {
    docker_doc("docs/registrar.md", false);
}

#[test]
fn directory_md() {
    host_doc("docs/directory.md", false);
}

#[test]
fn ambassador_md() {
    host_doc("docs/ambassador.md", true);
}

#[test]
fn cli_md() {
    host_doc("docs/cli.md", false);
}

#[test]
fn greeting_md() {
    host_doc("docs/greeting.md", false);
}

/// Every Markdown file of `docs/` either has its test above or no shell example at all.
#[test]
fn every_doc_is_covered() {
    let tested = [
        "ambassador.md",
        "cli.md",
        "directory.md",
        "docker.md",
        "greeting.md",
        "ha.md",
        "registrar.md",
    ];
    let dir = repo_root().join("docs");
    for entry in std::fs::read_dir(&dir).expect("reading docs/") {
        let path = entry.expect("a docs/ entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if !name.ends_with(".md") || tested.contains(&name) {
            continue;
        }
        let markdown = std::fs::read_to_string(&path).expect("reading a doc");
        match doc::steps(&markdown) {
            Ok(steps) => assert!(
                steps.is_empty(),
                "docs/{name} has runnable examples but no test in tests/tests/docs.rs: add one"
            ),
            Err(e) => panic!("docs/{name}: {e}"),
        }
    }
}

/// The default each Markdown table row gives a variable: the cell after a cell that is exactly
/// `` `BAKER_X` ``, without backticks, and numbers without their thousands separators.
fn documented_defaults(markdown: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for line in markdown.lines().filter(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        for pair in cells.windows(2) {
            let Some(name) = pair[0]
                .strip_prefix('`')
                .and_then(|c| c.strip_suffix('`'))
                .filter(|n| n.starts_with("BAKER_") && !n.contains('`'))
            else {
                continue;
            };
            let mut default = pair[1].replace('`', "");
            if default.chars().all(|c| c.is_ascii_digit() || c == ',') {
                default.retain(|c| c != ',');
            }
            found.push((name.to_owned(), default));
        }
    }
    found
}

/// The part of `markdown` from the heading `from` to the next heading of the same level.
fn section<'a>(markdown: &'a str, from: &str) -> &'a str {
    let start = markdown
        .find(&format!("\n{from}"))
        .unwrap_or_else(|| panic!("no heading {from:?}"));
    let level = from.split(' ').next().unwrap_or_default();
    let rest = &markdown[start + 1 + from.len()..];
    let end = rest.find(&format!("\n{level} ")).unwrap_or(rest.len());
    &rest[..end]
}

#[test]
fn the_directory_variables_and_limits_in_the_docs_have_the_defaults_help_prints() {
    let help = Command::new(bin("baker-directory"))
        .arg("--help")
        .output()
        .expect("running baker-directory --help");
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let defaults: HashMap<String, String> = help
        .lines()
        .filter_map(|l| {
            let name = l
                .trim_start()
                .strip_prefix("BAKER_")?
                .split_whitespace()
                .next()?;
            let default = l.rsplit_once("[default: ")?.1.strip_suffix(']')?;
            Some((format!("BAKER_{name}"), default.to_owned()))
        })
        .collect();
    let limits = [
        "BAKER_MAX_CONNECTIONS",
        "BAKER_MAX_WATCHES",
        "BAKER_WATCH_TOKEN",
        "BAKER_MAX_INSTANCES_PER_SERVICE",
        "BAKER_MAX_SERVICES",
        "BAKER_MAX_INSTANCES",
        "BAKER_MAX_ROUTES",
        "BAKER_REQUEST_TIMEOUT",
    ];
    for name in limits {
        assert!(
            defaults.contains_key(name),
            "{name} missing from --help:\n{help}"
        );
    }
    let read = |file: &str| std::fs::read_to_string(repo_root().join(file)).expect(file);
    let (directory, design, readme) = (
        read("docs/directory.md"),
        read("docs/design.md"),
        read("README.md"),
    );
    for (file, text, must) in [
        (
            "docs/directory.md",
            directory.as_str(),
            defaults.keys().cloned().collect(),
        ),
        (
            "docs/design.md",
            section(&design, "## Limits and quotas"),
            limits.map(String::from).to_vec(),
        ),
        (
            "README.md",
            section(&readme, "### Directory"),
            defaults.keys().cloned().collect::<Vec<_>>(),
        ),
    ] {
        let documented = documented_defaults(text);
        for (name, default) in &documented {
            let Some(help_default) = defaults.get(name) else {
                continue;
            };
            assert_eq!(
                default, help_default,
                "{file} gives {name} the default {default:?}, --help {help_default:?}"
            );
        }
        for name in must {
            assert!(
                documented.iter().any(|(n, _)| *n == name),
                "{file} has no table row for {name}"
            );
        }
    }
}
