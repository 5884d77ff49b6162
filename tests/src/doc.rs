//! Executable documentation: the shell examples of README.md and docs/*.md, read from the
//! Markdown, so that `tests/tests/docs.rs` can run them and compare what they print with what
//! the docs quote.
//!
//! A fenced block takes part when its info string says so, after the language:
//!
//! | info string | meaning |
//! | --- | --- |
//! | `console run` | a transcript: each `$ command` (continued by a trailing `\`) runs in the file's shell; the lines up to the next `$` are its output (stdout and stderr), compared in full; a last line `[exit N]` checks the exit code |
//! | `sh run` | a script: runs as one command and must exit 0; its output is not compared, unless the next block is marked `expect` |
//! | `... run bg=NAME` | the block's one command is started in the background as NAME (what a reader runs in another terminal); the output lines quoted under it must appear in its log |
//! | `text expect` | the output of the `sh run` block just before, compared in full |
//! | `text log=NAME` | lines that must appear in NAME's log, in this order, after those matched before |
//! | `text log=NAME signal=TERM` | the same, after sending NAME the signal (`TERM`, `INT` as Ctrl-C does, `HUP`, ...) and, unless it is `HUP`, waiting for it and its children to exit |
//!
//! Every other block is prose for the reader; the docs say beside each shell example left
//! unmarked why it cannot run in a test.
//!
//! Outputs are compared after [`normalize`], which drops what differs from run to run: times,
//! container and image ids, addresses, process ids, ages and sizes. In a quoted output, `...`
//! stands for any text within a line, and a line of only `...` for any number of lines.

use std::collections::HashMap;
use std::sync::OnceLock;

use regex::Regex;

/// One thing to do, in the order of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A transcript command: run it, compare its output (and exit code, if quoted).
    Command {
        line: usize,
        command: String,
        output: Vec<String>,
        exit: Option<i32>,
    },
    /// A script that must succeed; `output`, when quoted in an `expect` block, is compared.
    Script {
        line: usize,
        script: String,
        output: Option<Vec<String>>,
    },
    /// A command started in the background as `name`; `output` must appear in its log.
    Background {
        line: usize,
        name: String,
        command: String,
        output: Vec<String>,
    },
    /// Lines that must appear in `name`'s log, optionally after sending it a signal.
    Log {
        line: usize,
        name: String,
        signal: Option<String>,
        output: Vec<String>,
    },
}

impl Step {
    /// The line of the Markdown file where the step's block starts (1-based).
    pub fn line(&self) -> usize {
        match self {
            Step::Command { line, .. }
            | Step::Script { line, .. }
            | Step::Background { line, .. }
            | Step::Log { line, .. } => *line,
        }
    }
}

/// A fenced block: where it starts, the words of its info string, and its lines.
#[derive(Debug)]
struct Block {
    line: usize,
    info: Vec<String>,
    body: Vec<String>,
    /// The reason given in a `<!-- not run: ... -->` comment just before the block.
    not_run: Option<String>,
}

impl Block {
    fn has(&self, word: &str) -> bool {
        self.info.iter().any(|w| w == word)
    }

    fn value(&self, key: &str) -> Option<String> {
        self.info
            .iter()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('=').map(str::to_owned))
    }
}

fn blocks(markdown: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut open: Option<(usize, String, Block)> = None;
    let mut before = "";
    for (i, raw) in markdown.lines().enumerate() {
        let trimmed = raw.trim_start();
        let indent = raw.len() - trimmed.len();
        match &mut open {
            None => {
                if let Some(rest) = trimmed.strip_prefix("```") {
                    let info = rest.split_whitespace().map(str::to_owned).collect();
                    let not_run = before
                        .strip_prefix("<!-- not run:")
                        .and_then(|r| r.strip_suffix("-->"))
                        .map(|r| r.trim().to_owned());
                    let block = Block {
                        line: i + 1,
                        info,
                        body: Vec::new(),
                        not_run,
                    };
                    open = Some((indent, "```".into(), block));
                } else if !trimmed.is_empty() {
                    before = trimmed.trim_end();
                }
            }
            Some((indent0, fence, block)) => {
                if trimmed.starts_with(fence.as_str()) && trimmed.trim() == fence.as_str() {
                    if let Some((_, _, b)) = open.take() {
                        blocks.push(b);
                    }
                    before = "";
                } else {
                    let cut = (*indent0).min(indent);
                    block.body.push(raw[cut..].to_owned());
                }
            }
        }
    }
    blocks
}

