//! `baker`, the operator CLI: parse the command line, run it, map failure to an exit code.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
