//! `baker-probe [URL]`: exits 0 when the URL answers 2xx (http) or accepts (tcp), 1 otherwise.

use std::process::ExitCode;
use std::time::Duration;

use baker_probe::{probe, Target, URL_VAR};

const USAGE: &str =
    "usage: baker-probe [--timeout SECONDS] [http://host:port/path | tcp://host:port]\n\
    \n\
    Exits 0 when an http URL answers with a 2xx status or a tcp URL accepts a connection,\n\
    1 otherwise, 64 for bad usage. Without a URL, reads it from HEALTHCHECK_URL.";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut timeout = Duration::from_secs(5);
    let mut url = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "--timeout" => match args.next().and_then(|s| s.parse::<f64>().ok()) {
                Some(s) if s > 0.0 && s < 3600.0 => timeout = Duration::from_secs_f64(s),
                _ => return usage("--timeout needs a number of seconds between 0 and 3600"),
            },
            _ if url.is_none() => url = Some(arg),
            _ => return usage("too many arguments"),
        }
    }
    let Some(url) = url.or_else(|| std::env::var(URL_VAR).ok().filter(|u| !u.is_empty())) else {
        return usage("no URL given, and HEALTHCHECK_URL is not set");
    };
    let target = match Target::parse(&url) {
        Ok(t) => t,
        Err(e) => return usage(&e),
    };
    match probe(&target, timeout) {
        Ok(0) => {
            println!("{url}: accepting connections");
            ExitCode::SUCCESS
        }
        Ok(status) => {
            println!("{url}: {status}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{url}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage(message: &str) -> ExitCode {
    eprintln!("baker-probe: {message}\n\n{USAGE}");
    ExitCode::from(64)
}
