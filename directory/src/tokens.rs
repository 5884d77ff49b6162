//! Who may do what: the bearer tokens the directory knows, each with a name, a role and a scope.
//!
//! `BAKER_TOKENS` names a file of one token a line, `NAME ROLE SCOPE SECRET`:
//!
//! ```text
//! # name      role      scope             secret: sha256 of the token, in hex
//! web-reg     register  web,web-*         sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
//! ops         operate   *                 sha256:60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752
//! ambassadors read      *                 sha256:fd61a03af4f77d870fc21e05e7e80678095c92d808cfb3b5c279ee04c74aca13
//! ```
//!
//! A role says what a token may do: `read` (every read, the watch, the dashboard's view, and the
//! ambassadors' reports), `register` (register, renew and deregister instances of the services
//! in its scope), `operate` (routes and drains of the services in its scope, and every read) and
//! `admin` (everything). A scope is `*` or service names separated by commas, each name exact or
//! a prefix ending in `*`; it limits writes, not reads. The file holds no usable secret: only
//! the SHA-256 of each token, compared in constant time. `BAKER_TOKEN`, when set, is one more
//! token, named `BAKER_TOKEN`, with the role `admin`; `BAKER_WATCH_TOKEN` one named
//! `BAKER_WATCH_TOKEN` with the role `read`.
//!
//! The file is read again when it changes (checked every second): a token removed from it is
//! refused from then on, and a watch that needed it ends (as does one whose token's line now
//! holds another secret, or a role that does not read). A file that no longer parses is
//! reported, line by line, and the tokens read before stay in force.
//!
//! A token's name is what the directory records of the changes made with it (their `by`): the
//! words it records for changes made without one (`anonymous`, `docker`, `expiry`, `etcd`,
//! `BAKER_TOKEN`, `BAKER_WATCH_TOKEN`) cannot name a token of the file.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use baker_client::change::by;
use baker_client::model::ServiceName;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often the tokens file is checked for a change.
pub const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Read,
    Register,
    Operate,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Register => "register",
            Role::Operate => "operate",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "read" => Ok(Role::Read),
            "register" => Ok(Role::Register),
            "operate" => Ok(Role::Operate),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "the role `{other}` is none of read, register, operate, admin"
            )),
        }
    }
}

/// One service name of a scope: exact, or a prefix (`web-*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
}

/// The services a token may change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    Services(Vec<Pattern>),
}

impl Scope {
    fn parse(s: &str) -> Result<Scope, String> {
        if s == "*" {
            return Ok(Scope::All);
        }
        let mut patterns = Vec::new();
        for part in s.split(',') {
            let (name, prefix) = match part.strip_suffix('*') {
                Some(p) => (p, true),
                None => (part, false),
            };
            // A prefix is checked as a name would be: `web-*` is `web-` plus anything.
            let probe = if prefix {
                format!("{name}x")
            } else {
                name.to_owned()
            };
            if name.contains('*') || probe.parse::<ServiceName>().is_err() {
                return Err(format!(
                    "the scope `{s}` must be `*` or service names separated by commas, each \
                     exact or a prefix ending in `*` (`{part}` is neither)"
                ));
            }
            patterns.push(match prefix {
                true => Pattern::Prefix(name.to_owned()),
                false => Pattern::Exact(name.to_owned()),
            });
        }
        Ok(Scope::Services(patterns))
    }

    /// Whether `service` is in this scope.
    pub fn covers(&self, service: &ServiceName) -> bool {
        match self {
            Scope::All => true,
            Scope::Services(patterns) => patterns.iter().any(|p| match p {
                Pattern::Exact(name) => service.as_str() == name,
                Pattern::Prefix(prefix) => service.as_str().starts_with(prefix.as_str()),
            }),
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::All => f.write_str("*"),
            Scope::Services(patterns) => {
                let parts: Vec<String> = patterns
                    .iter()
                    .map(|p| match p {
                        Pattern::Exact(n) => n.clone(),
                        Pattern::Prefix(p) => format!("{p}*"),
                    })
                    .collect();
                f.write_str(&parts.join(","))
            }
        }
    }
}

/// A token the directory knows: its name, role, scope, and the SHA-256 of its secret.
#[derive(Debug, Clone)]
pub struct Token {
    pub name: String,
    pub role: Role,
    pub scope: Scope,
    /// Whether it comes from the tokens file (named by its owner), not from a variable.
    pub listed: bool,
    hash: [u8; 32],
}

impl Token {
    /// A token of `role` over every service whose secret is `secret` (a variable's token).
    pub fn of_secret(name: &str, role: Role, secret: &str) -> Token {
        Token {
            name: name.to_owned(),
            role,
            scope: Scope::All,
            listed: false,
            hash: Sha256::digest(secret.as_bytes()).into(),
        }
    }
}

