//! The dashboard: `GET /ui`, a page served by the directory itself.
//!
//! The page is a Tera template rendered with autoescape; its script and style are served
//! beside it from the binary (`/ui/app.js`, `/ui/app.css`, `/ui/icon.svg`), so the page
//! works offline and loads nothing from elsewhere. Every answer carries a Content-Security-Policy
//! that allows only the directory's own script, style and API, and forbids framing. The
//! script reads the same public API as everyone else (the watch stream, ambassadors,
//! maintenance, events) and builds the page with DOM calls only (`textContent`), so no value
//! of the table is ever parsed as HTML. Changes need the bearer token, which the page sends
//! as everyone else does; `GET /ui/auth` only tells the page whether a token is right.
//!
//! The page's header names the replica that serves it and the store its table lives in
//! ([`About`]), so that with several replicas on one etcd an operator knows which one they see.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::LazyLock;

use axum::extract::State;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
    X_FRAME_OPTIONS,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::api::{ApiError, AppState};
use crate::config::StoreMode;
use crate::tokens::Role;

/// The page's template.
const PAGE: &str = include_str!("../ui/index.html");
/// The page's script: everything dynamic.
const SCRIPT: &str = include_str!("../ui/app.js");
const STYLE: &str = include_str!("../ui/app.css");
const ICON: &str = include_str!("../ui/icon.svg");

/// Only the directory's own script, style, icon and API; no framing, no forms posted
/// elsewhere, no `<base>`.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                       img-src 'self'; connect-src 'self'; base-uri 'none'; \
                       form-action 'none'; frame-ancestors 'none'";

static TEMPLATES: LazyLock<tera::Tera> = LazyLock::new(|| {
    let mut tera = tera::Tera::default();
    // Autoescape is on for `.html` templates; the embedded template is checked by a unit test,
    // so adding it cannot fail at run time.
    tera.add_raw_template("index.html", PAGE)
        .expect("the embedded dashboard template parses");
    tera
});

/// Which replica serves the page and where its table lives, as the header shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct About {
    /// `<hostname>:<port>`: the machine the directory runs on and the port it listens on.
    pub replica: String,
    /// `memory (routes and drains kept in <dir>)`, or `etcd (<members>, prefix <prefix>)`.
    pub store: String,
}

impl About {
    /// What a directory on `hostname`, listening on `listen`, says of itself with `store` (and
    /// `data`, where a memory store keeps its routes and drains). Only the members' host and
    /// port are shown: anything before an `@` (credentials) never is.
    pub fn new(hostname: &str, listen: SocketAddr, store: &StoreMode, data: &Path) -> About {
        let host = if hostname.is_empty() {
            listen.ip().to_string()
        } else {
            hostname.to_owned()
        };
        let store = match store {
            StoreMode::Memory => format!("memory (routes and drains kept in {})", data.display()),
            StoreMode::Etcd(url) => {
                let members: Vec<&str> = url
                    .endpoints
                    .iter()
                    .map(|e| {
                        let hostport = e.split_once("://").map_or(e.as_str(), |(_, rest)| rest);
                        hostport.rsplit_once('@').map_or(hostport, |(_, h)| h)
                    })
                    .collect();
                format!("etcd ({}, prefix {})", members.join(", "), url.prefix)
            }
        };
        About {
            replica: format!("{host}:{}", listen.port()),
            store,
        }
    }

    /// [`About::new`] with this machine's hostname (its address when it has no readable one).
    pub fn here(listen: SocketAddr, store: &StoreMode, data: &Path) -> About {
        let hostname = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default();
        About::new(&hostname, listen, store, data)
    }
}

/// The dashboard's routes, mounted by [`crate::api::router`].
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui", get(page))
        .route("/ui/app.js", get(script))
        .route("/ui/app.css", get(style))
        .route("/ui/icon.svg", get(icon))
        .route("/ui/auth", get(auth))
}

/// What the template is told.
fn context(app: &AppState) -> tera::Context {
    let mut ctx = tera::Context::new();
    ctx.insert("version", env!("CARGO_PKG_VERSION"));
    ctx.insert("token_required", &app.auth.writes_closed);
    ctx.insert("watch_token_required", &app.auth.watches_closed);
    ctx.insert("read_token_required", &app.auth.reads_closed);
    ctx.insert("replica", &app.about.replica);
    ctx.insert("store", &app.about.store);
    ctx
}

/// Renders the page for `app`.
pub fn render(app: &AppState) -> Result<String, tera::Error> {
    TEMPLATES.render("index.html", &context(app))
}

/// The headers every dashboard answer carries.
fn safe(content_type: &'static str, cache: &'static str, body: impl IntoResponse) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    resp
}

async fn page(State(app): State<AppState>) -> Response {
    match render(&app) {
        Ok(html) => safe("text/html; charset=utf-8", "no-store", html),
        Err(e) => ApiError::Internal(anyhow::Error::new(e).context("rendering the dashboard"))
            .into_response(),
    }
}

async fn script() -> Response {
    safe("text/javascript; charset=utf-8", "no-cache", SCRIPT)
}

