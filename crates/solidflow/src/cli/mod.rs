//! The command line every pipeline binary gets from [`Repository::main`], which is
//! implemented here: the repository is a definition, the command line is this module's.
//!
//! Exit codes: 0 success, 1 pipeline failure, 2 bad config or usage, 130 interrupted.

mod console;
pub(crate) mod schema_text;

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};

pub use console::Console;

use crate::config::{ConfigSources, run_config_schema};
use crate::definition::pipeline::Pipeline;
use crate::definition::repository::Repository;
use crate::execution::cancel::CancelToken;
use crate::execution::event::Level;
use crate::execution::protocol::{StepInvocation, run_invocation};
use crate::execution::run::{PreparedRun, RunOptions, solidflow_home};
use crate::storage::run_history::{RunHistory, RunRecord, RunStatus};

/// Exit code for success.
pub const EXIT_SUCCESS: i32 = 0;
/// Exit code when the pipeline failed.
pub const EXIT_FAILURE: i32 = 1;
/// Exit code for bad config or usage.
pub const EXIT_USAGE: i32 = 2;
/// Exit code when the run was interrupted.
pub const EXIT_INTERRUPTED: i32 = 130;

#[derive(Parser)]
#[command(
    about = "Run and inspect the pipelines of this binary (solidflow).",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArgs {
    /// Run config file (YAML or JSON); repeat to merge several in order.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    config: Vec<PathBuf>,
    /// The mode to run in (default: the pipeline's first mode).
    #[arg(long)]
    mode: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// List the pipelines in this binary.
    List,
    /// Print the execution plan of a pipeline for a run config.
    Plan {
        /// The pipeline.
        pipeline: String,
        #[command(flatten)]
        config: ConfigArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Execute a pipeline.
    Execute {
        /// The pipeline.
        pipeline: String,
        #[command(flatten)]
        config: ConfigArgs,
        /// Print events as JSON lines on stdout instead of a human log.
        #[arg(long)]
        json: bool,
        /// Use this run id instead of a fresh UUID.
        #[arg(long)]
        run_id: Option<String>,
    },
    /// Print the run config a pipeline accepts, with defaults and docs.
    ConfigSchema {
        /// The pipeline.
        pipeline: String,
        /// The mode.
        #[arg(long)]
        mode: Option<String>,
        /// Print JSON instead of annotated YAML.
        #[arg(long)]
        json: bool,
    },
    /// List recent runs from run history.
    Runs {
        /// How many runs.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Print the events of a recorded run.
    Logs {
        /// The run id (a unique prefix is enough).
        run_id: String,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
        /// Keep printing new events until the run ends (watch a run live).
        #[arg(short, long)]
        follow: bool,
    },
    /// Serve the web page: runs, their DAGs, timelines and logs, live.
    Ui {
        /// The port to listen on (0 picks a free one).
        #[arg(long, default_value_t = 3000)]
        port: u16,
        /// The address to listen on. Anything but a loopback address requires a token.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// The access token (default: none on loopback, generated otherwise).
        #[arg(long, env = "SOLIDFLOW_UI_TOKEN")]
        token: Option<String>,
    },
    /// Run one step from a step invocation on stdin (used by out-of-process executors).
    #[command(hide = true)]
    Step,
}

impl Repository {
    /// Runs the solidflow CLI on the process arguments and exits with its code.
    /// This is what a pipeline binary's `main` calls; it also serves step mode for the
    /// out-of-process executors. Same as `std::process::exit(cli::run(&repo, args_os()))`.
    pub fn main(self) -> ! {
        let code = run(&self, std::env::args_os());
        std::process::exit(code)
    }
}

/// Writes to stdout. A closed stdout (`runs | head -1`, `list | grep -q`) ends the
/// command quietly with exit 0, as for other Unix tools; another write error (a full
/// disk behind `>`) is reported with exit 1. Only commands that run nothing print
/// through this: `execute --json` prints events through the [`Console`].
fn write_out(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(EXIT_SUCCESS);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(EXIT_FAILURE);
    }
}

/// `print!` through [`write_out`].
macro_rules! out {
    ($($arg:tt)*) => { write_out(format_args!($($arg)*)) };
}

/// `println!` through [`write_out`].
macro_rules! outln {
    ($($arg:tt)*) => { write_out(format_args!("{}\n", format_args!($($arg)*))) };
}

/// Runs the CLI with `args` (including the program name) and returns the exit code.
pub fn run<I: IntoIterator<Item = OsString>>(repository: &Repository, args: I) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                EXIT_USAGE
            } else {
                EXIT_SUCCESS
            };
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("SOLIDFLOW_LOG"))
        .with_writer(std::io::stderr)
        .try_init();
    match cli.command {
        Command::List => {
            for p in repository.pipelines() {
                outln!(
                    "{}\t{} solids\t{}",
                    p.name(),
                    p.invocations().len(),
                    p.description()
                );
            }
            EXIT_SUCCESS
        }
        Command::Plan {
            pipeline,
            config,
            json,
        } => with_pipeline(repository, &pipeline, |p| {
            // The same checks as `execute`, so what `plan` accepts `execute` runs.
            let options = RunOptions {
                mode: config.mode.clone(),
                home: Some(solidflow_home()),
                ..RunOptions::default()
            };
            let prepared = PreparedRun::new(p, &load_sources(&config)?, &options)
                .map_err(|e| e.to_string())?;
            let plan = prepared.plan();
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(plan).expect("plan serializes")
                );
            } else {
                out!("{plan}");
            }
            Ok(EXIT_SUCCESS)
        }),
        Command::ConfigSchema {
            pipeline,
            mode,
            json,
        } => with_pipeline(repository, &pipeline, |p| {
            let schema = run_config_schema(p, mode.as_deref()).map_err(|e| e.to_string())?;
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&schema).expect("schema serializes")
                );
            } else {
                out!("{}", schema_text::render(&schema));
            }
            Ok(EXIT_SUCCESS)
        }),
        Command::Execute {
            pipeline,
            config,
            json,
            run_id,
        } => with_pipeline(repository, &pipeline, |p| execute(p, &config, json, run_id)),
        Command::Runs { limit, json } => with_history(|h| {
            for run in h.runs(limit).map_err(|e| e.to_string())? {
                if json {
                    outln!("{}", serde_json::to_string(&run).expect("run serializes"));
                } else {
                    let ended = run
                        .ended_at
                        .map(|t| t.to_rfc3339())
                        .unwrap_or_else(|| "-".into());
                    outln!(
                        "{}\t{}\t{}\t{}\t{}",
                        run.run_id,
                        run.pipeline,
                        run.status,
                        run.started_at.to_rfc3339(),
                        ended
                    );
                }
            }
            Ok(EXIT_SUCCESS)
        }),
        Command::Logs {
            run_id,
            json,
            follow,
        } => with_history(|h| print_logs(h, &run_id, json, follow)),
        Command::Ui { port, host, token } => {
            let options = crate::ui::UiOptions {
                host,
                port,
                token,
                home: solidflow_home(),
            };
            match crate::ui::serve(repository.clone(), options) {
                Ok(()) => EXIT_SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    EXIT_USAGE
                }
            }
        }
        Command::Step => step_mode(repository),
    }
}