/// Reads a tokens file's text: every token, or every line at fault.
pub fn parse(text: &str) -> Result<Vec<Token>, Vec<String>> {
    let mut tokens: Vec<Token> = Vec::new();
    let mut names = BTreeSet::new();
    let mut errors = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_line(line) {
            Ok(token) if !names.insert(token.name.clone()) => errors.push(format!(
                "line {}: the name `{}` is used twice",
                n + 1,
                token.name
            )),
            Ok(token) => tokens.push(token),
            Err(e) => errors.push(format!("line {}: {e}", n + 1)),
        }
    }
    if errors.is_empty() {
        Ok(tokens)
    } else {
        Err(errors)
    }
}

fn parse_line(line: &str) -> Result<Token, String> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [name, role, scope, secret] = fields[..] else {
        return Err(format!(
            "expected four fields, NAME ROLE SCOPE SECRET, found {}",
            fields.len()
        ));
    };
    let name_ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !name_ok {
        return Err(format!(
            "the name `{}` must be 1 to 64 letters, digits, `.`, `_` or `-`",
            name.escape_debug()
        ));
    }
    if by::RESERVED.contains(&name) {
        return Err(format!(
            "the name `{name}` is the directory's own word for changes made without a token of \
             the file; choose another"
        ));
    }
    let role: Role = role.parse()?;
    let scope = Scope::parse(scope)?;
    let hex = secret.strip_prefix("sha256:").ok_or_else(|| {
        "the secret must be `sha256:` and the token's SHA-256 in hex (the file holds no \
         token itself): `printf %s TOKEN | sha256sum`"
            .to_owned()
    })?;
    let mut hash = [0u8; 32];
    match hex::decode(hex) {
        Ok(bytes) if bytes.len() == 32 => hash.copy_from_slice(&bytes),
        _ => return Err("the secret must be `sha256:` and 64 hex digits".to_owned()),
    }
    Ok(Token {
        name: name.to_owned(),
        role,
        scope,
        listed: true,
        hash,
    })
}

/// The tokens in force: those of the variables, and those of the file as last read.
pub struct Tokens {
    fixed: Vec<Token>,
    file: Option<PathBuf>,
    from_file: RwLock<Arc<Vec<Token>>>,
    /// When the file was changed before it was last read, and its size.
    read_at: std::sync::Mutex<Option<(SystemTime, u64)>>,
    /// Moves on every reload that changed the tokens: open watches check theirs again.
    generation: watch::Sender<u64>,
}

impl Tokens {
    /// The tokens of the variables and of `file` (read now: an error names every bad line).
    pub fn load(fixed: Vec<Token>, file: Option<PathBuf>) -> Result<Tokens, String> {
        let read_at = file.as_deref().and_then(stamp);
        let from_file = match &file {
            Some(path) => read(path)?,
            None => Vec::new(),
        };
        Ok(Tokens {
            fixed,
            file,
            from_file: RwLock::new(Arc::new(from_file)),
            read_at: std::sync::Mutex::new(read_at),
            generation: watch::Sender::new(0),
        })
    }

    /// Whether any token is configured: without one, writes are open.
    pub fn any(&self) -> bool {
        !self.fixed.is_empty() || self.file.is_some()
    }

    /// The token whose secret is `presented`, if any; every known token is compared, in
    /// constant time, whichever matches.
    pub fn find(&self, presented: &[u8]) -> Option<Token> {
        let hash: [u8; 32] = Sha256::digest(presented).into();
        let from_file = self
            .from_file
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut found = None;
        for token in self.fixed.iter().chain(from_file.iter()) {
            if bool::from(token.hash.ct_eq(&hash)) && found.is_none() {
                found = Some(token.clone());
            }
        }
        found
    }

    /// Whether `token` is still in force, with the same name and secret, and a role that
    /// reads: a watch opened with it may go on.
    pub fn still_reads(&self, token: &Token) -> bool {
        let from_file = self.from_file.read().unwrap_or_else(|p| p.into_inner());
        let mut found = false;
        for t in self.fixed.iter().chain(from_file.iter()) {
            let same = t.name == token.name && bool::from(t.hash.ct_eq(&token.hash));
            found |= same && t.role != Role::Register;
        }
        found
    }

    /// A receiver that sees every reload that changed the tokens.
    pub fn reloads(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Reads the file again whenever it changes, until `shutdown`.
    pub async fn follow(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(path) = self.file.clone() else {
            return;
        };
        let mut seen = *self.read_at.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RELOAD_EVERY) => {}
            }
            let now = stamp(&path);
            if now == seen {
                continue;
            }
            seen = now;
            match read(&path) {
                Ok(tokens) => {
                    tracing::info!(
                        file = %path.display(),
                        tokens = tokens.len(),
                        "BAKER_TOKENS read again"
                    );
                    *self.from_file.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(tokens);
                    self.generation.send_modify(|g| *g += 1);
                }
                Err(e) => tracing::error!("{e}; the tokens read before stay in force"),
            }
        }
    }
}

