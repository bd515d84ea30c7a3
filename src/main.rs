//! The `keel` command line: `keel serve`, `keel validate`, `keel load`, `keel hash-key`,
//! `keel --version`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keel::observe::{LogFormat, init_logs};
use keel::policy::Policy;

/// jemalloc instead of glibc's malloc: under load, glibc's arenas contend on locks and
/// malloc/free took about 15% of the gateway's CPU in a profile. mimalloc solved that too,
/// but held more memory: beside it, jemalloc cost the same CPU per proxied call and kept
/// idle RSS at 14 MiB instead of 25, and 167 MiB with 10,000 calls in flight instead of 198
/// (docs/benchmarks.md, 2026-12-03).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Keel: a gRPC inference gateway for the KServe Open Inference Protocol v2.
///
/// With no command, `keel` serves (the same as `keel serve`).
#[derive(Parser)]
#[command(name = "keel", version, about)]
struct Cli {
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log level or filter directive (`info`, `keel=debug`); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve gRPC traffic (the default).
    Serve(ServeArgs),
    /// Check a configuration file without opening sockets; exit 0 if valid, 1 if not.
    Validate {
        /// The TOML file to check.
        file: PathBuf,
        /// Do not read the certificate, key and CA files the policy names (they are
        /// mounted only where Keel runs); every other rule is checked.
        #[arg(long)]
        skip_files: bool,
    },
    /// Drive an OIP server (Keel or another) with inference load and report what it did.
    Load(LoadArgs),
    /// Work with policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Read an API key from stdin and print its `sha256:<hex>` hash for a tenant's
    /// `api_keys` (the policy holds hashes only, never keys).
    HashKey,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// What two policies decide differently (effective settings per model and method,
    /// routes, ladders, upstreams, tenants); exit 0 if equal, 1 if not, 2 if either is
    /// invalid.
    Diff {
        /// The current policy (TOML).
        old: PathBuf,
        /// The candidate policy (TOML).
        new: PathBuf,
        /// Print the changes as JSON.
        #[arg(long)]
        json: bool,
        /// Do not read the certificate, key and CA files the policies name.
        #[arg(long)]
        skip_files: bool,
    },
}

#[derive(clap::Args)]
struct LoadArgs {
    /// The server, host:port; only loopback unless --allow-remote.
    #[arg(long, default_value = "127.0.0.1:8001")]
    target: String,
    /// The model; by default the payload's (simple, iris, identity).
    #[arg(long)]
    model: Option<String>,
    /// Requests in flight at once (closed loop), or at most (with --rate).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections, used in turn.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// How long to run (`10s`, `500ms`); the default when --requests is not given.
    #[arg(long, conflicts_with = "requests")]
    duration: Option<String>,
    /// How many requests to send.
    #[arg(long)]
    requests: Option<u64>,
    /// Requests per second, open loop: latency counts from each request's intended send time.
    #[arg(long)]
    rate: Option<f64>,
    /// simple, iris, or identity:BYTES (identity:4MiB).
    #[arg(long, default_value = "simple")]
    payload: String,
    /// The deadline each request sends (`500ms`).
    #[arg(long)]
    deadline: Option<String>,
    /// Write the summary as JSON to this file too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// v2 (OIP ModelInfer) or v1 (Keel's legacy Predict).
    #[arg(long, default_value = "v2")]
    api: String,
    /// Allow a target that is not loopback.
    #[arg(long)]
    allow_remote: bool,
}

#[derive(clap::Args, Default)]
struct ServeArgs {
    /// A TOML policy file, watched for changes; without one, Keel serves its embedded models.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Traffic listen address, overriding `server.listen` (default 127.0.0.1:8001).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Admin listen address, overriding `server.admin_listen` (default 127.0.0.1:8002).
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format, &cli.log_level);
    match cli.command.unwrap_or(Command::Serve(ServeArgs::default())) {
        Command::Serve(args) => serve(args),
        Command::Validate { file, skip_files } => validate(&file, skip_files),
        Command::Load(args) => load(args),
        Command::Policy(PolicyCommand::Diff {
            old,
            new,
            json,
            skip_files,
        }) => policy_diff(&old, &new, json, skip_files),
        Command::HashKey => hash_key(),
    }
}

