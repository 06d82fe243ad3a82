//! The cutover migrator: runs the service's cutover hook, which repoints clients at the
//! target; its undo runs the hook again in its rollback phase, pointing them back.

use serde_json::Value;

use super::hooks::{self, HookEvent, HookPhase};
use super::{deploy, Cx, Migrator, MigratorError};
use crate::model::ComponentKind;

pub struct Cutover;

#[async_trait::async_trait]
impl Migrator for Cutover {
    async fn run(&self, cx: &Cx) -> Result<Value, MigratorError> {
        cutover(cx, "cutover").await
    }

    async fn undo(&self, cx: &Cx) -> Result<(), MigratorError> {
        cutover(cx, "rollback").await.map(|_| ())
    }
}

/// An address as it goes before `:port`: IPv6 in brackets.
fn host_in_url(address: &str) -> String {
    if address.contains(':') {
        format!("[{address}]")
    } else {
        address.to_string()
    }
}

/// The endpoints clients use, `host:port` by app, at a provider.
fn endpoints(cx: &Cx) -> Result<Option<String>, MigratorError> {
    let spec = cx.spec()?;
    let mut out = Vec::new();
    for c in spec
        .components
        .iter()
        .filter(|c| c.kind == ComponentKind::App)
    {
        if let Some(port) = deploy::app_spec(cx.svc(), c)?.port {
            out.push(format!("{}:{port}", host_in_url(&cx.target.address())));
        }
    }
    Ok((!out.is_empty()).then(|| out.join(",")))
}

async fn cutover(cx: &Cx, phase: &str) -> Result<Value, MigratorError> {
    let spec = cx.spec()?;
    let Some(hook) = &spec.cutover else {
        return Ok(Value::Null);
    };
    let endpoint = endpoints(cx)?;
    let mut event = HookEvent::new(
        cx.id.clone(),
        cx.svc(),
        HookPhase::Cutover,
        cx.plan.from.clone(),
        cx.plan.to.clone(),
    )
    .with_endpoints(endpoint.clone(), endpoint);
    if phase == "rollback" {
        event = event.rollback();
    }
    let outcome = hooks::run_hook(hook, &event)
        .await
        .map_err(|source| MigratorError::Hook {
            what: format!("the cutover hook ({phase})"),
            source: Box::new(source),
        })?;
    Ok(serde_json::to_value(outcome).unwrap_or(Value::Null))
}
