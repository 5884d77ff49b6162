//! A daemon's command line: no arguments but `--help` (its variables with their defaults) and
//! `--version`; anything else exits 64.

use std::ffi::OsString;

use super::vars::Program;
use super::EXIT_BAD_CONFIG;

/// What a daemon's command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    /// No arguments: run.
    Run,
    /// `--help` or `--version`: print this on stdout and exit 0.
    Print(String),
    /// Anything else: print this on stderr and exit 64.
    Refuse(String),
}

/// Reads a daemon's arguments: it takes none but `--help` and `--version`, its settings being
/// variables.
pub fn command_line(
    program: &'static Program,
    version: &'static str,
    args: impl IntoIterator<Item = OsString>,
) -> Invocation {
    let command = clap::Command::new(program.name)
        .version(version)
        .about(program.about)
        .after_help(variables_help(program))
        .disable_help_subcommand(true);
    let args: Vec<OsString> = args.into_iter().collect();
    // A word where no argument belongs: most likely a command meant for the CLI, given to a
    // daemon's image (`docker run baker/directory baker services`).
    let command_given = args
        .get(1)
        .is_some_and(|a| !a.to_string_lossy().starts_with('-'));
    match command.try_get_matches_from(args) {
        Ok(_) => Invocation::Run,
        Err(e) => match e.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                Invocation::Print(e.to_string())
            }
            _ if command_given => Invocation::Refuse(format!(
                "{e}\n{} takes no command: its settings are BAKER_* variables (see --help). To \
                 run the baker CLI from the images, use baker/directory's: `docker run --rm \
                 --entrypoint baker baker/directory services`, or `docker exec CONTAINER baker \
                 services` in a running directory container.\n",
                program.name
            )),
            _ => Invocation::Refuse(e.to_string()),
        },
    }
}

/// Applies [`command_line`] to this process's arguments: returns to run, or exits.
pub fn handle_command_line(program: &'static Program, version: &'static str) {
    match command_line(program, version, std::env::args_os()) {
        Invocation::Run => {}
        Invocation::Print(text) => {
            print!("{text}");
            std::process::exit(0);
        }
        Invocation::Refuse(text) => {
            eprint!("{text}");
            std::process::exit(EXIT_BAD_CONFIG);
        }
    }
}

/// The variables section of `--help`: every variable with its default, and the rules.
pub fn variables_help(program: &Program) -> String {
    let width = program.vars.iter().map(|v| v.name.len()).max().unwrap_or(0);
    let mut out = String::from("Variables (an empty value counts as unset):\n");
    for v in program.vars {
        let default = match v.default {
            "required" => "[required]".to_owned(),
            d => format!("[default: {d}]"),
        };
        out.push_str(&format!("  {:width$}  {} {default}\n", v.name, v.help));
    }
    out.push_str(&format!(
        "\nA BAKER_* variable that no Baker program reads is an error (a typo, named with the\n\
         closest variable); one that another Baker program reads is ignored with a warning.\n\
         Every bad variable is reported at once, and {} exits 64.",
        program.name
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::super::vars::DIRECTORY;
    use super::*;

    #[test]
    fn command_line_takes_only_help_and_version() {
        let run = |args: &[&str]| {
            command_line(
                &DIRECTORY,
                "1.2.3",
                std::iter::once("baker-directory")
                    .chain(args.iter().copied())
                    .map(OsString::from),
            )
        };
        assert_eq!(run(&[]), Invocation::Run);
        assert_eq!(
            run(&["--version"]),
            Invocation::Print("baker-directory 1.2.3\n".into())
        );
        let Invocation::Print(help) = run(&["--help"]) else {
            panic!("--help")
        };
        assert!(help.contains("BAKER_LISTEN"), "{help}");
        assert!(help.contains("[default: 0.0.0.0:7700]"), "{help}");
        for args in [&["baker", "services"][..], &["--listen", "x"], &["-x"]] {
            assert!(
                matches!(run(args), Invocation::Refuse(_)),
                "{args:?} accepted"
            );
        }
        // A command for the CLI, given to a daemon's image: how to run the CLI instead.
        let Invocation::Refuse(said) = run(&["baker", "services"]) else {
            panic!("accepted")
        };
        assert!(
            said.contains("baker-directory takes no command")
                && said.contains("docker run --rm --entrypoint baker baker/directory services"),
            "{said}"
        );
        let Invocation::Refuse(said) = run(&["--listen", "x"]) else {
            panic!("accepted")
        };
        assert!(!said.contains("--entrypoint"), "{said}");
    }
}
