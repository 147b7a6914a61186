//! Test helper: a real headless Chromium (Debian's `/usr/bin/chromium`) driven over the
//! DevTools protocol, and the `ui` server of the `ui_fixture` binary.
//!
//! Include it with `#[path = "support/browser.rs"] mod browser;`. When Chromium is
//! missing the helper panics saying how to install it (`scripts/test.sh` does): tests
//! never skip. Every console error, uncaught exception and browser log error of every
//! page is collected, so a test can assert that none happened. Screenshots go to
//! `target/ui-screenshots/`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chromiumoxide::cdp::browser_protocol::log::{EventEntryAdded, LogEntryLevel};
use chromiumoxide::cdp::js_protocol::runtime::{
    ConsoleApiCalledType, EventConsoleApiCalled, EventExceptionThrown,
};
use chromiumoxide::page::ScreenshotParams;
use chromiumoxide::{Browser, BrowserConfig, Page};
use futures_util::StreamExt;

/// Where Debian's chromium package puts the browser.
pub(crate) const CHROMIUM: &str = "/usr/bin/chromium";
/// How long a condition in the page may take.
pub(crate) const DEADLINE: Duration = Duration::from_secs(30);

/// A headless Chromium with a fresh profile; closed on drop.
pub(crate) struct Chromium {
    pub browser: Browser,
    handler: tokio::task::JoinHandle<()>,
    errors: Arc<Mutex<Vec<String>>>,
    _profile: tempfile::TempDir,
}

