//! A real headless Chromium for end-to-end tests of the dashboard, driven over the DevTools
//! protocol: a small client on the page's websocket that evaluates script, clicks and types as
//! a person would (mouse and keyboard events, not `element.click()`), waits on conditions and
//! takes screenshots.
//!
//! Every page gets a probe before its own scripts run: `alert`, `confirm` and `prompt` are
//! recorded instead of shown, and so is every Content-Security-Policy violation, so a test can
//! check that nothing it put in the page ran as script ([`Page::script_activity`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{eventually, Proc};

/// How long one DevTools call may take before the test fails.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The browser tests use: `chromium` on `PATH`, else `/usr/bin/chromium`.
pub fn chromium_bin() -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = PathBuf::from(dir).join("chromium");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("/usr/bin/chromium")
}

/// Whether Chromium runs here (`chromium --version`).
pub fn chromium_available() -> bool {
    std::process::Command::new(chromium_bin())
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The directory test artefacts go to: `target/<what>` (beside `target/<profile>/`).
pub fn artefacts(what: &str) -> PathBuf {
    let bin = crate::bin("baker-directory");
    let target = bin
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let dir = target.join(what);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// A headless Chromium with a throw-away profile, killed (with its helpers) when dropped.
pub struct Browser {
    pub proc: Proc,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium with a `width`×`height` window and waits for its DevTools endpoint.
    pub async fn start(width: u32, height: u32) -> Browser {
        let profile = tempfile::Builder::new()
            .prefix("baker-chromium-")
            .tempdir()
            .expect("creating a browser profile");
        let window = format!("--window-size={width},{height}");
        let data = format!("--user-data-dir={}", profile.path().display());
        let args = [
            "--headless",
            // Tests run as root in containers, where Chromium's sandbox cannot start.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            window.as_str(),
            data.as_str(),
            "about:blank",
        ];
        let mut proc = Proc::spawn_group("chromium", chromium_bin(), &args, &[]);
        // Chromium writes the port it picked to DevToolsActivePort in its profile.
        let file = profile.path().join("DevToolsActivePort");
        let mut port = None;
        for _ in 0..1500 {
            if let Some(p) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
            {
                port = Some(p);
                break;
            }
            if let Some(status) = proc.try_status() {
                panic!(
                    "chromium exited ({status}) before opening its DevTools port; its log:\n{}",
                    proc.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let port = port.unwrap_or_else(|| {
            panic!(
                "chromium did not open its DevTools port within 30 s; its log:\n{}",
                proc.log_text()
            )
        });
        Browser {
            proc,
            port,
            _profile: profile,
        }
    }

    /// Opens `url` in the browser's page and waits until it has loaded.
    pub async fn open(&self, url: &str) -> Page {
        let list = format!("http://127.0.0.1:{}/json/list", self.port);
        let targets: Vec<Value> = eventually(Duration::from_secs(20), "chromium's page", || {
            let list = list.clone();
            async move {
                let t: Vec<Value> = reqwest::get(&list).await.ok()?.json().await.ok()?;
                t.iter().any(|t| t["type"] == "page").then_some(t)
            }
        })
        .await;
        let ws = targets
            .iter()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("a page with a DevTools websocket");
        let page = Page::connect(ws).await;
        page.call("Page.enable", json!({})).await;
        page.call("Runtime.enable", json!({})).await;
        page.call(
            "Page.addScriptToEvaluateOnNewDocument",
            json!({ "source": PROBE }),
        )
        .await;
        page.goto(url).await;
        page
    }
}

/// Run in every document before its own scripts: records dialogs and CSP violations.
const PROBE: &str = r#"
window.__probe = { dialogs: [], violations: [] };
for (const f of ['alert', 'confirm', 'prompt']) {
  window[f] = (m) => { window.__probe.dialogs.push(f + '(' + String(m) + ')'); return null; };
}
document.addEventListener('securitypolicyviolation', (e) => {
  window.__probe.violations.push(e.violatedDirective + ' blocked ' + (e.blockedURI || 'inline'));
});
"#;

type Sink = SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, Message>;
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// One page, driven over its DevTools websocket.
pub struct Page {
    sink: tokio::sync::Mutex<Sink>,
    pending: Pending,
    next: AtomicU64,
    /// Uncaught exceptions the page threw (`Runtime.exceptionThrown`).
    exceptions: Arc<Mutex<Vec<String>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Page {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Page {
    async fn connect(ws: &str) -> Page {
        let (stream, _) = tokio_tungstenite::connect_async(ws)
            .await
            .unwrap_or_else(|e| panic!("connecting to chromium's DevTools at {ws}: {e}"));
        let (sink, mut stream) = stream.split();
        let pending: Pending = Arc::default();
        let exceptions: Arc<Mutex<Vec<String>>> = Arc::default();
        let reader = {
            let (pending, exceptions) = (pending.clone(), exceptions.clone());
            tokio::spawn(async move {
                while let Some(Ok(msg)) = stream.next().await {
                    let Message::Text(text) = msg else { continue };
                    let Ok(v) = serde_json::from_str::<Value>(&text) else {
                        continue;
                    };
                    if let Some(id) = v["id"].as_u64() {
                        let waiter = pending
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&id);
                        if let Some(w) = waiter {
                            let _ = w.send(v);
                        }
                    } else if v["method"] == "Runtime.exceptionThrown" {
                        let d = &v["params"]["exceptionDetails"];
                        let text = d["exception"]["description"]
                            .as_str()
                            .or(d["text"].as_str())
                            .unwrap_or("an exception")
                            .to_owned();
                        exceptions
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(text);
                    }
                }
            })
        };
        Page {
            sink: tokio::sync::Mutex::new(sink),
            pending,
            next: AtomicU64::new(1),
            exceptions,
            reader,
        }
    }

    /// One DevTools call; panics with the browser's message when it fails.
    pub async fn call(&self, method: &str, params: Value) -> Value {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let msg = json!({ "id": id, "method": method, "params": params }).to_string();
        self.sink
            .lock()
            .await
            .send(Message::text(msg))
            .await
            .unwrap_or_else(|e| panic!("sending {method} to chromium: {e}"));
        let answer = tokio::time::timeout(CALL_TIMEOUT, rx)
            .await
            .unwrap_or_else(|_| panic!("chromium did not answer {method} within {CALL_TIMEOUT:?}"))
            .unwrap_or_else(|_| panic!("chromium closed the DevTools connection during {method}"));
        if let Some(err) = answer.get("error") {
            panic!("chromium refused {method}: {err}");
        }
        answer["result"].clone()
    }

    /// Navigates to `url` and waits until the document has loaded.
    pub async fn goto(&self, url: &str) {
        let r = self.call("Page.navigate", json!({ "url": url })).await;
        if let Some(e) = r["errorText"].as_str() {
            panic!("chromium could not open {url}: {e}");
        }
        self.wait_for(
            "document.readyState === 'complete' && location.href !== 'about:blank'",
            Duration::from_secs(20),
            "the page to load",
        )
        .await;
    }

    /// Reloads the page and waits until it has loaded.
    pub async fn reload(&self) {
        self.call("Page.reload", json!({})).await;
        self.wait_for(
            "document.readyState === 'complete'",
            Duration::from_secs(20),
            "the page to load again",
        )
        .await;
    }

    /// Gives the page a `width`×`height` viewport (as a phone or a tablet would), whatever the
    /// window's size, and waits until the page's layout has it.
    pub async fn resize(&self, width: u32, height: u32) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        )
        .await;
        self.wait_for(
            &format!("window.innerWidth === {width} && window.innerHeight === {height}"),
            Duration::from_secs(10),
            "the page to take its new size",
        )
        .await;
    }

    /// The value of a JavaScript expression in the page (promises are awaited); panics when it
    /// throws.
    pub async fn eval(&self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        if let Some(d) = r.get("exceptionDetails") {
            panic!(
                "evaluating {expression:?} threw: {}",
                d["exception"]["description"]
                    .as_str()
                    .or(d["text"].as_str())
                    .unwrap_or("an exception")
            );
        }
        r["result"]["value"].clone()
    }

    /// Waits until `expression` is truthy (not `false`, `null`, `0` or `""`) and returns it.
    pub async fn wait_for(&self, expression: &str, timeout: Duration, what: &str) -> Value {
        eventually(timeout, what, || async {
            let v = self.eval(expression).await;
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            truthy.then_some(v)
        })
        .await
    }

    /// The visible text of the first element matching `selector` (`""` when none matches).
    pub async fn text(&self, selector: &str) -> String {
        let expr = format!(
            "(document.querySelector({}) || {{ innerText: '' }}).innerText",
            json!(selector)
        );
        self.eval(&expr)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Clicks the middle of the first element matching `selector` with the mouse, after
    /// scrolling it into view; panics when no element matches or it is hidden.
    pub async fn click(&self, selector: &str) {
        let expr = format!(
            "(() => {{ const e = document.querySelector({}); if (!e) return null; \
             e.scrollIntoView({{ block: 'center' }}); const r = e.getBoundingClientRect(); \
             return [r.x + r.width / 2, r.y + r.height / 2, r.width * r.height]; }})()",
            json!(selector)
        );
        let at = self.eval(&expr).await;
        let (x, y, area) = match at.as_array().map(Vec::as_slice) {
            Some([x, y, area]) => (
                x.as_f64().unwrap_or(0.0),
                y.as_f64().unwrap_or(0.0),
                area.as_f64().unwrap_or(0.0),
            ),
            _ => panic!("no element matches {selector:?} to click"),
        };
        assert!(
            area > 0.0,
            "{selector:?} is not visible: it cannot be clicked"
        );
        for kind in ["mouseMoved", "mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
            )
            .await;
        }
    }

    /// Focuses the input matching `selector`, selects what it holds and types `text` over it.
    pub async fn type_into(&self, selector: &str, text: &str) {
        let expr = format!(
            "(() => {{ const e = document.querySelector({}); if (!e) return false; \
             e.focus(); e.select(); return document.activeElement === e; }})()",
            json!(selector)
        );
        assert!(
            self.eval(&expr).await == Value::Bool(true),
            "no focusable input matches {selector:?}"
        );
        self.call("Input.insertText", json!({ "text": text })).await;
    }

    /// Writes a PNG of the whole page (not only the window) to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let metrics = self.call("Page.getLayoutMetrics", json!({})).await;
        let size = &metrics["cssContentSize"];
        let (w, h) = (
            size["width"].as_f64().unwrap_or(1280.0),
            size["height"].as_f64().unwrap_or(800.0),
        );
        let shot = self
            .call(
                "Page.captureScreenshot",
                json!({
                    "format": "png",
                    "captureBeyondViewport": true,
                    "clip": { "x": 0, "y": 0, "width": w, "height": h, "scale": 1 },
                }),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap_or_default())
            .expect("a base64 screenshot");
        assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
        std::fs::write(path, png).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    /// Everything that ran, or tried to run, as script besides the page's own: dialogs opened,
    /// Content-Security-Policy violations, uncaught exceptions. Empty when all is well.
    pub async fn script_activity(&self) -> Vec<String> {
        let probe = self
            .eval("JSON.stringify(window.__probe || { dialogs: ['no probe'], violations: [] })")
            .await;
        let probe: Value = serde_json::from_str(probe.as_str().unwrap_or("{}")).unwrap_or_default();
        let mut out: Vec<String> = ["dialogs", "violations"]
            .iter()
            .flat_map(|k| probe[*k].as_array().cloned().unwrap_or_default())
            .map(|v| v.as_str().unwrap_or_default().to_owned())
            .collect();
        out.extend(
            self.exceptions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|e| format!("exception: {e}")),
        );
        out
    }
}
