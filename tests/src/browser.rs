//! A real headless Chromium for the UI tests, driven over WebDriver: one `chromedriver` process per
//! test ([`Driver::start`]), one browser per simulated person ([`Driver::browser`]), each with a
//! fresh profile so their storage (token, device id) is their own. chromedriver dies with the test
//! (`spawn_tied`) and takes its browsers with it.
//!
//! The binaries come from `PARLEY_CHROMIUM` / `PARLEY_CHROMEDRIVER`, else `chromium` and
//! `chromedriver` on `PATH` (`scripts/test.sh` installs both). A missing browser fails the test: the
//! UI is part of the product.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{json, Value};

use crate::node::spawn_tied;
use crate::{free_port, TempDir};

/// How long a UI expectation may take: a real browser on a loaded 2-core CI box, a WebSocket
/// reconnect with backoff, or a cluster's failover (lease TTL) behind it.
pub const UI_TIMEOUT: Duration = Duration::from_secs(30);

fn binary(env: &str, names: &[&str]) -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in names {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!("none of {names:?} is on PATH and {env} is not set: install chromium and chromium-driver (scripts/test.sh does)")
}

/// A running chromedriver.
pub struct Driver {
    url: String,
    child: Child,
    dir: TempDir,
}

impl Driver {
    pub async fn start() -> anyhow::Result<Driver> {
        let dir = TempDir::new("parley-chromedriver");
        let port = free_port();
        let mut cmd = Command::new(binary("PARLEY_CHROMEDRIVER", &["chromedriver"])?);
        cmd.arg(format!("--port={port}")).arg("--allowed-ips=127.0.0.1");
        // Its own process group, which its browsers inherit: dropping the driver kills them all, even
        // when a failed test never closed its sessions.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = spawn_tied(&mut cmd, &dir.path().join("chromedriver.log"))?;
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + UI_TIMEOUT;
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            if Instant::now() > deadline {
                bail!("chromedriver did not listen on {port}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Driver { url, child, dir })
    }

    /// A new headless browser with an empty profile.
    pub async fn browser(&self, name: &str) -> anyhow::Result<Browser> {
        let profile = TempDir::new(&format!("parley-chromium-{name}"));
        let chromium = binary("PARLEY_CHROMIUM", &["chromium", "chromium-browser", "google-chrome"])?;
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1200,900",
                    // Two people on one box: neither tab may be throttled as "in the background".
                    "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
                    "--disable-backgrounding-occluded-windows",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        });
        let Value::Object(caps) = caps else { unreachable!() };
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .with_context(|| format!("a chromium session for {name} (chromedriver log: {})", self.log()))?;
        Ok(Browser { client, name: name.to_string(), driver: self.url.clone(), _profile: profile })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("chromedriver.log")).unwrap_or_default()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One person's browser.
pub struct Browser {
    pub client: Client,
    pub name: String,
    /// chromedriver's URL, for the commands WebDriver has no verb for ([`Browser::cdp`]).
    driver: String,
    _profile: TempDir,
}

impl Browser {
    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.client.goto(url).await.with_context(|| format!("{}: open {url}", self.name))
    }

    /// Runs `script` (a function body; `arguments[i]` are `args`) in the page and returns its value.
    pub async fn eval(&self, script: &str, args: Vec<Value>) -> anyhow::Result<Value> {
        self.client.execute(script, args).await.with_context(|| format!("{}: script failed", self.name))
    }

    /// Polls `script` until it returns something truthy (not null/false/""/0/[]); returns that.
    /// On timeout the error says what was awaited and shows the page's visible text.
    pub async fn wait_for(&self, what: &str, script: &str, args: Vec<Value>) -> anyhow::Result<Value> {
        let deadline = Instant::now() + UI_TIMEOUT;
        loop {
            let v = self.eval(script, args.clone()).await?;
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::Array(a) => !a.is_empty(),
                Value::Object(_) => true,
            };
            if truthy {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("{}: timed out waiting for {what}; the page shows:\n{}", self.name, self.text().await);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// [`Browser::wait_for`] when only "it happened" matters.
    pub async fn wait_until(&self, what: &str, script: &str, args: Vec<Value>) -> anyhow::Result<()> {
        self.wait_for(what, script, args).await.map(|_| ())
    }

    /// The visible text of the page (for failure messages).
    pub async fn text(&self) -> String {
        match self.client.execute("return document.body.innerText", vec![]).await {
            Ok(Value::String(s)) => s,
            other => format!("<no text: {other:?}>"),
        }
    }

    /// Clicks the first element matching `css`, waiting (up to `UI_TIMEOUT`) for it to appear.
    /// The element is looked up again when the page replaced it between the lookup and the click
    /// (a list re-rendered by a live update: "stale element reference"), as a person would simply
    /// click the new one.
    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + UI_TIMEOUT;
        loop {
            let el = self.client.wait().at_most(UI_TIMEOUT).for_element(Locator::Css(css)).await;
            let el = el.with_context(|| format!("{}: no element {css}", self.name))?;
            match el.click().await {
                Err(e) if e.is_stale_element_reference() && Instant::now() < deadline => continue,
                done => return done.with_context(|| format!("{}: click {css}", self.name)),
            }
        }
    }

    /// Types into an input, the way a person would (key events, not a value assignment).
    pub async fn type_into(&self, css: &str, text: &str) -> anyhow::Result<()> {
        let el = self.client.wait().at_most(UI_TIMEOUT).for_element(Locator::Css(css)).await;
        let el = el.with_context(|| format!("{}: no element {css}", self.name))?;
        el.clear().await.with_context(|| format!("{}: clear {css}", self.name))?;
        el.send_keys(text).await.with_context(|| format!("{}: type into {css}", self.name))
    }

    /// Runs a Chrome DevTools Protocol command through chromedriver (`goog/cdp/execute`): what a
    /// test needs that no page script may do (grant a permission, deliver a push message to a
    /// service worker).
    pub async fn cdp(&self, cmd: &str, params: Value) -> anyhow::Result<Value> {
        let session = self.client.session_id().await?.context("no WebDriver session")?;
        let url = format!("{}/session/{session}/goog/cdp/execute", self.driver);
        let res = reqwest::Client::new().post(&url).json(&json!({ "cmd": cmd, "params": params })).send().await?;
        let status = res.status();
        let body: Value = res.json().await?;
        if !status.is_success() {
            bail!("{}: CDP {cmd} failed: HTTP {status}: {body}", self.name);
        }
        Ok(body["value"].clone())
    }

    /// Saves a screenshot next to the test's temp files, for a failure's post-mortem.
    pub async fn screenshot(&self, path: &std::path::Path) {
        if let Ok(png) = self.client.screenshot().await {
            let _ = std::fs::write(path, png);
        }
    }

    pub async fn close(self) {
        let _ = self.client.close().await;
    }
}