fn with_pipeline(
    repository: &Repository,
    name: &str,
    f: impl FnOnce(&Pipeline) -> Result<i32, String>,
) -> i32 {
    let Some(pipeline) = repository.pipeline(name) else {
        let names = repository.pipeline_names();
        let hint = crate::config::validate::did_you_mean(name, names.iter().copied())
            .map(|m| format!(" Did you mean `{m}`?"))
            .unwrap_or_default();
        eprintln!(
            "error: no pipeline `{name}` in repository `{}`.{hint} Pipelines: {}",
            repository.name(),
            names.join(", ")
        );
        return EXIT_USAGE;
    };
    f(pipeline).unwrap_or_else(|message| {
        eprintln!("error: {message}");
        EXIT_USAGE
    })
}

fn with_history(f: impl FnOnce(&RunHistory) -> Result<i32, String>) -> i32 {
    let path = solidflow_home().join("history.db");
    match RunHistory::open(&path) {
        Ok(h) => f(&h).unwrap_or_else(|message| {
            eprintln!("error: {message}");
            EXIT_USAGE
        }),
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_FAILURE
        }
    }
}

/// The run that `prefix` names: the run with exactly this id, or the only run whose id
/// starts with it. An ambiguous prefix is refused with the candidates listed.
fn unique_run(history: &RunHistory, prefix: &str) -> Result<RunRecord, String> {
    const SHOWN: usize = 10;
    let mut candidates = history
        .runs_with_prefix(prefix, SHOWN + 1)
        .map_err(|e| e.to_string())?;
    match candidates.first() {
        None => return Err(format!("no run `{prefix}` in run history")),
        Some(first) if first.run_id == prefix || candidates.len() == 1 => {
            return Ok(candidates.swap_remove(0));
        }
        Some(_) => {}
    }
    let more = if candidates.len() > SHOWN {
        candidates.truncate(SHOWN);
        "\n  ... and more"
    } else {
        ""
    };
    let list: Vec<String> = candidates
        .iter()
        .map(|r| {
            format!(
                "  {}\t{}\t{}\t{}",
                r.run_id,
                r.pipeline,
                r.status,
                r.started_at.to_rfc3339()
            )
        })
        .collect();
    Err(format!(
        "run id prefix `{prefix}` is ambiguous; it matches:\n{}{more}\ngive more characters of the run id",
        list.join("\n")
    ))
}

