//! The app and VM migrators: the source's apps stop and its VMs power down at the start of
//! the cutover (undone by starting them again), and the target's start from the relocated
//! data (undone by stopping and removing them).

use std::time::Duration;

use serde_json::{json, Value};

use super::{deploy, Cx, Migrator, MigratorError};
use crate::model::ComponentKind;
use crate::providers::{self, StopOptions};

/// `stop:<app>` and `stop-vm:<vm>`: stops a source app or powers a source VM down, killing
/// it after the stop timeout only where the configuration allows.
pub struct StopSource {
    /// [`ComponentKind::App`] or [`ComponentKind::Vm`].
    pub kind: ComponentKind,
    pub name: String,
}

#[async_trait::async_trait]
impl Migrator for StopSource {
    async fn run(&self, cx: &Cx) -> Result<Value, MigratorError> {
        let options = StopOptions {
            timeout: cx.config.conduit.stop_timeout,
            kill_after_timeout: cx.config.conduit.kill_after_stop_timeout,
        };
        let outcome = match self.kind {
            ComponentKind::Vm => cx.source.stop_vm(cx.svc(), &self.name, options).await?,
            _ => cx.source.stop_app(cx.svc(), &self.name, options).await?,
        };
        Ok(json!({ "outcome": outcome }))
    }

    async fn undo(&self, cx: &Cx) -> Result<(), MigratorError> {
        let svc = cx.svc();
        if self.kind == ComponentKind::Vm {
            let spec = cx.spec()?;
            let vm = deploy::vm_spec(spec, cx.component(ComponentKind::Vm, &self.name)?)?;
            let op = cx.source.start_vm(svc, &vm).await?;
            providers::wait_for(cx.source.as_ref(), &op.id, Duration::from_secs(120)).await?;
        } else {
            let c = cx.component(ComponentKind::App, &self.name)?;
            let spec = deploy::app_spec(svc, c)?;
            let op = cx.source.start_app(svc, &spec).await?;
            providers::wait_for(cx.source.as_ref(), &op.id, Duration::from_secs(60)).await?;
        }
        Ok(())
    }
}

/// `start:<app>`: starts an app at the target.
pub struct StartTarget {
    pub app: String,
}

#[async_trait::async_trait]
impl Migrator for StartTarget {
    async fn run(&self, cx: &Cx) -> Result<Value, MigratorError> {
        let c = cx.component(ComponentKind::App, &self.app)?;
        let spec = deploy::app_spec(cx.svc(), c)?;
        let op = cx.target.start_app(cx.svc(), &spec).await?;
        let op = providers::wait_for(cx.target.as_ref(), &op.id, Duration::from_secs(120)).await?;
        Ok(json!({ "detail": op.detail }))
    }

    async fn undo(&self, cx: &Cx) -> Result<(), MigratorError> {
        let svc = cx.svc();
        cx.target
            .stop_app(
                svc,
                &self.app,
                StopOptions {
                    timeout: cx.config.conduit.stop_timeout,
                    // The target never served anyone for real: it may be killed.
                    kill_after_timeout: true,
                },
            )
            .await?;
        cx.target.remove_app(svc, &self.app).await?;
        Ok(())
    }
}

/// `start-vm:<vm>`: boots a VM at the target from its relocated disk, with the machine
/// adapted to the target provider.
pub struct StartTargetVm {
    pub vm: String,
}

#[async_trait::async_trait]
impl Migrator for StartTargetVm {
    async fn run(&self, cx: &Cx) -> Result<Value, MigratorError> {
        let spec = cx.spec()?;
        let vm = deploy::vm_spec(spec, cx.component(ComponentKind::Vm, &self.vm)?)?;
        let op = cx.target.start_vm(cx.svc(), &vm).await?;
        let op = providers::wait_for(cx.target.as_ref(), &op.id, Duration::from_secs(120)).await?;
        Ok(json!({ "detail": op.detail }))
    }

    async fn undo(&self, cx: &Cx) -> Result<(), MigratorError> {
        let svc = cx.svc();
        cx.target
            .stop_vm(
                svc,
                &self.vm,
                StopOptions {
                    timeout: cx.config.conduit.stop_timeout,
                    // The target never served anyone for real: it may be switched off.
                    kill_after_timeout: true,
                },
            )
            .await?;
        cx.target.remove_vm(svc, &self.vm).await?;
        Ok(())
    }
}