async fn style() -> Response {
    safe("text/css; charset=utf-8", "no-cache", STYLE)
}

async fn icon() -> Response {
    safe("image/svg+xml", "no-cache", ICON)
}

/// What the bearer token may do, for the page to show before the operator acts: `204` for
/// `BAKER_TOKEN` (everything) or when no token is needed for anything, `200` with `{"name",
/// "role", "scope", "reads", "changes"}` for another token the directory knows (`changes`: it
/// may change routes and drains, of the services in its scope), `401` for a token the directory
/// does not know.
async fn auth(State(app): State<AppState>, headers: HeaderMap) -> Response {
    match app.auth.writer(&headers) {
        Ok(Some(t)) if !t.listed && t.role == Role::Admin => {
            safe("text/plain", "no-store", StatusCode::NO_CONTENT)
        }
        Ok(Some(t)) => {
            let body = serde_json::json!({
                "name": t.name,
                "role": t.role.as_str(),
                "scope": t.scope.to_string(),
                "reads": t.role != Role::Register,
                "changes": matches!(t.role, Role::Operate | Role::Admin),
            });
            safe("application/json", "no-store", body.to_string())
        }
        Ok(None) if !app.auth.writes_closed && !app.auth.reads_closed => {
            safe("text/plain", "no-store", StatusCode::NO_CONTENT)
        }
        Ok(None) => ApiError::Unauthorized("missing bearer token").into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_parses_and_escapes() {
        let mut ctx = tera::Context::new();
        ctx.insert("version", "<script>alert(1)</script>");
        ctx.insert("token_required", &true);
        ctx.insert("watch_token_required", &false);
        ctx.insert("read_token_required", &false);
        ctx.insert("replica", "<b>host</b>:7700");
        ctx.insert("store", "memory");
        let html = TEMPLATES.render("index.html", &ctx).unwrap();
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;&#x2F;script&gt;"),
            "{html}"
        );
        assert!(html.contains(r#"<script src="/ui/app.js" defer></script>"#));
        assert!(html.contains("&lt;b&gt;host&lt;&#x2F;b&gt;:7700"), "{html}");
    }

    #[test]
    fn the_header_names_the_replica_and_its_store() {
        let listen: SocketAddr = "0.0.0.0:7700".parse().unwrap();
        let about = About::new(
            "dir-a",
            listen,
            &StoreMode::Memory,
            Path::new("/var/lib/baker"),
        );
        assert_eq!(about.replica, "dir-a:7700");
        assert_eq!(
            about.store,
            "memory (routes and drains kept in /var/lib/baker)"
        );
        let store: StoreMode = "etcd://etcd-1:2379,etcd-2:2379,etcd-3:2379"
            .parse()
            .unwrap();
        let about = About::new("dir-b", listen, &store, Path::new("./data"));
        assert_eq!(
            about.store,
            "etcd (etcd-1:2379, etcd-2:2379, etcd-3:2379, prefix /baker)"
        );
        // With no readable hostname, the address it listens on.
        let about = About::new("", "10.0.0.5:7701".parse().unwrap(), &store, Path::new("."));
        assert_eq!(about.replica, "10.0.0.5:7701");
    }

    #[test]
    fn the_header_never_shows_credentials_of_an_etcd_member() {
        // BAKER_STORE refuses credentials in a member; a member given some anyway (built
        // directly) is still shown by host and port only.
        assert!("etcd://root:pw@etcd-1:2379".parse::<StoreMode>().is_err());
        let store = StoreMode::Etcd(crate::etcd::StoreUrl {
            endpoints: vec![
                "http://root:s3cret@etcd-1:2379".into(),
                "https://u:p@w@etcd-2:2379".into(),
            ],
            prefix: "/team".into(),
            tls: None,
        });
        let about = About::new("dir", "[::]:7700".parse().unwrap(), &store, Path::new("."));
        assert_eq!(about.store, "etcd (etcd-1:2379, etcd-2:2379, prefix /team)");
        assert!(!about.store.contains("s3cret") && !about.store.contains("root"));
    }

    #[test]
    fn the_page_has_no_inline_script_or_style() {
        // The CSP allows only 'self': an inline script or style would be blocked, so none
        // may be written.
        let lower = PAGE.to_lowercase();
        assert_eq!(lower.matches("<script").count(), 1);
        assert!(!lower.contains("<style"));
        assert!(!lower.contains(" style="));
        let handler = lower.split(" on").skip(1).find(|rest| {
            let name: String = rest.chars().take_while(char::is_ascii_alphabetic).collect();
            !name.is_empty() && rest[name.len()..].starts_with('=')
        });
        assert!(handler.is_none(), "an inline event handler: on{handler:?}");
        assert!(!lower.contains("http://") && !lower.contains("https://"));
        assert!(!SCRIPT.contains("innerHTML") && !SCRIPT.contains("insertAdjacentHTML"));
        assert!(!SCRIPT.contains("eval(") && !SCRIPT.contains("new Function"));
    }
}
