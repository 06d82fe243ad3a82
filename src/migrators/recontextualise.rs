//! The re-contextualisation migrator: hands every target app the context document (its
//! provider, region, endpoints, volume paths and buckets) and runs the service's
//! re-contextualisation hook. Nothing to undo: the files go with the target's apps.

use serde_json::{json, Value};

use super::config::target_values;
use super::hooks::{
    self, AppEndpoint, BucketContext, ContextDocument, HookEvent, HookPhase, CONTEXT_FILE_NAME,
};
use super::{deploy, Cx, Migrator, MigratorError};
use crate::model::ComponentKind;

pub struct Recontextualise;

#[async_trait::async_trait]
impl Migrator for Recontextualise {
    async fn run(&self, cx: &Cx) -> Result<Value, MigratorError> {
        recontextualise(cx).await
    }

    async fn undo(&self, _: &Cx) -> Result<(), MigratorError> {
        Ok(())
    }
}

async fn recontextualise(cx: &Cx) -> Result<Value, MigratorError> {
    let spec = cx.spec()?;
    let svc = cx.svc();
    let provider = cx.config.providers.get(&cx.plan.to);
    let mut doc = ContextDocument::new(
        svc,
        cx.plan.to.clone(),
        provider.map(|p| p.region.clone()).unwrap_or_default(),
        provider.and_then(|p| p.cloud.clone()),
        cx.id.clone(),
    );
    let values = target_values(cx).await?;
    for c in &spec.components {
        match c.kind {
            ComponentKind::App => {
                let app = deploy::app_spec(svc, c)?;
                if let Some(port) = app.port {
                    doc.endpoints.insert(
                        c.name.clone(),
                        AppEndpoint {
                            host: "127.0.0.1".into(),
                            port,
                        },
                    );
                }
            }
            ComponentKind::Volume => {
                if let Some(p) = values.get(&format!("volume.{}.path", c.name)) {
                    doc.volumes.insert(c.name.clone(), p.to_string());
                }
            }
            ComponentKind::Bucket => {
                doc.buckets.insert(
                    c.name.clone(),
                    BucketContext {
                        path: values
                            .get(&format!("bucket.{}.path", c.name))
                            .map(str::to_string),
                        endpoint: values
                            .get(&format!("bucket.{}.endpoint", c.name))
                            .map(str::to_string),
                    },
                );
            }
            _ => {}
        }
    }
    let json_doc = serde_json::to_vec_pretty(&doc).expect("context serialises");
    let mut written = Vec::new();
    for c in spec
        .components
        .iter()
        .filter(|c| c.kind == ComponentKind::App)
    {
        let path = cx
            .target
            .write_app_file(svc, &c.name, CONTEXT_FILE_NAME, &json_doc)
            .await?;
        written.push(path);
    }
    let hook = match &spec.recontextualise {
        Some(h) => {
            let event = HookEvent::new(
                cx.id.clone(),
                svc,
                HookPhase::Recontextualise,
                cx.plan.from.clone(),
                cx.plan.to.clone(),
            )
            .with_fact(
                "context_file",
                written
                    .first()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            );
            let outcome =
                hooks::run_hook(h, &event)
                    .await
                    .map_err(|source| MigratorError::Hook {
                        what: "the re-contextualisation hook".to_string(),
                        source: Box::new(source),
                    })?;
            serde_json::to_value(outcome).unwrap_or(Value::Null)
        }
        None => Value::Null,
    };
    Ok(json!({ "context_files": written, "hook": hook }))
}
