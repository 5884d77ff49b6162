//! `BAKER_*` names a program does not read: a typo (with the closest name it does read), or a
//! variable of another Baker program.

use std::fmt;

use super::vars::{self, Program};
use super::PREFIX;

/// A `BAKER_*` variable a program does not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stray {
    /// No Baker program reads it: a typo, most likely.
    Unknown {
        name: String,
        program: &'static str,
        /// The program's variable closest to it, when one is close.
        suggestion: Option<&'static str>,
    },
    /// Another Baker program (or tool) reads it.
    Elsewhere {
        name: String,
        program: &'static str,
        readers: Vec<&'static str>,
    },
}

impl Stray {
    /// The variable's name.
    pub fn name(&self) -> &str {
        match self {
            Stray::Unknown { name, .. } | Stray::Elsewhere { name, .. } => name,
        }
    }

    /// What is wrong, after the name: "is not a variable of baker-registrar; did you mean …?".
    pub fn message(&self) -> String {
        match self {
            Stray::Unknown {
                program,
                suggestion: Some(s),
                ..
            } => format!("is not a variable of {program}; did you mean {s}?"),
            Stray::Unknown { program, .. } => {
                format!("is not a variable of {program} (`{program} --help` lists them)")
            }
            Stray::Elsewhere {
                program, readers, ..
            } => format!(
                "is a variable of {}, not of {program}: ignored",
                readers.join(" and ")
            ),
        }
    }
}

impl fmt::Display for Stray {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.name(), self.message())
    }
}

/// The `BAKER_*` names in `names` that `program` does not read, and what they are.
pub fn strays<'a>(
    program: &'static Program,
    names: impl IntoIterator<Item = &'a str>,
) -> Vec<Stray> {
    names
        .into_iter()
        .filter(|name| !program.reads(name))
        .map(|name| {
            let readers = vars::readers_of(name, program);
            if readers.is_empty() {
                Stray::Unknown {
                    name: name.to_owned(),
                    program: program.name,
                    suggestion: closest(name, program),
                }
            } else {
                Stray::Elsewhere {
                    name: name.to_owned(),
                    program: program.name,
                    readers,
                }
            }
        })
        .collect()
}

/// The variable of `program` closest to `name` by edit distance (a transposition counting as
/// one edit), if it is within a third of the name's length.
fn closest(name: &str, program: &Program) -> Option<&'static str> {
    let bare = name.strip_prefix(PREFIX).unwrap_or(name);
    program
        .vars
        .iter()
        .map(|v| {
            let known = v.name.strip_prefix(PREFIX).unwrap_or(v.name);
            (strsim::damerau_levenshtein(bare, known), v.name)
        })
        .filter(|(d, _)| *d <= (bare.chars().count() / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n)
}

#[cfg(test)]
mod tests {
    use super::super::vars::*;
    use super::super::{Environment, Reader};
    use super::*;

    #[test]
    fn an_unknown_name_is_an_error_with_the_closest_name() {
        let env = Environment::from_pairs(&[
            ("BAKER_VERISON", "2"),
            ("BAKER_SERVICE", "emitter"),
            ("BAKER_ZZZ", "1"),
        ]);
        let errs = Reader::new(&REGISTRAR, &env).finish(()).unwrap_err();
        assert_eq!(
            errs.to_string(),
            "invalid configuration (2 problems):\n  \
             BAKER_VERISON: is not a variable of baker-registrar; did you mean BAKER_VERSION?\n  \
             BAKER_ZZZ: is not a variable of baker-registrar (`baker-registrar --help` lists them)"
        );
        let typo = |name: &str, program: &'static Program| match &strays(program, [name])[..] {
            [Stray::Unknown { suggestion, .. }] => *suggestion,
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(typo("BAKER_TOKN", &DIRECTORY), Some("BAKER_TOKEN"));
        assert_eq!(typo("BAKER_DIRECTROY", &REGISTRAR), Some("BAKER_DIRECTORY"));
        assert_eq!(typo("BAKER_ROUTE", &AMBASSADOR), Some("BAKER_ROUTES"));
        assert_eq!(typo("BAKER_LISTNE", &GREETING), Some("BAKER_LISTEN"));
        assert_eq!(typo("BAKER_COUNTS", &GREETING_CLIENT), Some("BAKER_COUNT"));
        assert_eq!(typo("BAKER_SOMETHING_ELSE", &DIRECTORY), None);
    }

    #[test]
    fn a_name_of_another_program_is_a_warning_naming_it() {
        let env = Environment::from_pairs(&[
            ("BAKER_SERVICE", "emitter"),
            ("BAKER_TOKEN", "t"),
            ("BAKER_TEST_LOG", "debug"),
            ("BAKER_ROUTES", "a=1"),
        ]);
        let found = strays(&GREETING, env.baker_names());
        let text: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "BAKER_ROUTES is a variable of baker-ambassador, not of baker-greeting: ignored",
                "BAKER_SERVICE is a variable of baker-registrar, not of baker-greeting: ignored",
                "BAKER_TEST_LOG is a variable of the tests, not of baker-greeting: ignored",
                "BAKER_TOKEN is a variable of baker-directory and baker-registrar and \
                 baker-ambassador and baker, not of baker-greeting: ignored",
            ]
        );
        assert!(Reader::new(&GREETING, &env).finish(()).is_ok());
    }
}
