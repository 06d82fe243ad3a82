//! `fluidcloud daemon`: starts the broker and the HTTP API, tells systemd when it is ready,
//! reloads on SIGHUP and stops cleanly on SIGTERM or SIGINT.

use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};

use crate::broker::supervisor::{Command, Loaded, Supervisor};
use crate::conduit::engine::Engine;
use crate::conduit::Conduit;
use crate::telemetry::Metrics;

/// Runs the daemon until it is told to stop.
pub async fn run(loaded: Loaded) -> anyhow::Result<()> {
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
    let (supervisor, handle) = Supervisor::new(loaded, conduit, metrics, notify)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    tracing::info!("Serving the API and /metrics on http://{listen}.");
    let app = crate::api::router(handle.clone(), token);
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let api = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            })
            .await
    });
    let broker = tokio::spawn(supervisor.run());
    if notify {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    }
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
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
    let _ = handle.commands.send(Command::Shutdown).await;
    let _ = stop_tx.send(true);
    match broker.await {
        Ok(Ok(())) => tracing::info!("The broker exited cleanly."),
        Ok(Err(e)) => tracing::error!("The broker exited with an error: {e}."),
        Err(e) => tracing::error!("The broker task failed: {e}."),
    }
    match api.await {
        Ok(Ok(())) => tracing::info!("The API server exited cleanly."),
        Ok(Err(e)) => tracing::error!("The API server exited with an error: {e}."),
        Err(e) => tracing::error!("The API server task failed: {e}."),
    }
    Ok(())
}

/// Creates the state directory readable by the daemon's user only (0700), as systemd's
/// `StateDirectoryMode=0700` does: it holds the API token, the journal and the decision log.
/// An existing directory others can enter is used as it is, with a warning.
fn create_state_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| anyhow::anyhow!("cannot create the state directory {}: {e}", dir.display()))?;
    let mode = std::fs::metadata(dir)
        .map_err(|e| anyhow::anyhow!("cannot read the state directory {}: {e}", dir.display()))?
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
