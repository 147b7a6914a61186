//! Test helper: a real Dask cluster (`dask scheduler` + `dask worker` processes) on free
//! loopback ports, torn down on drop.
//!
//! Include it from an integration test with
//! `#[path = "support/dask.rs"] mod dask_support;`.
//!
//! The processes come from the venv made by `scripts/python-env.sh` (`.venv/bin/dask`,
//! or the `dask` next to `$SOLIDFLOW_PYTHON`). When it is missing the helper panics and
//! says to run that script: tests never skip silently. Every process is started in its
//! own process group, waited for with deadlines (never fixed sleeps), and killed with
//! its group (nanny and worker) on drop.
#![allow(dead_code)]

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long scheduler and workers may take to come up.
const STARTUP_DEADLINE: Duration = Duration::from_secs(60);

/// The repository root.
pub(crate) fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Python interpreter with dask + distributed: `$SOLIDFLOW_PYTHON` or `.venv/bin/python`.
/// Panics, naming the fix, when it is missing.
pub(crate) fn python() -> PathBuf {
    let python = std::env::var_os("SOLIDFLOW_PYTHON")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"));
    assert!(
        python.exists(),
        "the Dask tests need Python with dask + distributed, but {} does not exist: run scripts/python-env.sh \
         (it creates .venv from python/requirements.txt), or set SOLIDFLOW_PYTHON",
        python.display()
    );
    python
}

/// The `dask` command of that venv.
pub(crate) fn dask_cli() -> PathBuf {
    let python = python();
    let dask = python
        .parent()
        .map(|d| d.join("dask"))
        .unwrap_or_else(|| repo_root().join(".venv/bin/dask"));
    assert!(
        dask.is_file(),
        "the Dask tests need the `dask` command next to {}, but {} does not exist: run scripts/python-env.sh",
        python.display(),
        dask.display()
    );
    dask
}

/// A free TCP port on 127.0.0.1 (the listener is closed before returning).
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local addr")
        .port()
}

struct Proc {
    child: Child,
    log: PathBuf,
    alive: bool,
}

impl Proc {
    fn kill(&mut self) {
        if self.alive {
            // The child leads its own process group: kill the nanny and its worker too.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.child.id())])
                .stderr(Stdio::null())
                .status();
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.alive = false;
        }
    }

    fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }
}

/// One worker to start: its name and `--resources`.
#[derive(Debug, Clone, Default)]
pub(crate) struct WorkerSpec {
    /// `--name`.
    pub name: String,
    /// `--resources`, e.g. `GPU=1`.
    pub resources: Option<String>,
    /// `--nthreads` (default 1).
    pub nthreads: u32,
    /// Extra environment variables for the worker process (and so for the step
    /// processes it starts), e.g. the worker's own AWS credentials.
    pub env: Vec<(String, String)>,
}

impl WorkerSpec {
    /// A worker with one thread and no resources.
    pub(crate) fn plain(name: &str) -> Self {
        Self {
            name: name.into(),
            resources: None,
            nthreads: 1,
            env: Vec::new(),
        }
    }

    /// A worker with one thread and these resources (`"GPU=1"`).
    pub(crate) fn with_resources(name: &str, resources: &str) -> Self {
        Self {
            name: name.into(),
            resources: Some(resources.into()),
            nthreads: 1,
            env: Vec::new(),
        }
    }