/// When the file was last changed, and its size; `None` when it cannot be read.
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Reads the tokens of `path`, or says what is wrong with it.
fn read(path: &Path) -> Result<Vec<Token>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("BAKER_TOKENS: cannot read {}: {e}", path.display()))?;
    parse(&text).map_err(|errors| {
        format!(
            "BAKER_TOKENS: {} is not a tokens file: {}",
            path.display(),
            errors.join("; ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(secret: &str) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(secret.as_bytes())))
    }

    #[test]
    fn a_file_gives_names_roles_scopes_and_finds_tokens_by_their_secret() {
        let text = format!(
            "# comment\n\nweb-reg register web,web-* {}\nops operate * {}\n",
            sha("r3g"),
            sha("0ps")
        );
        let tokens = Tokens::load(vec![], None).unwrap();
        *tokens.from_file.write().unwrap() = Arc::new(parse(&text).unwrap());
        let reg = tokens.find(b"r3g").unwrap();
        assert_eq!((reg.name.as_str(), reg.role), ("web-reg", Role::Register));
        for (service, covered) in [
            ("web", true),
            ("web-api", true),
            ("webx", false),
            ("db", false),
        ] {
            assert_eq!(
                reg.scope.covers(&service.parse().unwrap()),
                covered,
                "{service}"
            );
        }
        assert_eq!(reg.scope.to_string(), "web,web-*");
        assert_eq!(tokens.find(b"0ps").unwrap().role, Role::Operate);
        assert!(tokens.find(b"r3g ").is_none() && tokens.find(b"").is_none());
    }

    #[test]
    fn every_bad_line_is_named() {
        let text = format!(
            "a read *\nb reader * {s}\nc read web,/x {s}\nd read * sha1:00\ne read * {s}\ne read * {s}\n\
             f\u{e9} read * {s}\ndocker register * {s}\n",
            s = sha("x")
        );
        let errors = parse(&text).unwrap_err();
        let expected = [
            "line 1: expected four fields",
            "line 2: the role `reader`",
            "line 3: the scope `web,/x`",
            "line 4: the secret must be `sha256:`",
            "line 6: the name `e` is used twice",
            "line 7: the name",
            "line 8: the name `docker` is the directory's own word",
        ];
        assert_eq!(errors.len(), expected.len(), "{errors:?}");
        for (e, want) in errors.iter().zip(expected) {
            assert!(e.starts_with(want), "{e} / {want}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_file_is_read_again_when_it_changes_and_a_bad_one_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, format!("a read * {}\n", sha("one"))).unwrap();
        let tokens = Arc::new(Tokens::load(vec![], Some(path.clone())).unwrap());
        let mut reloads = tokens.reloads();
        let stop = CancellationToken::new();
        tokio::spawn(tokens.clone().follow(stop.clone()));
        let a = tokens.find(b"one").unwrap();
        assert!(tokens.still_reads(&a));
        std::fs::write(&path, format!("b admin * {}\n", sha("two-longer"))).unwrap();
        tokio::time::timeout(Duration::from_secs(5), reloads.changed())
            .await
            .unwrap()
            .unwrap();
        assert!(tokens.find(b"one").is_none());
        assert!(!tokens.still_reads(&a), "taken out of the file");
        let b2 = tokens.find(b"two-longer").unwrap();
        assert_eq!(b2.name, "b");
        assert!(tokens.still_reads(&b2));
        // The same name with another secret, then with a role that does not read.
        std::fs::write(&path, format!("# b\nb admin * {}\n", sha("three-lo"))).unwrap();
        reloads.changed().await.unwrap();
        let b3 = tokens.find(b"three-lo").unwrap();
        assert!(!tokens.still_reads(&b2) && tokens.still_reads(&b3));
        std::fs::write(&path, format!("b register * {}\n", sha("three-lo"))).unwrap();
        reloads.changed().await.unwrap();
        assert!(!tokens.still_reads(&b3), "a register token does not read");
        std::fs::write(&path, format!("b admin * {}\n", sha("two-longer"))).unwrap();
        reloads.changed().await.unwrap();
        std::fs::write(&path, "garbage that is not a token line\n").unwrap();
        tokio::time::sleep(RELOAD_EVERY * 3).await;
        assert!(
            tokens.find(b"two-longer").is_some(),
            "a bad file changes nothing"
        );
        stop.cancel();
    }
}
