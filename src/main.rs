//! The `fluidcloud` command line. `anyhow` lives here only; exit codes: 0 ok, 1 failure,
//! 2 usage or configuration error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use fluidcloud::broker::supervisor::Loaded;
use fluidcloud::config::{Config, ConfigErrors};

mod client;
mod relocate;

#[derive(Parser)]
#[command(
    name = "fluidcloud",
    version,
    about = "Moves running cloud services between providers when the owner's policy says it pays."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Args, Clone)]
pub struct ConfigArg {
    /// Configuration file.
    #[arg(
        long,
        short,
        env = "FLUIDCLOUD_CONFIG",
        default_value = "/etc/fluidcloud/fluidcloud.toml"
    )]
    pub config: PathBuf,
}

#[derive(Args, Clone)]
pub struct AgentConfigArg {
    /// The agent's configuration file.
    #[arg(
        long,
        short,
        env = "FLUIDCLOUD_AGENT_CONFIG",
        default_value = "/etc/fluidcloud/agent.toml"
    )]
    pub config: PathBuf,
}

#[derive(Args, Clone)]
pub struct ApiArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Base URL of the daemon's API (default: from the configuration's `daemon.listen`).
    #[arg(long)]
    pub url: Option<String>,
    /// File holding the API token (default: as the daemon finds it).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the broker daemon.
    Daemon(ConfigArg),
    /// Validate a configuration and its policies; print every problem.
    Check(ConfigArg),
    /// Show the services, where they run and what they cost.
    Status(ApiArgs),
    /// Show the market: offers, IO figures, regions and the freshness of every source.
    Market {
        #[command(flatten)]
        api: ApiArgs,
        /// Only this provider.
        #[arg(long)]
        provider: Option<String>,
    },
    /// Show recent decisions, or approve or reject a pending one.
    Decisions {
        #[command(flatten)]
        api: ApiArgs,
        /// Only this service.
        #[arg(long)]
        service: Option<String>,
        /// Only this outcome (stay, suppressed, audited, pending_approval, submitted, …).
        #[arg(long)]
        outcome: Option<String>,
        /// At most this many, newest last.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Approve this pending decision.
        #[arg(long, conflicts_with = "reject")]
        approve: Option<String>,
        /// Reject this pending decision.
        #[arg(long)]
        reject: Option<String>,
    },
    /// Print the ordered steps of relocating a service, without doing anything.
    Plan {
        #[command(flatten)]
        config: ConfigArg,
        /// The service to move.
        service: String,
        /// The provider to move it to.
        #[arg(long)]
        to: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Relocate a service now, in the foreground, with progress bars and a summary.
    /// Stop the daemon first: it holds the providers.
    Relocate {
        #[command(flatten)]
        config: ConfigArg,
        /// The service to move.
        service: String,
        /// The provider to move it to.
        #[arg(long)]
        to: String,
        /// Seconds to keep the source after the target is healthy (default: the
        /// configuration's `conduit.grace_period_secs`).
        #[arg(long)]
        grace_period: Option<u64>,
        /// No progress bars; one line per step.
        #[arg(long)]
        quiet: bool,
    },
    /// Ask the running daemon to reload its configuration and policies.
    Reload(ApiArgs),
    /// List the daemon's relocations; show one step by step, follow it, or cancel it.
    #[command(args_conflicts_with_subcommands = true)]
    Relocations {
        #[command(flatten)]
        api: ApiArgs,
        /// Only this service's.
        #[arg(long)]
        service: Option<String>,
        /// Only those in this state (queued, running, rolling_back, grace, completed,
        /// rolled_back, failed), or `active` for every unfinished one.
        #[arg(long)]
        state: Option<String>,
        /// The most recent N (default 100).
        #[arg(long)]
        limit: Option<usize>,
        #[command(subcommand)]
        command: Option<RelocationsCmd>,
    },
    /// Policy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCmd,
    },
    /// Viaduct tools.
    Viaduct {
        #[command(subcommand)]
        command: ViaductCmd,
    },
    /// Run an agent: serve this host's providers and viaduct ends to the daemon over mutual
    /// TLS.
    Agent {
        #[command(flatten)]
        config: AgentConfigArg,
        /// Check the configuration, its certificate and key, then exit.
        #[arg(long)]
        check: bool,
    },
    /// Make the private certificate authority and the certificates the daemon and its agents
    /// prove who they are with (mutual TLS).
    Certs {
        #[command(subcommand)]
        command: CertsCmd,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Make a new certificate authority: DIR/ca.pem and DIR/ca-key.pem (keep the key off the
    /// hosts once every certificate is issued).
    Ca {
        /// Directory to write into (made, mode 0700, when missing).
        #[arg(long)]
        dir: PathBuf,
        /// Days the authority is valid.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a certificate from the authority in DIR: DIR/NAME.pem and DIR/NAME-key.pem.
    Issue {
        /// Directory holding ca.pem and ca-key.pem; the new files go there too.
        #[arg(long)]
        dir: PathBuf,
        /// For an agent of this name.
        #[arg(long, conflicts_with = "daemon", required_unless_present = "daemon")]
        agent: Option<String>,
        /// For the daemon, under this name.
        #[arg(long)]
        daemon: Option<String>,
        /// An address or DNS name the agent is reached at (repeat for several).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
}

#[derive(Subcommand)]
enum ViaductCmd {
    /// Run the receiving end of a viaduct on a target host: images sent to it land under
    /// `--root`, verified, and are renamed into place only when whole.
    Serve {
        /// Address and port to listen on.
        #[arg(long, default_value = "127.0.0.1:7481")]
        listen: std::net::SocketAddr,
        /// Directory under which images land (must exist).
        #[arg(long)]
        root: PathBuf,
        /// File holding the pre-shared key (mode 0600; at least 32 bytes of secret).
        #[arg(long, env = "FLUIDCLOUD_VIADUCT_KEY_FILE")]
        key_file: PathBuf,
    },
}

#[derive(Subcommand)]
enum RelocationsCmd {
    /// Print one relocation's steps: state, timing, bytes moved and how each was verified.
    Show {
        #[command(flatten)]
        api: ApiArgs,
        /// The relocation (its decision's id).
        id: String,
        /// Follow it with progress bars until it commits or rolls back.
        #[arg(long)]
        watch: bool,
    },
    /// Cancel a relocation before its commit: copies in flight stop and it rolls back to the
    /// untouched source. Refused after the commit, with the reason.
    Cancel {
        #[command(flatten)]
        api: ApiArgs,
        /// The relocation (its decision's id).
        id: String,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Run the test cases beside every policy in a directory.
    Test {
        /// Directory holding `*.rhai` policies and their test files.
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // What FluidCloud writes (state, journal, decision log, provider roots, disk images,
    // bucket objects) is the owner's data: private to this user, as under the systemd unit's
    // `UMask=0077`, also when started from a shell with the usual 022.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    fluidcloud::sys::process::close_inherited_on_exec();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            // A configuration file that is missing or invalid is a configuration error.
            ExitCode::from(if e.is::<ConfigErrors>() { 2 } else { 1 })
        }
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(report)
}

/// The configuration and everything it names (policies, region table, API token), loaded
/// the way the daemon loads it.
fn load_all(path: &std::path::Path) -> Result<Loaded, ExitCode> {
    Loaded::from_file(path).map_err(report)
}

fn report(errors: ConfigErrors) -> ExitCode {
    eprintln!("{errors}");
    eprintln!(
        "{} problem{} in the configuration.",
        errors.0.len(),
        if errors.0.len() == 1 { "" } else { "s" }
    );
    ExitCode::from(2)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Daemon(c) => {
            let loaded = match load_all(&c.config) {
                Ok(l) => l,
                Err(code) => return Ok(code),
            };
            fluidcloud::telemetry::init_tracing(loaded.config().daemon.log_format);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(fluidcloud::daemon::run(loaded))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Check(c) => {
            let loaded = match load_all(&c.config) {
                Ok(l) => l,
                Err(code) => return Ok(code),
            };
            let config = loaded.config();
            println!(
                "{}: ok — {} providers, {} services, {} policies; API on {}; state in {}.",
                config.path.display(),
                config.providers.len(),
                config.services.len(),
                loaded.policies(),
                config.daemon.listen,
                config.daemon.state_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status(a) => client::status(&a),
        Cmd::Market { api, provider } => client::market(&api, provider.as_deref()),
        Cmd::Decisions {
            api,
            service,
            outcome,
            limit,
            approve,
            reject,
        } => match (approve, reject) {
            (Some(id), _) => client::answer(&api, &id, true),
            (_, Some(id)) => client::answer(&api, &id, false),
            _ => client::decisions(&api, service.as_deref(), outcome.as_deref(), limit),
        },
        Cmd::Reload(a) => client::reload(&a),
        Cmd::Relocations {
            api,
            service,
            state,
            limit,
            command,
        } => match command {
            None => client::relocations(&api, service.as_deref(), state.as_deref(), limit),
            Some(RelocationsCmd::Show { api, id, watch }) if watch => relocate::watch(&api, &id),
            Some(RelocationsCmd::Show { api, id, .. }) => client::relocation(&api, &id),
            Some(RelocationsCmd::Cancel { api, id }) => client::cancel(&api, &id),
        },
        Cmd::Plan {
            config,
            service,
            to,
            json,
        } => match load(&config.config) {
            Ok(c) => relocate::plan(c, &service, &to, json),
            Err(code) => Ok(code),
        },
        Cmd::Relocate {
            config,
            service,
            to,
            grace_period,
            quiet,
        } => match load(&config.config) {
            Ok(c) => {
                fluidcloud::telemetry::init_tracing(fluidcloud::config::LogFormat::Text);
                relocate::relocate(c, &service, &to, grace_period, quiet)
            }
            Err(code) => Ok(code),
        },
        Cmd::Policy {
            command: PolicyCmd::Test { dir },
        } => policy_test(&dir),
        Cmd::Viaduct {
            command:
                ViaductCmd::Serve {
                    listen,
                    root,
                    key_file,
                },
        } => viaduct_serve(listen, root, &key_file),
        Cmd::Certs { command } => certs(command),
        Cmd::Agent { config, check } => agent(&config.config, check),
    }
}

fn agent(path: &std::path::Path, check_only: bool) -> anyhow::Result<ExitCode> {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(errors) => return Ok(report(errors)),
    };
    if let Err(e) = fluidcloud::agent::check(&config) {
        eprintln!("error: {e}");
        return Ok(ExitCode::from(2));
    }
    if check_only {
        let agent = config.agent.as_ref().expect("checked");
        println!(
            "{}: ok — agent serving {} on {} (viaduct {}), reached as {}.",
            config.path.display(),
            config
                .providers
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            agent.listen,
            agent.viaduct_listen,
            agent.advertise
        );
        return Ok(ExitCode::SUCCESS);
    }
    fluidcloud::telemetry::init_tracing(config.daemon.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("The agent is stopping.");
        };
        fluidcloud::agent::serve(&config, shutdown).await
    })?;
    Ok(ExitCode::SUCCESS)
}

fn certs(command: CertsCmd) -> anyhow::Result<ExitCode> {
    use fluidcloud::sys::certs;
    use fluidcloud::sys::tls::Role;
    let written = match command {
        CertsCmd::Ca { dir, days } => certs::create_authority(&dir, days),
        CertsCmd::Issue {
            dir,
            agent,
            daemon,
            hosts,
            days,
        } => match (agent, daemon) {
            (Some(name), _) => certs::issue(&dir, Role::Agent, &name, &hosts, days),
            (None, Some(name)) => certs::issue(&dir, Role::Daemon, &name, &hosts, days),
            (None, None) => unreachable!("clap requires --agent or --daemon"),
        },
    };
    match written {
        Ok(w) => {
            println!("wrote {}", w.cert.display());
            println!("wrote {} (private: mode 0600)", w.key.display());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(2))
        }
    }
}

fn viaduct_serve(
    listen: std::net::SocketAddr,
    root: PathBuf,
    key_file: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    use fluidcloud::viaduct::{serve, PresharedKey, ReceiverOptions};
    fluidcloud::telemetry::init_tracing(fluidcloud::config::LogFormat::Auto);
    let key = match PresharedKey::from_file(key_file) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    if !root.is_dir() {
        eprintln!(
            "error: the viaduct root {} is not a directory",
            root.display()
        );
        return Ok(ExitCode::from(2));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
        let opts = ReceiverOptions::new(root.clone(), key);
        let shutdown = opts.shutdown.clone();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("Stopping the viaduct receiver.");
            shutdown.cancel();
        });
        tracing::info!(
            "The viaduct receiver listens on {listen}; images land under {}.",
            root.display()
        );
        serve(listener, opts).await?;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

fn policy_test(dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    let limits = fluidcloud::policy::Limits::default();
    match fluidcloud::policy::testing::run_dir(dir, &limits) {
        Ok(report) => {
            println!("{report}");
            Ok(if report.success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(2))
        }
    }
}
