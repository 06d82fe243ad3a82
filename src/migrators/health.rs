//! The health-check migrator: the target must pass the service's health check, or without
//! one, hold every volume and bucket and run every VM and app; the downtime ends here.
//! Nothing to undo.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{Cx, Migrator, MigratorError};
use crate::model::ComponentKind;
use crate::providers::{AppState, VmState};

pub struct HealthCheck;

#[async_trait::async_trait]
impl Migrator for HealthCheck {
    async fn run(&self, cx: &Cx) -> Result<Value, MigratorError> {
        health_check(cx).await
    }

    async fn undo(&self, _: &Cx) -> Result<(), MigratorError> {
        Ok(())
    }
}

async fn health_check(cx: &Cx) -> Result<Value, MigratorError> {
    let spec = cx.spec()?;
    if let Some(check) = &spec.health_check {
        // The URL may name where the target's apps are reached: `http://{app.web.host}:8080/`.
        let mut check = check.clone();
        if let Some(url) = check.url.as_mut().filter(|u| u.contains('{')) {
            let values = super::config::target_values(cx).await?;
            *url = super::rewrite::render_template(url, &values)?;
        }
        let report = cx.target.health_check(cx.svc(), &check).await?;
        return Ok(json!({ "detail": report.detail, "attempts": report.attempts }));
    }
    // Without a check of its own, every volume and bucket must be there, every VM must run
    // and every app must run and accept connections on its port.
    let mut present = Vec::new();
    for c in &spec.components {
        match c.kind {
            ComponentKind::Vm => {
                let status = cx.target.vm_status(cx.svc(), &c.name).await?;
                if !matches!(&status, Some(s) if s.state == VmState::Running) {
                    return Err(MigratorError::Check(format!(
                        "VM `{}/{}` is not running at `{}` ({})",
                        cx.svc(),
                        c.name,
                        cx.plan.to,
                        status
                            .map(|s| s
                                .detail
                                .unwrap_or_else(|| format!("{:?}", s.state).to_lowercase()))
                            .unwrap_or_else(|| "unknown".to_string())
                    )));
                }
                present.push(format!("vm {}", c.name));
            }
            ComponentKind::Volume => {
                if cx.target.volume_info(cx.svc(), &c.name).await?.is_none() {
                    return Err(MigratorError::Check(format!(
                        "volume `{}/{}` is missing at `{}`",
                        cx.svc(),
                        c.name,
                        cx.plan.to
                    )));
                }
                present.push(format!("volume {}", c.name));
            }
            ComponentKind::Bucket if !c.keep_at_source => {
                cx.target.list_objects(cx.svc(), &c.name).await?;
                present.push(format!("bucket {}", c.name));
            }
            _ => {}
        }
    }
    let deadline = Instant::now() + cx.config.conduit.health_timeout;
    let mut checked = Vec::new();
    for c in spec
        .components
        .iter()
        .filter(|c| c.kind == ComponentKind::App)
    {
        loop {
            let status = cx.target.app_status(cx.svc(), &c.name).await?;
            let ok = match &status {
                Some(s) if s.state == AppState::Running => match &s.endpoint {
                    Some(ep) => tokio::net::TcpStream::connect((ep.host.as_str(), ep.port))
                        .await
                        .is_ok(),
                    None => true,
                },
                _ => false,
            };
            if ok {
                checked.push(c.name.clone());
                break;
            }
            if Instant::now() >= deadline {
                return Err(MigratorError::Check(format!(
                    "app `{}/{}` at `{}` did not come up within {:?}: {}",
                    cx.svc(),
                    c.name,
                    cx.plan.to,
                    cx.config.conduit.health_timeout,
                    status
                        .and_then(|s| s.last_exit.or(s.last_error))
                        .unwrap_or_else(|| "it does not accept connections".into())
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(json!({ "present": present, "apps_up": checked }))
}
