//! What can go wrong, how it is told to the user, and which exit code it gives.

use std::error::Error as _;
use std::process::ExitCode;

use baker_client::api::ClientError;
use baker_client::DirectoryClient;
use reqwest::StatusCode;

use super::args::Global;

/// The command failed: the directory refused it or answered with something unreadable.
pub const EXIT_FAILURE: u8 = 1;
/// Bad usage or input; nothing was sent (clap uses the same code for its own errors).
pub const EXIT_USAGE: u8 = 2;
/// Bad configuration, such as a `--directory` that is not an http:// URL or a token with a
/// space in it (`EX_USAGE`, 64).
pub const EXIT_BAD_CONFIG: u8 = baker_client::config::EXIT_BAD_CONFIG as u8;
/// The directory could not be reached (`EX_UNAVAILABLE`).
pub const EXIT_UNAVAILABLE: u8 = 69;

/// A failure the CLI knows how to explain; anything else is reported as is, with exit code 1.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Input that cannot be sent: the message names what is wrong.
    #[error("{0}")]
    Usage(String),
    /// A bad `--directory` / `BAKER_DIRECTORY` or `--token` / `BAKER_TOKEN`.
    #[error("{0}")]
    Config(String),
    /// No answer from the directory.
    #[error("cannot reach the directory at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// An https:// directory whose certificate did not verify.
    #[error("the directory at {url} presented a certificate that does not verify: {reason}")]
    Untrusted { url: String, reason: String },
    /// The directory answered with an error.
    #[error("the directory refused to {action} ({status}): {message}")]
    Refused {
        action: String,
        status: StatusCode,
        message: String,
    },
    /// The directory answered with something that is not what the API promises.
    #[error("the directory at {url} answered {action} with something baker cannot read: {reason}")]
    Protocol {
        url: String,
        action: String,
        reason: String,
    },
    /// Stdout was closed (`baker watch | head -1`): not an error, just the end.
    #[error("stdout was closed")]
    ClosedOutput,
}

impl Failure {
    /// Turns a client error into a failure that says what was being done.
    pub fn from_client(client: &DirectoryClient, action: &str, err: ClientError) -> Failure {
        let url = client.base().to_owned();
        match err {
            ClientError::BadUrl(u) => Failure::Config(format!(
                "--directory / BAKER_DIRECTORY must be an http:// or https:// URL, got {u:?}"
            )),
            ClientError::Trust(e) => Failure::Config(format!("--ca / BAKER_CA: {e}")),
            ClientError::Untrusted { url, reason } => Failure::Untrusted { url, reason },
            ClientError::BadList(_) => {
                Failure::Config(format!("--directory / BAKER_DIRECTORY: {err}"))
            }
            ClientError::BadToken(why) => Failure::Config(format!("--token / BAKER_TOKEN {why}")),
            ClientError::Unreachable { url, source } => Failure::Unreachable {
                url,
                reason: unreachable_reason(&source),
            },
            ClientError::Refused { status, message } => Failure::Refused {
                action: action.to_owned(),
                status,
                message: if message.is_empty() {
                    "(no message)".to_owned()
                } else {
                    message
                },
            },
            ClientError::Decode(e) => Failure::Protocol {
                url,
                action: action.to_owned(),
                reason: e.to_string(),
            },
            ClientError::Idle(d) => Failure::Unreachable {
                url,
                reason: format!("the connection went silent for {}s", d.as_secs()),
            },
            ClientError::Ended => Failure::Unreachable {
                url,
                reason: "the connection was closed".to_owned(),
            },
            gap @ ClientError::Gap { .. } => Failure::Unreachable {
                url,
                reason: gap.to_string(),
            },
        }
    }

    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Usage(_) => EXIT_USAGE,
            Failure::Config(_) => EXIT_BAD_CONFIG,
            Failure::Unreachable { .. } | Failure::Untrusted { .. } => EXIT_UNAVAILABLE,
            Failure::Refused { .. } | Failure::Protocol { .. } => EXIT_FAILURE,
            Failure::ClosedOutput => 0,
        }
    }

    /// A line that helps the user fix the problem, when there is one to give.
    pub fn hint(&self, global: &Global) -> Option<String> {
        match self {
            Failure::Unreachable { .. } => Some(
                "is baker-directory running there? Point baker at it with --directory or \
                 BAKER_DIRECTORY."
                    .to_owned(),
            ),
            Failure::Untrusted { .. } => Some(if global.ca.is_some() {
                "is --ca / BAKER_CA the bundle of the CA that signed the directory's certificate, \
                 and is that certificate current and made for this host name?"
                    .to_owned()
            } else {
                "point --ca or BAKER_CA at the PEM bundle of the CA that signed the directory's \
                 certificate."
                    .to_owned()
            }),
            Failure::Refused { status, .. } if *status == StatusCode::UNAUTHORIZED => {
                Some(if global.token.as_deref().unwrap_or_default().is_empty() {
                    "this directory requires a token: set BAKER_TOKEN (or pass --token).".to_owned()
                } else {
                    "the token given was not accepted: check BAKER_TOKEN / --token.".to_owned()
                })
            }
            _ => None,
        }
    }
}