    /// Adds an environment variable for this worker.
    pub(crate) fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// A throwaway certificate authority and certificates signed by it, made with the
/// `openssl` command in a temporary directory (removed on drop): `server_*` for the
/// scheduler and workers, `client_*` for a Dask client. Both leaf certificates are for
/// `127.0.0.1` (IP SAN) and `localhost`.
pub(crate) struct TlsFiles {
    /// The CA certificate (PEM).
    pub ca_file: PathBuf,
    /// Certificate of the scheduler and workers (server and client use).
    pub server_cert: PathBuf,
    /// Key of `server_cert`.
    pub server_key: PathBuf,
    /// Certificate for a client of the cluster.
    pub client_cert: PathBuf,
    /// Key of `client_cert`.
    pub client_key: PathBuf,
    dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "the Dask TLS tests need the `openssl` command to make test certificates, but it \
                 cannot be run ({e}): install OpenSSL (e.g. `apt-get install openssl`)"
            )
        });
    assert!(
        output.status.success(),
        "openssl {} failed ({}):\n{}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl TlsFiles {
    /// Makes a CA (P-256, valid one day) and a server and a client certificate signed
    /// by it. Panics, naming the fix, when `openssl` is missing.
    pub(crate) fn generate() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("solidflow-dask-tls-")
            .tempdir()
            .expect("temp dir");
        let d = dir.path();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=solidflow test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(d, &ca);
        for (name, cn, usage) in [
            ("server", "127.0.0.1", "serverAuth,clientAuth"),
            ("client", "solidflow test client", "clientAuth"),
        ] {
            let ext = format!("{name}.ext");
            std::fs::write(
                d.join(&ext),
                format!(
                    "basicConstraints=CA:FALSE\n\
                     keyUsage=critical,digitalSignature,keyEncipherment\n\
                     extendedKeyUsage={usage}\n\
                     subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                ),
            )
            .expect("write openssl extensions");
            let (key, csr, cert) = (
                format!("{name}-key.pem"),
                format!("{name}.csr"),
                format!("{name}.pem"),
            );
            let subj = format!("/CN={cn}");
            let mut req = vec!["req", "-new"];
            req.extend(ec);
            req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
            openssl(d, &req);
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca-key.pem",
                    "-set_serial",
                    if name == "server" { "2" } else { "3" },
                    "-days",
                    "1",
                    "-extfile",
                    &ext,
                    "-out",
                    &cert,
                ],
            );
        }
        Self {
            ca_file: d.join("ca.pem"),
            server_cert: d.join("server.pem"),
            server_key: d.join("server-key.pem"),
            client_cert: d.join("client.pem"),
            client_key: d.join("client-key.pem"),
            dir,
        }
    }

    /// The `--tls-*` options of `dask scheduler` / `dask worker`.
    fn dask_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for (flag, path) in [
            ("--tls-ca-file", &self.ca_file),
            ("--tls-cert", &self.server_cert),
            ("--tls-key", &self.server_key),
        ] {
            args.push(flag.to_string());
            args.push(path.to_str().expect("UTF-8 temp path").to_string());
        }
        args
    }
}

/// A running scheduler and its workers.
pub(crate) struct DaskCluster {
    scheduler: Proc,
    workers: Vec<(WorkerSpec, Proc, String)>,
    /// `tcp://<host>:<port>` (`tcp://127.0.0.1:<port>` unless started with [`DaskCluster::start_on`],
    /// `tls://...` when started with [`DaskCluster::start_tls`]).
    pub address: String,
    host: String,
    /// `--tls-*` options for workers, empty without TLS.
    tls_args: Vec<String>,
    /// The scheduler's arguments, to start it again on the same port.
    scheduler_args: Vec<String>,
    /// Environment variables for every process of the cluster (e.g. `TMPDIR`).
    env: Vec<(String, String)>,
    dir: tempfile::TempDir,
}

fn spawn(cmd: &mut Command, log: &Path) -> Proc {
    use std::os::unix::process::CommandExt;
    let file = std::fs::File::create(log).expect("create process log");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("clone log file"))
        .stderr(file)
        .process_group(0)
        .env("PYTHONUNBUFFERED", "1")
        // Never fall through to the cloud metadata service (169.254.169.254).
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e} (run scripts/python-env.sh)"));
    Proc {
        child,
        log: log.to_path_buf(),
        alive: true,
    }
}