impl Chromium {
    /// Starts the browser. Panics, naming the fix, when it is not installed.
    pub(crate) async fn launch() -> Self {
        assert!(
            Path::new(CHROMIUM).is_file(),
            "the web page tests need Chromium at {CHROMIUM}: install it with `apt-get install -y chromium chromium-driver` (scripts/test.sh does this)"
        );
        let profile = tempfile::tempdir().expect("profile dir");
        let config = BrowserConfig::builder()
            .chrome_executable(CHROMIUM)
            .no_sandbox()
            .user_data_dir(profile.path())
            .window_size(1400, 1000)
            .viewport(None)
            .args([
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .launch_timeout(Duration::from_secs(60))
            .build()
            .expect("browser config");
        let (browser, mut handler) = Browser::launch(config).await.expect("launch chromium");
        let handler = tokio::spawn(async move { while handler.next().await.is_some() {} });
        Self {
            browser,
            handler,
            errors: Arc::default(),
            _profile: profile,
        }
    }

    /// Opens `url` in a new tab and records its console errors.
    pub(crate) async fn open(&self, url: &str) -> Page {
        let page = self
            .browser
            .new_page("about:blank")
            .await
            .expect("new page");
        page.enable_log().await.expect("enable log");
        page.enable_runtime().await.expect("enable runtime");
        let mut console = page
            .event_listener::<EventConsoleApiCalled>()
            .await
            .expect("console listener");
        let mut exceptions = page
            .event_listener::<EventExceptionThrown>()
            .await
            .expect("exception listener");
        let mut log = page
            .event_listener::<EventEntryAdded>()
            .await
            .expect("log listener");
        let errors = self.errors.clone();
        tokio::spawn(async move {
            while let Some(e) = console.next().await {
                if matches!(
                    e.r#type,
                    ConsoleApiCalledType::Error
                        | ConsoleApiCalledType::Warning
                        | ConsoleApiCalledType::Assert
                ) {
                    let text: Vec<String> = e
                        .args
                        .iter()
                        .map(|a| {
                            a.value.as_ref().map_or_else(
                                || a.description.clone().unwrap_or_default(),
                                |v| v.to_string(),
                            )
                        })
                        .collect();
                    errors
                        .lock()
                        .unwrap()
                        .push(format!("console: {}", text.join(" ")));
                }
            }
        });
        let errors = self.errors.clone();
        tokio::spawn(async move {
            while let Some(e) = exceptions.next().await {
                let d = &e.exception_details;
                let what = d
                    .exception
                    .as_ref()
                    .and_then(|x| x.description.clone())
                    .unwrap_or_default();
                errors.lock().unwrap().push(format!(
                    "exception: {} {what} at {}:{}",
                    d.text, d.line_number, d.column_number
                ));
            }
        });
        let errors = self.errors.clone();
        tokio::spawn(async move {
            while let Some(e) = log.next().await {
                if matches!(e.entry.level, LogEntryLevel::Error | LogEntryLevel::Warning) {
                    errors.lock().unwrap().push(format!(
                        "browser log: {} {}",
                        e.entry.text,
                        e.entry.url.clone().unwrap_or_default()
                    ));
                }
            }
        });
        page.goto(url).await.expect("navigate");
        page
    }

    /// Every console error, exception and browser log error seen so far.
    pub(crate) fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }

    /// Panics listing every console error, exception and browser log error seen.
    pub(crate) fn assert_no_errors(&self) {
        let errors = self.errors();
        assert!(errors.is_empty(), "JavaScript/browser errors: {errors:#?}");
    }

    /// Closes the browser and waits for its process.
    pub(crate) async fn close(mut self) {
        let _ = self.browser.close().await;
        let _ = self.browser.wait().await;
        self.handler.abort();
    }
}

/// Opens the runs list, waits until run `run_id` is listed (it may just be starting),
/// then goes to its run page.
pub(crate) async fn open_run_page(chromium: &Chromium, url: &str, run_id: &str) -> Page {
    let page = chromium.open(&format!("{url}/")).await;
    wait_for(
        &page,
        "the run in the list",
        &format!("document.querySelector('#runs-rows tr.run[data-run-id=\"{run_id}\"]')"),
    )
    .await;
    page.goto(format!("{url}/runs/{run_id}"))
        .await
        .expect("open the run page");
    page
}

/// Clicks the element `selector` finds (panics naming it when there is none).
pub(crate) async fn click(page: &Page, selector: &str) {
    page.find_element(selector)
        .await
        .unwrap_or_else(|e| panic!("no element {selector}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("cannot click {selector}: {e}"));
}

/// Evaluates `js` (an expression) and returns its JSON value.
pub(crate) async fn eval(page: &Page, js: &str) -> serde_json::Value {
    page.evaluate(js)
        .await
        .unwrap_or_else(|e| panic!("evaluating {js}: {e}"))
        .into_value::<serde_json::Value>()
        .unwrap_or(serde_json::Value::Null)
}

/// Polls `js` until it is truthy; panics with `what` and the last value after the deadline.
pub(crate) async fn wait_for(page: &Page, what: &str, js: &str) -> serde_json::Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let v = page
            .evaluate(js)
            .await
            .ok()
            .and_then(|r| r.into_value::<serde_json::Value>().ok())
            .unwrap_or(serde_json::Value::Null);
        let truthy = match &v {
            serde_json::Value::Null => false,
            serde_json::Value::Bool(b) => *b,
            serde_json::Value::Number(n) => n.as_f64() != Some(0.0),
            serde_json::Value::String(s) => !s.is_empty(),
            serde_json::Value::Array(a) => !a.is_empty(),
            serde_json::Value::Object(_) => true,
        };
        if truthy {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what} (`{js}` was {v})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `target/ui-screenshots/<name>.png`.
pub(crate) fn screenshot_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let target = exe
        .ancestors()
        .nth(3)
        .expect("target/<profile>/deps/exe")
        .to_path_buf();
    let dir = target.join("ui-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir.join(format!("{name}.png"))
}

/// Saves a full-page screenshot of `page` under `target/ui-screenshots/`.
pub(crate) async fn screenshot(page: &Page, name: &str) {
    let png = page
        .screenshot(ScreenshotParams::builder().full_page(true).build())
        .await
        .expect("screenshot");
    std::fs::write(screenshot_path(name), png).expect("write screenshot");
}

/// The `ui_fixture` binary with its own solidflow home and coordination dir.
pub(crate) struct Fixture {
    pub home: tempfile::TempDir,
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub(crate) fn new() -> Self {
        let fixture = Self {
            home: tempfile::tempdir().expect("home"),
            dir: tempfile::tempdir().expect("dir"),
        };
        let configs = [
            ("fs.yaml", "storage: {filesystem: {}}\n"),
            (
                "mp.yaml",
                "storage: {filesystem: {}}\nexecution: {multiprocess: {}}\n",
            ),
        ];
        for (name, text) in configs {
            std::fs::write(fixture.dir.path().join(name), text).expect("config");
        }
        fixture
    }

    /// A command for the fixture binary.
    pub(crate) fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ui_fixture"));
        cmd.env("SOLIDFLOW_HOME", self.home.path())
            .env("SF_UI_DIR", self.dir.path())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        cmd
    }

    /// Executes `pipeline` to the end (with filesystem storage) and returns its exit code.
    pub(crate) fn execute(&self, pipeline: &str, run_id: &str) -> i32 {
        let status = self
            .spawn_execute(pipeline, run_id)
            .wait()
            .expect("wait for the fixture");
        status.code().unwrap_or(-1)
    }

    /// Starts `execute` of `pipeline` (with filesystem storage) in the background.
    pub(crate) fn spawn_execute(&self, pipeline: &str, run_id: &str) -> Child {
        self.spawn_execute_with(pipeline, run_id, "fs.yaml")
    }

    /// Starts `execute` of `pipeline` with config file `config` (`fs.yaml`: filesystem
    /// storage; `mp.yaml`: that and the multiprocess executor).
    pub(crate) fn spawn_execute_with(&self, pipeline: &str, run_id: &str, config: &str) -> Child {
        let config = self.dir.path().join(config);
        self.command()
            .args(["execute", pipeline, "-c"])
            .arg(&config)
            .args(["--run-id", run_id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the fixture")
    }

    /// Creates the coordination file `name`.
    pub(crate) fn touch(&self, name: &str) {
        std::fs::write(self.dir.path().join(name), "").expect("touch");
    }

    /// Starts `ui --port 0` and waits for the URL it prints.
    pub(crate) fn ui(&self) -> UiServer {
        self.ui_on(0)
    }

    /// Starts `ui --port <port>` (0: any free port) and waits for the URL it prints.
    pub(crate) fn ui_on(&self, port: u16) -> UiServer {
        let mut child = self
            .command()
            .args(["ui", "--port", &port.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start ui");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx.recv_timeout(DEADLINE).expect("ui printed no URL");
        let url = line
            .strip_prefix("solidflow ui: ")
            .unwrap_or_else(|| panic!("unexpected first line from ui: {line}"))
            .trim_end_matches('/')
            .to_string();
        UiServer { child, url }
    }
}

/// A running `ui`; killed on drop.
pub(crate) struct UiServer {
    child: Child,
    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub url: String,
}

impl UiServer {
    /// The port it listens on.
    pub(crate) fn port(&self) -> u16 {
        self.url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port in the ui URL")
    }
}

impl Drop for UiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
