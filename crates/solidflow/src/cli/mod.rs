//! The command line every pipeline binary gets from [`Repository::main`], which is
//! implemented here: the repository is a definition, the command line is this module's.
//!
//! Exit codes: 0 success, 1 pipeline failure, 2 bad config or usage, 130 interrupted.

mod console;
mod runs;

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
use crate::execution::protocol::{StepInvocation, protocol_stdout, run_invocation};
use crate::execution::reexecution::StepsToRun;
use crate::execution::run::{PreparedRun, RunOptions, solidflow_home};
use crate::storage::run_history::{RunFilter, RunHistory, RunRecord, RunStatus};

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
        /// Only the steps this selection picks (`*name`, `name+`, `a,b`, `branch_*`).
        #[arg(long, value_name = "SELECTION")]
        select: Option<String>,
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
        /// Only the steps this selection picks (`*name`, `name+`, `a,b`, `branch_*`).
        #[arg(long, value_name = "SELECTION")]
        select: Option<String>,
        /// A tag recorded with the run; repeat for several.
        #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = runs::parse_tag)]
        tags: Vec<(String, String)>,
    },
    /// Re-execute a recorded run: from failure, a selection, or all steps (the default).
    /// Steps not re-run read their outputs from the parent run's intermediates.
    Reexecute {
        /// The run to re-execute (a unique prefix is enough).
        run_id: String,
        /// Run the steps that failed, were skipped or never finished, and what depends on them.
        #[arg(long, conflicts_with_all = ["select", "all"])]
        from_failure: bool,
        /// Run the steps this selection picks (`*name`, `name+`, `a,b`, `branch_*`).
        #[arg(long, value_name = "SELECTION", conflicts_with = "all")]
        select: Option<String>,
        /// Run every step again (the default).
        #[arg(long)]
        all: bool,
        /// Config file merged over the parent run's config; repeat to merge several.
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: Vec<PathBuf>,
        /// A tag recorded with the new run; repeat for several.
        #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = runs::parse_tag)]
        tags: Vec<(String, String)>,
        /// Use this run id instead of a fresh UUID.
        #[arg(long = "run-id")]
        new_run_id: Option<String>,
        /// Print events as JSON lines on stdout instead of a human log.
        #[arg(long)]
        json: bool,
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
    /// List recent runs from run history, newest first, with lineage and tags.
    Runs {
        /// How many runs.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
        /// Only runs with this status (repeatable): STARTED, SUCCESS, FAILURE, CANCELED.
        #[arg(long, value_parser = runs::parse_status)]
        status: Vec<RunStatus>,
        /// Only runs of this pipeline.
        #[arg(long)]
        pipeline: Option<String>,
        /// Only runs with this tag (repeatable; all must match).
        #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = runs::parse_tag)]
        tags: Vec<(String, String)>,
        /// Only runs started since: RFC 3339 time, date (2026-12-01) or age (30m, 2h, 7d).
        #[arg(long, value_parser = runs::parse_since)]
        since: Option<chrono::DateTime<chrono::Utc>>,
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
    /// Serve step requests on stdin, a Unix socket (warm step servers; see
    /// `execution::step_server`).
    #[command(hide = true)]
    StepServer,
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
    let args: Vec<OsString> = args.into_iter().collect();
    // Step mode, once per step process: it takes no options, so it skips building
    // and parsing the whole command line (`step --help` and the like still go to clap).
    if args.len() == 2 && args[1] == "step" {
        init_logging();
        return step_mode(repository);
    }
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
    init_logging();
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
            select,
        } => with_pipeline(repository, &pipeline, |p| {
            // The same checks as `execute`, so what `plan` accepts `execute` runs.
            let options = RunOptions {
                mode: config.mode.clone(),
                home: Some(solidflow_home()),
                steps: steps_to_run(select),
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
                out!("{}", crate::config::schema_text::render(&schema));
            }
            Ok(EXIT_SUCCESS)
        }),
        Command::Execute {
            pipeline,
            config,
            json,
            run_id,
            select,
            tags,
        } => with_pipeline(repository, &pipeline, |p| {
            let options = RunOptions {
                run_id,
                mode: config.mode.clone(),
                steps: steps_to_run(select),
                tags: tags.into_iter().collect(),
                ..RunOptions::default()
            };
            execute(p, &config.config, json, options)
        }),
        Command::Reexecute {
            run_id,
            from_failure,
            select,
            all: _,
            config,
            tags,
            new_run_id,
            json,
        } => reexecute(
            repository,
            &run_id,
            &config,
            json,
            RunOptions {
                run_id: new_run_id,
                steps: if from_failure {
                    StepsToRun::FromFailure
                } else {
                    steps_to_run(select)
                },
                tags: tags.into_iter().collect(),
                ..RunOptions::default()
            },
        ),
        Command::Runs {
            limit,
            json,
            status,
            pipeline,
            tags,
            since,
        } => with_history(|h| {
            let filter = RunFilter {
                statuses: status,
                pipeline,
                tags: tags.into_iter().collect(),
                since,
                limit: Some(limit),
                ..RunFilter::default()
            };
            for run in runs::list(h, &filter)? {
                if json {
                    outln!("{}", serde_json::to_string(&run).expect("run serializes"));
                } else {
                    outln!("{}", runs::run_line(&run));
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
        Command::StepServer => step_server(repository),
    }
}

/// `tracing` output to stderr, filtered by `SOLIDFLOW_LOG`.
fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("SOLIDFLOW_LOG"))
        .with_writer(std::io::stderr)
        .try_init();
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
    // The log is what `logs` was asked for: it goes to stdout, so it can be piped.
    if !json {
        println!("{}", runs::run_line(&run));
    }
    let console = Console::on_stdout(json, Level::Debug);
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

fn steps_to_run(select: Option<String>) -> StepsToRun {
    select.map(StepsToRun::Selection).unwrap_or_default()
}

/// `reexecute`: looks the parent up (a unique prefix is enough) and runs its pipeline
/// with the parent's config under the extra config files.
fn reexecute(
    repository: &Repository,
    run_id: &str,
    config: &[PathBuf],
    json: bool,
    mut options: RunOptions,
) -> i32 {
    let parent = with_history(|h| {
        h.mark_dead_runs().map_err(|e| e.to_string())?;
        let run = unique_run(h, run_id)?;
        options.parent_run_id = Some(run.run_id.clone());
        Ok(EXIT_SUCCESS)
    });
    if parent != EXIT_SUCCESS {
        return parent;
    }
    let parent_id = options.parent_run_id.clone().unwrap_or_default();
    let pipeline = match RunHistory::open(&solidflow_home().join("history.db"))
        .ok()
        .and_then(|h| h.run_exact(&parent_id).ok().flatten())
    {
        Some(run) => run.pipeline,
        None => {
            eprintln!("error: no run `{run_id}` in run history");
            return EXIT_USAGE;
        }
    };
    if repository.pipeline(&pipeline).is_none() {
        eprintln!(
            "error: run `{parent_id}` is a run of pipeline `{pipeline}`, which repository `{}` does not have; re-execute it with the binary that defines `{pipeline}`",
            repository.name()
        );
        return EXIT_USAGE;
    }
    with_pipeline(repository, &pipeline, |p| execute(p, config, json, options))
}

fn execute(
    pipeline: &Pipeline,
    config: &[PathBuf],
    json: bool,
    mut options: RunOptions,
) -> Result<i32, String> {
    let sources = ConfigSources::from_files(config).map_err(|e| e.to_string())?;
    let home = solidflow_home();
    let history = RunHistory::open(&home.join("history.db")).map_err(|e| e.to_string())?;
    options.home = Some(home.clone());
    options.history = Some(history.clone());
    // Validates config and run id, compiles the plan and checks the executor, once.
    let prepared = PreparedRun::new(pipeline, &sources, &options).map_err(|e| e.to_string())?;
    install_signal_handler(options.cancel.clone());
    let console = Arc::new(Console::new(
        json,
        Level::parse(&prepared.config().log_level).unwrap_or(Level::Info),
        prepared.plan().steps.len(),
    ));
    options.listeners.push(console.clone());
    let result = prepared.execute(options);
    console.finish();
    let code = match result {
        Ok(r) => match r.status() {
            RunStatus::Success => EXIT_SUCCESS,
            RunStatus::Canceled => EXIT_INTERRUPTED,
            _ => EXIT_FAILURE,
        },
        Err(e) => return Err(e.to_string()),
    };
    // The run's events were flushed by `execute`; a failed write means its record is
    // incomplete, so the run does not end as a plain success.
    if let Some(error) = history.write_error() {
        eprintln!(
            "error: run history is incomplete: {error}. The run's events above are complete, but `runs`, \
             `logs` and the web page miss some of them; free space for {} and rerun to have a record",
            home.display()
        );
        return Ok(if code == EXIT_SUCCESS {
            EXIT_FAILURE
        } else {
            code
        });
    }
    Ok(code)
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
    supervise();
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

/// `<binary> step-server`: a warm step server for the multiprocess executor and Dask
/// workers with `isolation: warm`.
fn step_server(repository: &Repository) -> i32 {
    #[cfg(target_os = "linux")]
    {
        crate::execution::step_server::serve(repository, parent_pid())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = repository;
        eprintln!("error: warm step servers need Linux; use `isolation: process`");
        EXIT_USAGE
    }
}

/// The pid local executors say started this process ([`PARENT_PID_ENV`](crate::executor::PARENT_PID_ENV)).
fn parent_pid() -> Option<libc::pid_t> {
    std::env::var(crate::executor::PARENT_PID_ENV)
        .ok()
        .and_then(|p| p.parse::<libc::pid_t>().ok())
}

/// Splits the step process into a supervisor and the runner that returns here, so that
/// nothing the step starts outlives it (see [`crate::execution::supervisor`]). Local
/// executors set [`PARENT_PID_ENV`](crate::executor::PARENT_PID_ENV) to their pid: a
/// step whose parent is already gone does not run.
fn supervise() {
    crate::execution::supervisor::supervise_step(parent_pid());
}