fn wait_for_log(proc: &mut Proc, needle: &str, what: &str) -> String {
    let deadline = Instant::now() + STARTUP_DEADLINE;
    loop {
        let text = proc.log_text();
        if let Some(line) = text.lines().find(|l| l.contains(needle)) {
            return line.to_string();
        }
        if let Ok(Some(status)) = proc.child.try_wait() {
            proc.alive = false;
            panic!("{what} exited ({status}) before it was ready; its log:\n{text}");
        }
        assert!(
            Instant::now() < deadline,
            "{what} not ready within {STARTUP_DEADLINE:?}; its log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl DaskCluster {
    /// Starts a scheduler and these workers on 127.0.0.1, and waits until every worker
    /// registered.
    pub(crate) fn start(workers: &[WorkerSpec]) -> Self {
        Self::start_on("127.0.0.1", workers)
    }

    /// Like [`start`](Self::start), with scheduler and workers listening on `host`, which
    /// must be a loopback address (tests never listen elsewhere).
    pub(crate) fn start_on(host: &str, workers: &[WorkerSpec]) -> Self {
        Self::launch(host, workers, None, &[])
    }

    /// Like [`start`](Self::start), with `env` set for the scheduler and every worker
    /// (e.g. `TMPDIR`, so a test can check what the cluster's processes leave there).
    pub(crate) fn start_with_env(workers: &[WorkerSpec], env: &[(&str, &Path)]) -> Self {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.display().to_string()))
            .collect();
        Self::launch("127.0.0.1", workers, None, &env)
    }

    /// Like [`start`](Self::start), but scheduler and workers speak TLS (`--protocol tls`)
    /// with the server certificate of `tls`: the address is `tls://127.0.0.1:<port>`,
    /// and clients need the CA and a client certificate of `tls`.
    pub(crate) fn start_tls(tls: &TlsFiles, workers: &[WorkerSpec]) -> Self {
        Self::launch("127.0.0.1", workers, Some(tls), &[])
    }

    fn launch(
        host: &str,
        workers: &[WorkerSpec],
        tls: Option<&TlsFiles>,
        env: &[(String, String)],
    ) -> Self {
        let ip: std::net::IpAddr = host.parse().expect("start_on takes an IP address");
        assert!(
            ip.is_loopback(),
            "tests only listen on loopback, not {host}"
        );
        let dask = dask_cli();
        let dir = tempfile::Builder::new()
            .prefix("solidflow-dask-")
            .tempdir()
            .expect("temp dir");
        let port = free_port();
        let protocol = if tls.is_some() { "tls" } else { "tcp" };
        let address = format!("{protocol}://{host}:{port}");
        let tls_args = tls.map(TlsFiles::dask_args).unwrap_or_default();
        let mut scheduler_args: Vec<String> = [
            "scheduler",
            "--host",
            host,
            "--port",
            &port.to_string(),
            "--dashboard-address",
            ":0",
            "--no-show",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if tls.is_some() {
            scheduler_args.extend(["--protocol".to_string(), "tls".to_string()]);
        }
        scheduler_args.extend(tls_args.iter().cloned());
        let mut scheduler = spawn(
            Command::new(&dask)
                .args(&scheduler_args)
                .envs(env.iter().map(|(k, v)| (k, v)))
                // Builds shipped with `ship_binary` live in the cluster's temp dir.
                .env("SOLIDFLOW_BUILD_STORE", dir.path().join("builds"))
                .current_dir(dir.path()),
            &dir.path().join("scheduler.log"),
        );
        wait_for_log(&mut scheduler, "Scheduler at:", "dask scheduler");
        let mut cluster = Self {
            scheduler,
            workers: Vec::new(),
            address,
            host: host.to_string(),
            tls_args,
            scheduler_args,
            env: env.to_vec(),
            dir,
        };
        for spec in workers {
            cluster.add_worker(spec.clone());
        }
        cluster
    }

    /// Starts one more worker and waits until it registered. Returns its index.
    pub(crate) fn add_worker(&mut self, spec: WorkerSpec) -> usize {
        let log = self.dir.path().join(format!("worker-{}.log", spec.name));
        let mut cmd = Command::new(dask_cli());
        cmd.args([
            "worker",
            &self.address,
            "--host",
            &self.host,
            "--no-dashboard",
            "--death-timeout",
            "60",
        ])
        .args([
            "--nthreads",
            &spec.nthreads.max(1).to_string(),
            "--name",
            &spec.name,
        ])
        .args(&self.tls_args)
        .env("SOLIDFLOW_BIN_CACHE", self.bin_cache_of(&spec.name))
        .current_dir(self.dir.path());
        if let Some(r) = &spec.resources {
            cmd.args(["--resources", r]);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
        let mut proc = spawn(&mut cmd, &log);
        let line = wait_for_log(
            &mut proc,
            "Start worker at:",
            &format!("dask worker {}", spec.name),
        );
        let worker_address = line
            .rsplit("Start worker at:")
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        wait_for_log(
            &mut proc,
            "Registered to:",
            &format!("dask worker {}", spec.name),
        );
        self.workers.push((spec, proc, worker_address));
        self.workers.len() - 1
    }

    fn bin_cache_of(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("bin-{name}"))
    }

    /// The cache of shipped builds of worker `i` (`$SOLIDFLOW_BIN_CACHE`, unless its
    /// spec sets another): one file per build, named by its sha256.
    pub(crate) fn bin_cache(&self, i: usize) -> PathBuf {
        self.bin_cache_of(&self.workers[i].0.name)
    }

    /// The process id of the scheduler.
    pub(crate) fn scheduler_pid(&self) -> u32 {
        self.scheduler.child.id()
    }

    /// The address (`tcp://127.0.0.1:<port>`) of worker `i`.
    pub(crate) fn worker_address(&self, i: usize) -> &str {
        &self.workers[i].2
    }

    /// Index of the worker named `name`.
    pub(crate) fn worker_named(&self, name: &str) -> usize {
        self.workers
            .iter()
            .position(|(s, _, _)| s.name == name)
            .expect("worker name")
    }

    /// The scheduler's dashboard as `tcp://127.0.0.1:<port>` (an HTTP server, not the
    /// scheduler: what a user gets when they give the dashboard's port by mistake).
    pub(crate) fn dashboard_address(&self) -> String {
        let log = self.scheduler.log_text();
        let line = log
            .lines()
            .find(|l| l.contains("dashboard at:"))
            .unwrap_or_else(|| panic!("the scheduler log names no dashboard:\n{log}"));
        let url = line.rsplit("http://").next().unwrap_or("");
        let host_port = url.split('/').next().unwrap_or("");
        format!("tcp://{host_port}")
    }

    /// Kills the scheduler with SIGKILL. Its workers notice and shut down.
    pub(crate) fn kill_scheduler(&mut self) {
        self.scheduler.kill();
    }

    /// Starts the scheduler again on the same address (after [`kill_scheduler`](Self::kill_scheduler)),
    /// as a supervisor such as systemd or Kubernetes would, and waits until it listens.
    pub(crate) fn restart_scheduler(&mut self) {
        self.scheduler.kill();
        let log = self.dir.path().join("scheduler-restarted.log");
        let mut scheduler = spawn(
            Command::new(dask_cli())
                .args(&self.scheduler_args)
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .env("SOLIDFLOW_BUILD_STORE", self.dir.path().join("builds"))
                .current_dir(self.dir.path()),
            &log,
        );
        wait_for_log(&mut scheduler, "Scheduler at:", "restarted dask scheduler");
        self.scheduler = scheduler;
    }

    /// Kills worker `i` (nanny and worker process) with SIGKILL.
    pub(crate) fn kill_worker(&mut self, i: usize) {
        self.workers[i].1.kill();
    }

    /// The logs of the scheduler and every worker, for failure messages.
    pub(crate) fn logs(&self) -> String {
        let mut out = format!("--- scheduler ---\n{}", self.scheduler.log_text());
        for (spec, proc, _) in &self.workers {
            out.push_str(&format!(
                "\n--- worker {} ---\n{}",
                spec.name,
                proc.log_text()
            ));
        }
        out
    }

    /// Process ids of the scheduler and workers that are still running.
    pub(crate) fn pids(&self) -> Vec<u32> {
        std::iter::once(&self.scheduler)
            .chain(self.workers.iter().map(|(_, p, _)| p))
            .filter(|p| p.alive)
            .map(|p| p.child.id())
            .collect()
    }
}

impl Drop for DaskCluster {
    fn drop(&mut self) {
        for (_, proc, _) in &mut self.workers {
            proc.kill();
        }
        self.scheduler.kill();
    }
}

/// Whether a process is running (a zombie counts as exited).
pub(crate) fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Every descendant process of `pid` (children, grandchildren, ...), from /proc.
pub(crate) fn descendants(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat"))
                && let Some(rest) = stat.rsplit(')').next()
            {
                let fields: Vec<&str> = rest.split_whitespace().collect();
                if fields.first() == Some(&"Z") {
                    continue;
                }
                if let Some(ppid) = fields.get(1).and_then(|s| s.parse().ok()) {
                    parents.push((p, ppid));
                }
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for &(child, parent) in &parents {
            if parent == p && !out.contains(&child) {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out
}