/// Reads the steps of a Markdown file, or says which block is malformed.
pub fn steps(markdown: &str) -> Result<Vec<Step>, String> {
    let blocks = blocks(markdown);
    let mut steps = Vec::new();
    let mut i = 0;
    while i < blocks.len() {
        let b = &blocks[i];
        let at = |what: &str| format!("the block at line {}: {what}", b.line);
        if b.has("run") {
            let transcript = b.info.first().map(String::as_str) == Some("console");
            if let Some(name) = b.value("bg") {
                let (command, output) = if transcript {
                    let cmds = transcript_commands(b)?;
                    match cmds.as_slice() {
                        [one] => (one.command.clone(), one.output.clone()),
                        _ => return Err(at("a bg= transcript must hold exactly one command")),
                    }
                } else {
                    (b.body.join("\n"), Vec::new())
                };
                steps.push(Step::Background {
                    line: b.line,
                    name,
                    command,
                    output,
                });
            } else if transcript {
                steps.extend(transcript_commands(b)?.into_iter().map(|c| Step::Command {
                    line: c.line,
                    command: c.command,
                    output: c.output,
                    exit: c.exit,
                }));
            } else {
                let output = match blocks.get(i + 1) {
                    Some(next) if next.has("expect") => {
                        i += 1;
                        Some(next.body.clone())
                    }
                    _ => None,
                };
                steps.push(Step::Script {
                    line: b.line,
                    script: b.body.join("\n"),
                    output,
                });
            }
        } else if let Some(name) = b.value("log") {
            steps.push(Step::Log {
                line: b.line,
                name,
                signal: b.value("signal"),
                output: b.body.clone(),
            });
        } else if b.has("expect") {
            return Err(at("an expect block must follow a `sh run` block"));
        } else if is_shell(b) && b.not_run.as_deref().is_none_or(str::is_empty) {
            return Err(at(
                "a shell example must run (`console run`, `sh run`, ...) or say why it cannot, \
                 in a `<!-- not run: reason -->` line just before it",
            ));
        }
        i += 1;
    }
    Ok(steps)
}

/// Blocks that hold shell commands or their output: `sh`, `console`, `bash`, `shell`, or no
/// language at all (`text` and `yaml` are for other things).
fn is_shell(b: &Block) -> bool {
    matches!(
        b.info.first().map(String::as_str),
        None | Some("sh" | "console" | "bash" | "shell")
    )
}

struct TranscriptCommand {
    line: usize,
    command: String,
    output: Vec<String>,
    exit: Option<i32>,
}

fn transcript_commands(b: &Block) -> Result<Vec<TranscriptCommand>, String> {
    let mut out: Vec<TranscriptCommand> = Vec::new();
    let mut continued = false;
    for (n, line) in b.body.iter().enumerate() {
        if continued {
            if let Some(c) = out.last_mut() {
                c.command.push('\n');
                c.command.push_str(line);
            }
            continued = line.ends_with('\\');
        } else if let Some(cmd) = line.strip_prefix("$ ") {
            out.push(TranscriptCommand {
                line: b.line + 1 + n,
                command: cmd.to_owned(),
                output: Vec::new(),
                exit: None,
            });
            continued = cmd.ends_with('\\');
        } else {
            let Some(c) = out.last_mut() else {
                return Err(format!(
                    "the block at line {}: output before the first `$ ` command",
                    b.line
                ));
            };
            c.output.push(line.clone());
        }
    }
    for c in &mut out {
        while c.output.last().is_some_and(|l| l.trim().is_empty()) {
            c.output.pop();
        }
        if let Some(code) = c
            .output
            .last()
            .and_then(|l| l.trim().strip_prefix("[exit ")?.strip_suffix(']'))
            .and_then(|n| n.parse().ok())
        {
            c.exit = Some(code);
            c.output.pop();
            while c.output.last().is_some_and(|l| l.trim().is_empty()) {
                c.output.pop();
            }
        }
    }
    Ok(out)
}

