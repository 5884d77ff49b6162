fn main() {
    eprintln!("baker: the operator CLI is not built yet");
    std::process::exit(1);
}