/// Reads one key from stdin (its line end dropped, nothing else, so the hash is of the key
/// exactly as clients send it) and prints its hash.
fn hash_key() -> ExitCode {
    use std::io::Read as _;
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("keel hash-key: cannot read the key from stdin: {e}");
        return ExitCode::FAILURE;
    }
    let key = input
        .strip_suffix('\n')
        .map(|k| k.strip_suffix('\r').unwrap_or(k))
        .unwrap_or(&input);
    if key.is_empty() {
        eprintln!("keel hash-key: no key on stdin (try: printf %s \"$KEY\" | keel hash-key)");
        return ExitCode::FAILURE;
    }
    if key.contains(['\n', '\r']) || key.trim() != key {
        eprintln!(
            "keel hash-key: the key has line breaks or spaces at its ends; clients could not send it in `authorization: Bearer <key>`"
        );
        return ExitCode::FAILURE;
    }
    println!("{}", keel::auth::hash_key(key));
    ExitCode::SUCCESS
}

fn validate(file: &std::path::Path, skip_files: bool) -> ExitCode {
    let embedded = keel::upstream::embedded::Embedded::new();
    let files = if skip_files {
        keel::policy::Files::Skip
    } else {
        keel::policy::Files::Read
    };
    let checked = Policy::load_with(file, files).and_then(|p| {
        keel::policy::builtin::check(&p, &*embedded)?;
        Ok(p)
    });
    match checked {
        Ok(p) => {
            print!("{}", summary(file, &p, &embedded));
            if skip_files {
                println!("certificate, key and CA files not read (--skip-files)");
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in errors.0 {
                eprintln!("{}: {e}", file.display());
            }
            ExitCode::FAILURE
        }
    }
}

/// `keel policy diff`: each policy checked as `keel validate` checks it, then compared by
/// what it decides.
fn policy_diff(
    old: &std::path::Path,
    new: &std::path::Path,
    json: bool,
    skip_files: bool,
) -> ExitCode {
    use keel::policy::diff;
    let embedded = keel::upstream::embedded::Embedded::new();
    let files = if skip_files {
        keel::policy::Files::Skip
    } else {
        keel::policy::Files::Read
    };
    let read = |file: &std::path::Path| {
        Policy::load_with(file, files)
            .and_then(|p| {
                keel::policy::builtin::check(&p, &*embedded)?;
                Ok(p)
            })
            .map_err(|errors| {
                for e in errors.0 {
                    eprintln!("{}: {e}", file.display());
                }
            })
    };
    let (Ok(a), Ok(b)) = (read(old), read(new)) else {
        return ExitCode::from(2);
    };
    let names: Vec<String> = embedded.model_names().map(str::to_string).collect();
    let changes = diff::diff(&diff::effective(&a, &names), &diff::effective(&b, &names));
    if json {
        println!("{}", diff::to_json(&changes));
    } else if changes.is_empty() {
        println!("no difference in what the policies decide");
    } else {
        print!("{}", diff::to_text(&changes));
        println!("{} decisions differ", changes.len());
    }
    if changes.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Parses the load plan from the command line; every problem names its flag.
fn load_plan(args: &LoadArgs) -> Result<keel::load::Plan, String> {
    use keel::load::{Api, Payload, Plan, Stop};
    let duration =
        |flag: &str, v: &str| keel::policy::parse_duration(v).map_err(|e| format!("--{flag}: {e}"));
    keel::load::check_target(&args.target, args.allow_remote).map_err(|e| e.to_string())?;
    let payload: Payload = args
        .payload
        .parse()
        .map_err(|e| format!("--payload: {e}"))?;
    let stop = match (args.requests, &args.duration) {
        (Some(0), _) => return Err("--requests must be at least 1".into()),
        (Some(n), _) => Stop::Requests(n),
        (None, Some(d)) => Stop::Duration(duration("duration", d)?),
        (None, None) => Stop::Duration(std::time::Duration::from_secs(10)),
    };
    if let Stop::Duration(d) = stop
        && d > std::time::Duration::from_secs(24 * 3600)
    {
        return Err("--duration: at most 24h".into());
    }
    let api = match args.api.as_str() {
        "v2" => Api::V2,
        "v1" => Api::V1,
        other => return Err(format!("--api: {other:?} is not v2 or v1")),
    };
    Ok(Plan {
        target: args.target.clone(),
        model: args
            .model
            .clone()
            .unwrap_or_else(|| payload.model().to_string()),
        concurrency: args.concurrency,
        connections: args.connections,
        stop,
        rate: args.rate,
        payload,
        deadline: args
            .deadline
            .as_deref()
            .map(|d| duration("deadline", d))
            .transpose()?,
        api,
    })
}

fn load(args: LoadArgs) -> ExitCode {
    use std::io::{IsTerminal as _, Write as _};
    let plan = match load_plan(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("keel load: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keel load: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let tty = std::io::stderr().is_terminal();
    let progress = move |t: keel::load::Tick| {
        let line = format!(
            "{:>6.1}s  {:>9} done  {:>9.0} req/s  {} errors",
            t.elapsed.as_secs_f64(),
            t.done,
            t.done as f64 / t.elapsed.as_secs_f64().max(1e-9),
            t.errors
        );
        if tty {
            eprint!("\r{line}");
            let _ = std::io::stderr().flush();
        } else if t.elapsed.as_secs().is_multiple_of(5) {
            eprintln!("{line}");
        }
    };
    let report = runtime.block_on(keel::load::run(plan, progress));
    if tty {
        eprintln!();
    }
    match report {
        Ok(r) => {
            print!("{r}");
            if let Some(path) = &args.json {
                let written = serde_json::to_string_pretty(&r)
                    .map_err(|e| e.to_string())
                    .and_then(|j| std::fs::write(path, j + "\n").map_err(|e| e.to_string()));
                if let Err(e) = written {
                    eprintln!("keel load: cannot write {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keel load: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The one-screen summary `keel validate` prints for a valid policy.
fn summary(
    file: &std::path::Path,
    p: &Policy,
    embedded: &keel::upstream::embedded::Embedded,
) -> String {
    use std::fmt::Write as _;
    let d = keel::policy::format_duration;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: valid (policy_version {})",
        file.display(),
        p.version.as_deref().unwrap_or("not set")
    );
    let _ = writeln!(
        out,
        "listen {}, admin {}",
        p.server.listen, p.server.admin_listen
    );
    let _ = writeln!(out, "upstreams:");
    if p.upstreams.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for (name, u) in &p.upstreams {
        let endpoints: Vec<String> = match &u.endpoints {
            keel::policy::Endpoints::Static(uris) => uris
                .iter()
                .map(|e| {
                    e.authority()
                        .map_or_else(|| e.to_string(), ToString::to_string)
                })
                .collect(),
            keel::policy::Endpoints::Dns {
                host,
                port,
                interval,
            } => vec![format!(
                "dns {host}:{port} (every {})",
                keel::policy::format_duration(*interval)
            )],
        };
        let check = u
            .health_check
            .as_ref()
            .map(|c| {
                format!(
                    ", checked every {}",
                    keel::policy::format_duration(c.interval)
                )
            })
            .unwrap_or_default();
        let _ = writeln!(out, "  {name:<16} {}{check}", endpoints.join(", "));
    }
    let _ = writeln!(out, "models:");
    let infer = "inference.GRPCInferenceService/ModelInfer";
    let model_line = |name: &str, backend: String| {
        let s = p.resolve(infer, Some(name));
        format!(
            "  {name:<16} {backend:<28} infer timeout {}, {} attempts\n",
            d(s.timeout),
            s.retry.max_attempts
        )
    };
    match &p.models {
        None => {
            for m in embedded.model_names() {
                out.push_str(&model_line(m, "embedded".into()));
            }
        }
        Some(models) => {
            for (name, m) in models {
                let mut routes = m.describe_routes(&p.flags);
                if let Some(w) = m.when.as_ref().filter(|w| !w.holds(&p.flags)) {
                    routes = format!("switched off ({w}): {routes}");
                }
                out.push_str(&model_line(name, routes));
            }
        }
    }
    let _ = writeln!(out, "methods (effective settings):");
    for method in keel::policy::METHODS {
        let s = p.resolve(method, None);
        let short = method.rsplit('/').next().unwrap_or(method);
        let retry_on: Vec<&str> = s.retry.retry_on.iter().map(|r| r.as_str()).collect();
        let breaker = if s.breaker.enabled {
            let slow = s.breaker.slow_call_duration.map_or_else(String::new, |t| {
                format!(
                    " or {:.0}% slower than {}",
                    s.breaker.slow_call_ratio * 100.0,
                    d(t)
                )
            });
            format!(
                "breaker opens at {:.0}% failures{slow} of >= {} calls in {}, for {}",
                s.breaker.failure_ratio * 100.0,
                s.breaker.min_requests,
                d(s.breaker.window),
                d(s.breaker.open_for)
            )
        } else {
            "breaker off".to_string()
        };
        let _ = writeln!(
            out,
            "  {short:<16} timeout {} (max {}); retry {} attempts on {}; {breaker}",
            d(s.timeout),
            d(s.max_timeout),
            s.retry.max_attempts,
            retry_on.join("|"),
        );
    }
    out
}

fn serve(args: ServeArgs) -> ExitCode {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let options = keel::Options {
        config: args.config,
        text: None,
        listen: args.listen,
        admin_listen: args.admin_listen,
        // The standard OpenTelemetry variables turn tracing on.
        otlp_endpoint: env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT")),
        service_name: env("OTEL_SERVICE_NAME"),
        old_span_names: env("OTEL_SEMCONV_STABILITY_OPT_IN")
            .is_some_and(|v| v.split(',').any(|x| x.trim() == "rpc/dup")),
        drain_grace: None,
    };
    // The main runtime runs what runs once (admin listener, policy watch, SIGHUP, health,
    // span export, the drain); traffic runs on `server.workers` threads of their own.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keel: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let config = options.config.clone();
        let keel = match keel::Keel::new(options) {
            Ok(k) => k,
            Err(keel::ServeError::Policy(errors)) => {
                let name = config.map_or_else(|| "keel".to_string(), |c| c.display().to_string());
                for e in errors.0 {
                    eprintln!("{name}: {e}");
                }
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("keel: {e}");
                return ExitCode::FAILURE;
            }
        };
        let server = keel.store().current().policy.server.clone();
        let workers = keel::worker::resolve(server.workers);
        let listeners = match keel::worker::bind(server.listen, workers) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("keel: cannot listen on {} (traffic): {e}", server.listen);
                return ExitCode::FAILURE;
            }
        };
        let local = listeners
            .first()
            .and_then(|l| l.local_addr().ok())
            .unwrap_or(server.listen);
        let admin = match tokio::net::TcpListener::bind(server.admin_listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!(
                    "keel: cannot listen on {} (admin, server.admin_listen or --admin-listen): {e}",
                    server.admin_listen
                );
                return ExitCode::FAILURE;
            }
        };
        let shutdown = shutdown_signal();
        let names = keel.models();
        println!(
            "keel {} listening on {} (gRPC, OIP v2), admin on {}, serving models: {}",
            env!("CARGO_PKG_VERSION"),
            local,
            admin.local_addr().unwrap_or(server.admin_listen),
            names.join(", ")
        );
        match keel.serve_workers(listeners, Some(admin), shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("keel: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Completes on Ctrl-C or SIGTERM; a second one exits the process at once. The handlers are
/// installed when this is called, not when the future is first polled, so a signal that
/// arrives right after the startup line is never missed.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        /// The next delivery of `s`, or never when its handler could not be installed.
        async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
            match s.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        let mut term = signal(SignalKind::terminate()).ok();
        let mut int = signal(SignalKind::interrupt()).ok();
        async move {
            tokio::select! {
                () = next(&mut int) => tracing::info!("received Ctrl-C (SIGINT)"),
                () = next(&mut term) => tracing::info!("received SIGTERM"),
            }
            // A second signal means now: no grace, no drain.
            tokio::spawn(async move {
                tokio::select! {
                    () = next(&mut int) => {}
                    () = next(&mut term) => {}
                }
                eprintln!("keel: second shutdown signal: exiting without draining");
                std::process::exit(1);
            });
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("received Ctrl-C");
    }
}
