//! `ferry`: parse the command line, run the command, map the outcome to an exit code.

use clap::Parser;
use ferry::cli::{Cli, Command, ConfigCommand, ImportChoice, JobCommand};
use ferry::config_dir::ConfigDir;
use ferry::{DemoOptions, LocalSyncOptions, PushOptions, exit};

// A round allocates and frees a few small objects per file and per chunk (paths, entries, chunk
// lists) on several threads; glibc's allocator spent about a tenth of both nodes' CPU on it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { exit::USAGE } else { exit::OK };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    // The daemon and network rounds say what they do (one line per connection, round and progress
    // step); local commands only warn.
    let chatty = matches!(&cli.command, Command::Serve(_))
        || matches!(&cli.command, Command::Sync(args) if args.target.is_none());
    init_logging(cli.verbose, cli.quiet, chatty, cli.log_format);
    let data_dir = cli.data_dir.clone();
    let quiet = cli.quiet;
    let config_dir = ConfigDir::new(cli.config_dir).with_data_dir(cli.data_dir);
    // A round asked for JSON prints a document however it ends.
    let json_errors = matches!(&cli.command, Command::Sync(args) if args.json);
    let result = match cli.command {
        Command::Init => ferry::commands::init(&config_dir).map(|()| exit::OK),
        Command::Trust(args) => ferry::commands::trust(&config_dir, &args).map(|()| exit::OK),
        Command::Job(JobCommand::Add { name, path, peer, import }) => {
            ferry::commands::job_add(&config_dir, &name, &path, &peer, &import).map(|()| exit::OK)
        }
        Command::Job(JobCommand::Set { name, path, peer, import }) => {
            ferry::commands::job_set(&config_dir, &name, path.as_deref(), peer.as_deref(), &import).map(|()| exit::OK)
        }
        Command::Job(JobCommand::Adopt { name, paths }) => {
            ferry::adoption::ask(&config_dir, &name, &paths).map(|()| exit::OK)
        }
        Command::Job(JobCommand::List) => ferry::commands::job_list(&config_dir).map(|()| exit::OK),
        Command::Job(JobCommand::Remove { name, purge }) => {
            ferry::commands::job_remove(&config_dir, &name, purge).map(|()| exit::OK)
        }
        Command::Untrust { peer } => ferry::commands::untrust(&config_dir, &peer).map(|()| exit::OK),
        Command::Status { job, json } => ferry::status::status(&config_dir, job.as_deref()).and_then(|status| {
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                ferry::status::print(&status);
            }
            Ok(exit::OK)
        }),
        Command::Log { job, last, json } => ferry::log::log(&config_dir, &job, last).and_then(|log| {
            if json {
                println!("{}", serde_json::to_string_pretty(&log)?);
            } else {
                ferry::log::print(&log);
            }
            Ok(exit::OK)
        }),
        Command::Verify { job, json } => ferry::verify::verify(&config_dir, &job).and_then(|report| {
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for difference in &report.differences {
                    println!("{difference}");
                }
                if !report.folder_mtimes_moved.is_empty() {
                    println!(
                        "{} hold files only the target has (the import's), which moved their mtimes: {}",
                        ferry_engine::human::counted(report.folder_mtimes_moved.len() as u64, "folder"),
                        report.folder_mtimes_moved.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
                    );
                }
                println!(
                    "{} of round {} checked: {}",
                    ferry_engine::human::counted(report.checked, "entry"),
                    report.round,
                    if report.differences.is_empty() {
                        "the target matches".to_owned()
                    } else {
                        format!("{} differ", report.differences.len())
                    }
                );
            }
            Ok(if report.differences.is_empty() { exit::OK } else { exit::DIFFERENCES })
        }),
        Command::Serve(args) => runtime().and_then(|rt| {
            rt.block_on(async { ferry::serve(config_dir, args.listen, args.stall_timeout, shutdown_signal()).await })
                .map(|()| exit::OK)
        }),
        Command::Sync(args) => {
            let progress_interval = args.progress_interval.unwrap_or(std::time::Duration::from_secs(60));
            match args.target.clone() {
                Some(_) if !args.network_only().is_empty() => {
                    eprintln!(
                        "ferry: error: only a network round (ferry sync --round JOB) takes {}; a local round \
                     (SOURCE TARGET) would ignore it",
                        args.network_only().join(", ")
                    );
                    std::process::exit(exit::USAGE);
                }
                Some(target) => ferry::run_local_sync(&LocalSyncOptions {
                    source: args.job_or_source,
                    target,
                    state_dir: args.state_dir,
                    data_dir,
                    delete: args.delete,
                    numeric_ids: args.numeric_ids,
                    skip_special: args.skip_special,
                    json: args.json,
                    dry_run: args.dry_run,
                    adopt: args.adopt,
                    progress: ferry::meter::Show::choose(quiet, progress_interval),
                }),
                None if !args.adopt.is_empty() => {
                    eprintln!(
                        "ferry: error: --adopt is for local rounds; for a network round, adopt on the destination: \
                     ferry job adopt JOB PATH|all (the next round replaces what is there)"
                    );
                    std::process::exit(exit::USAGE);
                }
                None => {
                    let options = PushOptions {
                        job: args.job_or_source.to_string_lossy().into_owned(),
                        delete: args.delete,
                        numeric_ids: args.numeric_ids,
                        skip_special: args.skip_special,
                        import: match args.import {
                            None => ferry_proto::ImportMode::Default,
                            Some(ImportChoice::Full) => ferry_proto::ImportMode::Full,
                            Some(ImportChoice::ProvisioningOnly) => ferry_proto::ImportMode::ProvisioningOnly,
                            Some(ImportChoice::None) => ferry_proto::ImportMode::None,
                        },
                        wait_for_import: !args.no_wait,
                        wait_if_busy: args.wait,
                        bwlimit: args.bwlimit,
                        max_duration: args.max_duration,
                        dry_run: args.dry_run,
                        reconnect_grace: args.reconnect_grace.unwrap_or(std::time::Duration::from_secs(600)),
                        congestion: if args.low_priority {
                            ferry::Congestion::LowPriority
                        } else {
                            args.congestion.unwrap_or(ferry::Congestion::Cubic)
                        },
                        progress_interval,
                        progress: ferry::meter::Show::choose(quiet, progress_interval),
                    };
                    if args.dry_run {
                        runtime().and_then(|rt| rt.block_on(ferry::dry_run(&config_dir, &options))).map(|report| {
                            ferry::print_dry_run(&report, args.json);
                            exit::OK
                        })
                    } else {
                        block_on(ferry::push(&config_dir, &options)).map(|report| {
                            ferry::print_push_report(&report, args.json);
                            if report.failure_count > 0 || !report.in_sync {
                                exit::INCOMPLETE
                            } else if report.import.as_ref().is_some_and(|i| !i.success) {
                                exit::IMPORT_FAILED
                            } else {
                                exit::OK
                            }
                        })
                    }
                }
            }
        }
        Command::Config(ConfigCommand::Check { file }) => {
            ferry::commands::config_check(&config_dir, file.as_deref()).map(|()| exit::OK)
        }
        Command::Config(ConfigCommand::Reference) => {
            print!("{}", ferry::config_check::reference());
            Ok(exit::OK)
        }
        Command::Completions { shell } => {
            ferry::commands::print_completions(shell);
            Ok(exit::OK)
        }
        Command::Man { dir } => ferry::commands::write_man_pages(&dir).map(|()| exit::OK),
        Command::Demo(args) => {
            ferry::run_demo(&DemoOptions { files: args.files, rounds: args.rounds, seed: args.seed, keep: args.keep })
                .map(|()| exit::OK)
        }
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            let code = ferry::outcome::of_error(&e);
            if json_errors && let Ok(text) = serde_json::to_string_pretty(&ferry::outcome::ErrorReport::of(&e)) {
                println!("{text}");
            }
            if code == exit::DEADLINE || code == exit::STOPPED {
                eprintln!("ferry: {}", ferry::describe(&e));
            } else {
                eprintln!("ferry: error: {}", ferry::describe(&e));
            }
            std::process::exit(code);
        }
    }
}