/// Says why a request got no answer in a few words: "connection refused", "timed out", ...
pub fn unreachable_reason(err: &reqwest::Error) -> String {
    if err.is_timeout() {
        return "timed out".to_owned();
    }
    let mut deepest = err.to_string();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = err.source();
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return match io.kind() {
                ConnectionRefused => "connection refused".to_owned(),
                ConnectionReset => "connection reset".to_owned(),
                ConnectionAborted => "connection aborted".to_owned(),
                TimedOut => "timed out".to_owned(),
                HostUnreachable => "host unreachable".to_owned(),
                NetworkUnreachable => "network unreachable".to_owned(),
                AddrNotAvailable => "address not available".to_owned(),
                _ => tidy(&io.to_string()),
            };
        }
        deepest = e.to_string();
        cause = e.source();
    }
    tidy(&deepest)
}

/// Drops `(os error N)` and lowercases the first letter, to fit after a colon.
fn tidy(message: &str) -> String {
    let message = match message.find(" (os error") {
        Some(i) => &message[..i],
        None => message,
    };
    let mut chars = message.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => "no reason given".to_owned(),
    }
}

/// Prints `err` on stderr, with a hint when there is one, and returns its exit code.
pub fn report(err: &anyhow::Error, global: &Global) -> ExitCode {
    let failure = err.chain().find_map(|e| e.downcast_ref::<Failure>());
    if let Some(Failure::ClosedOutput) = failure {
        return ExitCode::SUCCESS;
    }
    eprintln!("error: {err:#}");
    if let Some(hint) = failure.and_then(|f| f.hint(global)) {
        eprintln!("hint: {hint}");
    }
    ExitCode::from(failure.map_or(EXIT_FAILURE, Failure::exit_code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tidies_os_errors() {
        assert_eq!(
            tidy("Connection refused (os error 111)"),
            "connection refused"
        );
        assert_eq!(tidy("failed to lookup address"), "failed to lookup address");
        assert_eq!(tidy(""), "no reason given");
    }

    #[test]
    fn exit_codes() {
        assert_eq!(Failure::Usage("x".into()).exit_code(), 2);
        assert_eq!(Failure::Config("x".into()).exit_code(), 64);
        let unreachable = Failure::Unreachable {
            url: "http://127.0.0.1:1".into(),
            reason: "connection refused".into(),
        };
        assert_eq!(unreachable.exit_code(), 69);
        assert_eq!(
            unreachable.to_string(),
            "cannot reach the directory at http://127.0.0.1:1: connection refused"
        );
        let refused = Failure::Refused {
            action: "set the route of emitter".into(),
            status: StatusCode::BAD_REQUEST,
            message: "route: percentages must sum to 100, got 90".into(),
        };
        assert_eq!(refused.exit_code(), 1);
        assert_eq!(
            refused.to_string(),
            "the directory refused to set the route of emitter (400 Bad Request): \
             route: percentages must sum to 100, got 90"
        );
    }
}
