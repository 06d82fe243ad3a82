//! `fluidcloud daemon`: starts the broker and the HTTP API, tells systemd when it is ready,
//! reloads on SIGHUP and stops cleanly on SIGTERM or SIGINT: the broker's workers and the
//! API are told to stop, then joined, each within a bound.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::broker::supervisor::{BrokerError, Command, Loaded, Seams, Supervisor, SHUTDOWN_BOUND};
use crate::conduit::engine::Engine;
use crate::conduit::journal::{Journal, JournalError};
use crate::conduit::Conduit;
use crate::model::PlacementBook;
use crate::sys::secret::TokenError;
use crate::telemetry::Metrics;

/// How long the API gets to finish its requests in flight once told to stop.
const API_SHUTDOWN_BOUND: Duration = Duration::from_secs(10);

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot {action} the state directory {}: {source}", path.display())]
    StateDir {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install the signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Runs the daemon until it is told to stop.
pub async fn run(loaded: Loaded) -> Result<(), DaemonError> {
    let config = loaded.config().clone();
    let notify = std::env::var_os("NOTIFY_SOCKET").is_some();
    tracing::info!(
        "Initializing FluidCloud {} from {}.",
        env!("CARGO_PKG_VERSION"),
        config.path.display()
    );
    tracing::info!(
        "Initializing the state directory {}.",
        config.daemon.state_dir.display()
    );
    create_state_dir(&config.daemon.state_dir)?;
    let (token, token_path) = crate::api::load_token(&config)?;
    tracing::info!("The API token is read from {}.", token_path.display());
    let listen = config.daemon.listen;
    // The providers' roots are this process's from their first use until it exits, through
    // any number of reloads.
    crate::providers::keep_root_locks_until_exit();
    let journal = config.daemon.state_dir.join("journal.sqlite");
    let metrics = Arc::new(Metrics::new());
    let engine = Arc::new(Engine::open(
        Arc::new(config.clone()),
        Some(metrics.clone()),
        None,
    )?);
    tracing::info!("The relocation journal is {}.", journal.display());
    // The broker reads where services run from the journal, on a connection of its own.
    let placements: Arc<dyn PlacementBook> = Arc::new(Journal::open(&journal)?);
    engine.open_providers();
    let picked_up = engine.resume_unfinished();
    if picked_up > 0 {
        tracing::info!("Picked up {picked_up} unfinished relocations.");
    }
    {
        // Deployment creates volumes and starts apps; it must not hold up the API.
        let engine = engine.clone();
        tokio::spawn(async move { engine.deploy_all().await });
    }
    let conduit: Arc<dyn Conduit> = engine.clone();
    let shutdown = CancellationToken::new();
    let (supervisor, handle) = Supervisor::new(
        loaded,
        Seams {
            conduit,
            placements,
            metrics,
            shutdown: shutdown.clone(),
            notify,
            clock: Arc::new(crate::broker::clock::SystemClock),
        },
    )?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: listen,
            source,
        })?;
    tracing::info!("Serving the API and /metrics on http://{listen}.");
    let app = crate::api::router(handle.clone(), token);
    let api_stop = shutdown.clone();
    let mut api = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(api_stop.cancelled_owned())
            .await
    });
    let mut broker = tokio::spawn(supervisor.run());
    if notify {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    }
    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                tracing::info!("SIGHUP received; reloading the configuration.");
                // The supervisor reports the outcome itself; a refused file keeps the old one.
                let _ = handle.ask(Command::Reload).await;
            }
            _ = term.recv() => { tracing::info!("SIGTERM received; stopping."); break; }
            _ = int.recv() => { tracing::info!("SIGINT received; stopping."); break; }
        }
    }
    if notify {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    }
    shutdown.cancel();
    // The supervisor bounds its own wait for its workers; this bound is for a supervisor
    // stuck in a handler.
    match tokio::time::timeout(SHUTDOWN_BOUND * 2, &mut broker).await {
        // The supervisor has reported how its workers ended.
        Ok(Ok(Ok(_stopped))) => tracing::info!("The broker exited cleanly."),
        Ok(Ok(Err(e))) => tracing::error!("The broker exited with an error: {e}."),
        Ok(Err(e)) => tracing::error!("The broker task failed: {e}."),
        Err(_) => {
            tracing::error!("The broker did not stop in time; it is aborted.");
            broker.abort();
        }
    }
    match tokio::time::timeout(API_SHUTDOWN_BOUND, &mut api).await {
        Ok(Ok(Ok(()))) => tracing::info!("The API server exited cleanly."),
        Ok(Ok(Err(e))) => tracing::error!("The API server exited with an error: {e}."),
        Ok(Err(e)) => tracing::error!("The API server task failed: {e}."),
        Err(_) => {
            tracing::error!("The API server did not stop in time; it is aborted.");
            api.abort();
        }
    }
    Ok(())
}

/// Creates the state directory readable by the daemon's user only (0700), as systemd's
/// `StateDirectoryMode=0700` does: it holds the API token, the journal and the decision log.
/// An existing directory others can enter is used as it is, with a warning.
fn create_state_dir(dir: &Path) -> Result<(), DaemonError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let err = |action| {
        move |source| DaemonError::StateDir {
            action,
            path: dir.to_path_buf(),
            source,
        }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err("create"))?;
    let mode = std::fs::metadata(dir)
        .map_err(err("read"))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            "The state directory {} is open to other users (mode {:o}); run `chmod 700` on it.",
            dir.display(),
            mode & 0o777
        );
    }
    Ok(())
}