/// Runs a round to its end on a runtime of its own, which does not wait for a blocking task left
/// behind: a round stopped by a signal during its scan exits without waiting for the scan.
fn block_on<T>(round: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    let runtime = runtime()?;
    let result = runtime.block_on(round);
    runtime.shutdown_background();
    result
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// SIGTERM or SIGINT. The handlers are installed when this is called, not when it is first awaited:
/// systemd may stop the daemon right after it said it was ready, before its loop polls this.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let (term, int) = (signal(SignalKind::terminate()).ok(), signal(SignalKind::interrupt()).ok());
    async move {
        let wait = |signal: Option<tokio::signal::unix::Signal>| async move {
            match signal {
                Some(mut signal) => drop(signal.recv().await),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = wait(term) => {}
            () = wait(int) => {}
        }
    }
}

fn init_logging(verbose: u8, quiet: bool, chatty: bool, format: ferry::cli::LogFormat) {
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) if chatty => "info",
        // Local commands warn, and a local round's progress lines still show.
        (false, 0) => "warn,ferry::meter=info",
        (false, 1) => "info",
        (false, 2) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // For log shippers: one JSON object a line, with the spans that name the job and the round.
    if format == ferry::cli::LogFormat::Json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_current_span(false)
            .with_span_list(true)
            .init();
        return;
    }
    // Into the journal (systemd says so in JOURNAL_STREAM, naming stderr): no timestamp of ours (the
    // journal keeps its own) and each line's priority as a `<N>` prefix, which journald reads.
    if stderr_is_the_journal() {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_ansi(false)
            .without_time()
            .event_format(JournalPriority(tracing_subscriber::fmt::format().with_target(false).without_time()))
            .init();
        return;
    }
    // Colours only on a terminal: cron mails and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi)
        .init();
}

/// Whether stderr is the stream systemd connected to the journal: `JOURNAL_STREAM` names its device
/// and inode (a stderr redirected elsewhere by the service keeps its own format).
fn stderr_is_the_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else { return false };
    let Ok(stat) = rustix::fs::fstat(std::io::stderr()) else { return false };
    dev == stat.st_dev.to_string() && ino == stat.st_ino.to_string()
}

/// Puts each line's syslog priority before it (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug).
struct JournalPriority<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for JournalPriority<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        context: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            tracing::Level::DEBUG | tracing::Level::TRACE => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(context, writer, event)
    }
}