/// Prints a run's events; with `follow`, polls for new ones until the run ends.
fn print_logs(history: &RunHistory, run_id: &str, json: bool, follow: bool) -> Result<i32, String> {
    let run = unique_run(history, run_id)?;
    let console = Console::new(json, Level::Debug, 0);
    let mut last = 0;
    loop {
        let events = history
            .events(&run.run_id, last)
            .map_err(|e| e.to_string())?;
        let mut ended = false;
        for (id, event) in events {
            last = id;
            ended |= event.is_pipeline_end();
            crate::execution::sink::EventListener::on_event(&console, &event);
        }
        if !follow || ended {
            return Ok(EXIT_SUCCESS);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn load_sources(args: &ConfigArgs) -> Result<ConfigSources, String> {
    ConfigSources::from_files(&args.config).map_err(|e| e.to_string())
}

fn execute(
    pipeline: &Pipeline,
    args: &ConfigArgs,
    json: bool,
    run_id: Option<String>,
) -> Result<i32, String> {
    let sources = load_sources(args)?;
    let home = solidflow_home();
    let mut options = RunOptions {
        run_id,
        mode: args.mode.clone(),
        home: Some(home.clone()),
        ..RunOptions::default()
    };
    // Validates config and run id, compiles the plan and checks the executor, once.
    let prepared = PreparedRun::new(pipeline, &sources, &options).map_err(|e| e.to_string())?;
    install_signal_handler(options.cancel.clone());
    let history = RunHistory::open(&home.join("history.db")).map_err(|e| e.to_string())?;
    let console = Arc::new(Console::new(
        json,
        Level::parse(&prepared.config().log_level).unwrap_or(Level::Info),
        prepared.plan().steps.len(),
    ));
    options.listeners.push(console.clone());
    options.history = Some(history);
    let result = prepared.execute(options);
    console.finish();
    match result {
        Ok(r) => Ok(match r.status() {
            RunStatus::Success => EXIT_SUCCESS,
            RunStatus::Canceled => EXIT_INTERRUPTED,
            _ => EXIT_FAILURE,
        }),
        Err(e) => Err(e.to_string()),
    }
}

/// First Ctrl-C/SIGTERM cancels the run (executors stop their steps); a second one kills
/// every step process at once and exits.
fn install_signal_handler(cancel: CancelToken) {
    let _ = ctrlc::set_handler(move || {
        if cancel.is_canceled() {
            eprintln!("interrupted again: killing step processes and exiting now");
            crate::executor::kill_step_processes();
            std::process::exit(EXIT_INTERRUPTED);
        }
        eprintln!("interrupt received: canceling the run (press Ctrl-C again to exit at once)");
        cancel.cancel();
    });
}

fn step_mode(repository: &Repository) -> i32 {
    die_with_parent();
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("error: cannot read the step invocation from stdin: {e}");
        return 3;
    }
    let invocation: StepInvocation = match serde_json::from_str(&input) {
        Ok(i) => i,
        Err(e) => {
            eprintln!(
                "error: stdin is not a step invocation ({e}); this command is run by solidflow's executors"
            );
            return 3;
        }
    };
    let events = match protocol_stdout() {
        Ok(out) => out,
        Err(e) => {
            eprintln!("error: cannot set up the event channel: {e}");
            return 3;
        }
    };
    run_invocation(repository, invocation, events)
}

/// When started by a local executor (which sets [`PARENT_PID_ENV`]), asks the kernel to
/// SIGKILL this step process if the parent dies, and exits if it already has.
fn die_with_parent() {
    use crate::executor::PARENT_PID_ENV;
    let Some(parent) = std::env::var(PARENT_PID_ENV)
        .ok()
        .and_then(|p| p.parse::<libc::pid_t>().ok())
    else {
        return;
    };
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(PR_SET_PDEATHSIG) only changes this process's own attributes.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
    }
    // SAFETY: getppid(2) has no preconditions.
    if unsafe { libc::getppid() } != parent {
        eprintln!("error: the parent process {parent} is gone; not running the step");
        std::process::exit(3);
    }
}

/// Keeps the real stdout for protocol messages and points fd 1 at stderr, so whatever
/// user code prints cannot corrupt the message stream.
fn protocol_stdout() -> std::io::Result<Box<dyn Write + Send>> {
    use std::os::fd::{FromRawFd, OwnedFd};
    std::io::stdout().flush()?;
    // SAFETY: fcntl/dup2 on the process's own standard descriptors; the duplicate is
    // owned by the returned File and closed exactly once. It is close-on-exec so that
    // processes the solid starts do not hold the message pipe open.
    unsafe {
        let fd = libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 3);
        if fd < 0 || libc::dup2(2, 1) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Box::new(std::fs::File::from(OwnedFd::from_raw_fd(fd))))
    }
}