fn rules() -> &'static [(Regex, &'static str)] {
    static RULES: OnceLock<Vec<(Regex, &'static str)>> = OnceLock::new();
    RULES.get_or_init(|| {
        [
            // Colours: docker-compose v1 colours its prefixes even into a file.
            (r"\x1b\[[0-9;]*m", ""),
            // Compose's prefixes: `registrar-2_1  | ` (v1) and `registrar-2-1  | ` (v2).
            (r"^([A-Za-z0-9][\w.-]*?)[-_]\d+\s+\| ?", "$1 | "),
            // Times: log timestamps and `-t` prefixes.
            (r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z\s*", ""),
            (r"\b\d\d:\d\d:\d\d\.\d+Z?\s*", ""),
            (
                r"\b[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT\b",
                "<date>",
            ),
            // Milliseconds since the epoch (`last_seen`).
            (r"\b1\d{12}\b", "<ms>"),
            // Container and image ids, short or long.
            (r"\b(sha256:)?[0-9a-f]{64}\b", "<id>"),
            (r"\b[0-9a-f]{12}\b", "<id>"),
            // The greeting's counter, which depends on how many requests came before.
            (r#""id":\d+"#, r#""id":<n>"#),
            (r"\bid=\d+\b", "id=<n>"),
            // Process ids.
            (r"\(\d+\)", "(<pid>)"),
            (r"\b(worker|pid)=\d+", "$1=<pid>"),
            // Ages and sizes.
            (r"\b\d+(\.\d+)?(ms|s) ago\b", "<age> ago"),
            (r"\b\d+(\.\d+)? ?(MB|kB|KiB|MiB)\b", "<size>"),
        ]
        .into_iter()
        .map(|(re, to)| (Regex::new(re).expect("a valid rule"), to))
        .collect()
    })
}

fn ipv4() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b").expect("valid"))
}

/// One line as compared: run-dependent values replaced by placeholders (`<ip>` for every IPv4
/// address but `127.0.0.1` and `0.0.0.0`, `<id>` for container and image ids, `<ms>` for
/// epoch milliseconds, `<n>` for the greeting's counter, `<pid>`, `<age>`, `<size>`, `<date>`
/// for HTTP dates), times and
/// compose's container numbers and colours dropped, runs of blanks made one space.
pub fn normalize(line: &str) -> String {
    let mut s = line.to_owned();
    for (re, to) in rules() {
        s = re.replace_all(&s, *to).into_owned();
    }
    s = ipv4()
        .replace_all(&s, |c: &regex::Captures| match &c[0] {
            a @ ("127.0.0.1" | "0.0.0.0") => a.to_owned(),
            _ => "<ip>".to_owned(),
        })
        .into_owned();
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// An image's line in `docker/build.sh`'s report: its name and its size in MB.
fn image_size(line: &str) -> Option<(&str, f64)> {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| {
        Regex::new(r"^(baker/\S+)\s+[0-9a-f]{12}\s+(\d+(?:\.\d+)?) MB$").expect("valid")
    });
    let c = re.captures(line.trim())?;
    Some((c.get(1)?.as_str(), c[2].parse().ok()?))
}

/// How far an image's size may be from the one a doc states (a tenth): the figures stay true
/// of what the build makes, while a library update or a small change leaves them alone.
pub const IMAGE_SIZE_TOLERANCE: f64 = 0.10;

/// Whether a quoted line (with `...` for any text) matches an output line, both normalised.
/// An image's size in `docker/build.sh`'s report must be within [`IMAGE_SIZE_TOLERANCE`] of
/// the quoted one.
pub fn line_matches(quoted: &str, actual: &str) -> bool {
    if let (Some((name, want)), Some((got_name, got))) = (image_size(quoted), image_size(actual)) {
        return name == got_name && (got - want).abs() <= want * IMAGE_SIZE_TOLERANCE;
    }
    let quoted = normalize(quoted);
    let actual = normalize(actual);
    if !quoted.contains("...") {
        return quoted == actual;
    }
    let pattern = quoted
        .split("...")
        .map(regex::escape)
        .collect::<Vec<_>>()
        .join(".*");
    Regex::new(&format!("^{pattern}$")).is_ok_and(|re| re.is_match(&actual))
}

fn is_ellipsis(line: &str) -> bool {
    line.trim() == "..."
}

/// Whether a whole output matches the quoted lines (a line `...` matching any number of lines).
/// Blank lines at either end are ignored.
pub fn output_matches(quoted: &[String], actual: &str) -> bool {
    fn trim(v: Vec<&str>) -> Vec<&str> {
        let start = v
            .iter()
            .position(|l| !l.trim().is_empty())
            .unwrap_or(v.len());
        let end = v
            .iter()
            .rposition(|l| !l.trim().is_empty())
            .map_or(start, |e| e + 1);
        v[start..end].to_vec()
    }
    let quoted = trim(quoted.iter().map(String::as_str).collect());
    let actual = trim(actual.lines().collect());
    fn go(q: &[&str], a: &[&str]) -> bool {
        match q.split_first() {
            None => a.is_empty(),
            Some((first, rest)) if is_ellipsis(first) => (0..=a.len()).any(|k| go(rest, &a[k..])),
            Some((first, rest)) => {
                a.first().is_some_and(|l| line_matches(first, l)) && go(rest, &a[1..])
            }
        }
    }
    go(&quoted, &actual)
}

/// The stream a log line belongs to: the service of a compose prefix (`client | ...`), else
/// the process itself. Order is kept within a stream, not across: compose interleaves its
/// containers' logs in no fixed order.
fn stream(line: &str) -> String {
    let n = normalize(line);
    match n.split_once(" | ") {
        Some((name, _)) if !name.contains(' ') => name.to_owned(),
        _ => String::new(),
    }
}

/// Finds the quoted lines in `log`, in order within each stream, each after the line matched
/// last in its stream (`positions`, updated only when every line is found); returns the first
/// quoted line not found.
pub fn find_in_log<'q>(
    quoted: &'q [String],
    log: &[&str],
    positions: &mut HashMap<String, usize>,
) -> Result<(), &'q str> {
    let mut at = positions.clone();
    for q in quoted
        .iter()
        .filter(|q| !q.trim().is_empty() && !is_ellipsis(q))
    {
        let key = stream(q);
        let from = at.get(&key).copied().unwrap_or(0);
        let found = log
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, l)| stream(l) == key && line_matches(q, l));
        match found {
            Some((k, _)) => {
                at.insert(key, k + 1);
            }
            None => return Err(q),
        }
    }
    *positions = at;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"# Title

