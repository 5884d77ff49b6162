//! Error messages on one line, for logs and users.

/// An error and its causes on one line (`a: b: c`), leaving out a cause whose text the message
/// already holds (many libraries repeat their source in their own message).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("cannot connect: refused")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn joins_causes_and_skips_repeats() {
        let e = Outer(std::io::Error::other("refused"));
        assert_eq!(chain(&e), "outer: refused");
        let e = Repeats(std::io::Error::other("refused"));
        assert_eq!(chain(&e), "cannot connect: refused");
    }
}