```console run
$ baker links a=b:1 \
    c=d:2
A_PORT=tcp://b:1

$ false
[exit 1]
```

<!-- not run: an example of an example -->
```sh
not run
```

```sh run bg=dir
baker-directory
```

```text log=dir
INFO listening on 0.0.0.0:7700
```

```sh run
echo hi
```

```text expect
hi
```

```text log=dir signal=TERM
INFO stopped
```
"#;

    #[test]
    fn steps_follow_the_markers() {
        let steps = steps(DOC).expect("valid");
        assert_eq!(
            steps,
            vec![
                Step::Command {
                    line: 4,
                    command: "baker links a=b:1 \\\n    c=d:2".into(),
                    output: vec!["A_PORT=tcp://b:1".into()],
                    exit: None,
                },
                Step::Command {
                    line: 8,
                    command: "false".into(),
                    output: vec![],
                    exit: Some(1),
                },
                Step::Background {
                    line: 17,
                    name: "dir".into(),
                    command: "baker-directory".into(),
                    output: vec![],
                },
                Step::Log {
                    line: 21,
                    name: "dir".into(),
                    signal: None,
                    output: vec!["INFO listening on 0.0.0.0:7700".into()],
                },
                Step::Script {
                    line: 25,
                    script: "echo hi".into(),
                    output: Some(vec!["hi".into()]),
                },
                Step::Log {
                    line: 33,
                    name: "dir".into(),
                    signal: Some("TERM".into()),
                    output: vec!["INFO stopped".into()],
                },
            ]
        );
    }

    #[test]
    fn image_sizes_must_be_within_a_tenth_of_the_doc() {
        let doc = "baker/directory:latest   53c37e0b3f18  20.0 MB";
        assert!(line_matches(
            doc,
            "baker/directory:latest   0123456789ab  21.5 MB"
        ));
        assert!(line_matches(
            doc,
            "baker/directory:latest   0123456789ab  18.1 MB"
        ));
        assert!(!line_matches(
            doc,
            "baker/directory:latest   0123456789ab  11.6 MB"
        ));
        assert!(!line_matches(
            doc,
            "baker/directory:latest   0123456789ab  22.1 MB"
        ));
        assert!(!line_matches(
            doc,
            "baker/registrar:latest   0123456789ab  20.0 MB"
        ));
    }

    #[test]
    fn output_before_a_command_is_an_error() {
        assert!(steps("```console run\nhello\n$ true\n```\n").is_err());
        assert!(steps("```text expect\nhello\n```\n").is_err());
    }

    #[test]
    fn a_shell_example_runs_or_says_why_not() {
        assert!(steps("```sh\nfalse\n```\n").is_err());
        assert!(steps("```\n$ false\n```\n").is_err());
        assert!(steps("<!-- not run: -->\n```sh\nfalse\n```\n").is_err());
        assert_eq!(
            steps("<!-- not run: why -->\n\n```sh\nfalse\n```\n"),
            Ok(vec![])
        );
        assert_eq!(steps("```yaml\na: b\n```\n```text\nx\n```\n"), Ok(vec![]));
    }

    #[test]
    fn normalize_drops_what_changes_between_runs() {
        assert_eq!(
            normalize(
                "registrar-2_1  | 2026-12-01T21:22:19.123456Z  INFO x: at 192.168.160.2:8080"
            ),
            "registrar-2 | INFO x: at <ip>:8080"
        );
        assert_eq!(
            normalize("\x1b[34;1mregistrar-2-1  |\x1b[0m INFO x"),
            normalize("registrar-2_1  | INFO x")
        );
        assert_eq!(
            normalize(r#"{"last_seen":1795313930091} 953ca1537004-8080 (27774) 0s ago 11.6 MB"#),
            r#"{"last_seen":<ms>} <id>-8080 (<pid>) <age> ago <size>"#
        );
        assert_eq!(normalize("a   b  127.0.0.1:7700 "), "a b 127.0.0.1:7700");
    }

    #[test]
    fn ellipses_match_text_and_lines() {
        assert!(line_matches(r#"{"id":"a",...}"#, r#"{"id":"a","port":1}"#));
        assert!(!line_matches(r#"{"id":"a",...}"#, r#"{"id":"b","port":1}"#));
        let quoted: Vec<String> = ["first", "...", "last"].map(String::from).to_vec();
        assert!(output_matches(&quoted, "first\nlast\n"));
        assert!(output_matches(&quoted, "first\na\nb\nlast\n\n"));
        assert!(!output_matches(&quoted, "first\nlast\nmore\n"));
    }

    #[test]
    fn log_lines_are_found_in_order() {
        let log = ["a", "INFO b", "c", "INFO d"];
        let q = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut at = HashMap::new();
        assert_eq!(
            find_in_log(&q(&["INFO b", "INFO d"]), &log, &mut at),
            Ok(())
        );
        assert_eq!(at[""], 4);
        let mut at = HashMap::new();
        assert_eq!(
            find_in_log(&q(&["INFO d", "INFO b"]), &log, &mut at),
            Err("INFO b")
        );
        assert!(at.is_empty());
    }

    #[test]
    fn compose_services_keep_their_own_order() {
        let log = ["a_1 | up", "b_1 | x", "a_1 | next", "b_1 | y"];
        let q = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut at = HashMap::new();
        assert_eq!(find_in_log(&q(&["b | y", "a | up"]), &log, &mut at), Ok(()));
        assert_eq!(find_in_log(&q(&["a | next"]), &log, &mut at), Ok(()));
        assert_eq!(find_in_log(&q(&["b | x"]), &log, &mut at), Err("b | x"));
    }
}
