//! The decommissioning migrator: after the grace period, deletes the source's copy of the
//! service (apps, volumes, VMs and their disks, buckets that moved) and the relocation's
//! working files. Entries of a bucket that are not objects were never copied, so they and
//! their bucket stay. There is no undo: the target has been live since the commit.

use std::time::Duration;

use serde_json::{json, Value};

use super::{name_some, Cx, Migrator, MigratorError};
use crate::model::ComponentKind;
use crate::providers::copier::{retry_transient, OBJECT_ATTEMPTS};
use crate::providers::{self, StopOptions};

pub struct Decommission;

#[async_trait::async_trait]
impl Migrator for Decommission {
    async fn run(&self, cx: &Cx) -> Result<Value, MigratorError> {
        decommission(cx).await
    }

    async fn undo(&self, _: &Cx) -> Result<(), MigratorError> {
        Ok(())
    }
}

async fn decommission(cx: &Cx) -> Result<Value, MigratorError> {
    let spec = cx.spec()?;
    let svc = cx.svc();
    let mut removed = Vec::new();
    let mut left = Vec::new();
    for c in &spec.components {
        match c.kind {
            ComponentKind::App => {
                cx.source
                    .stop_app(
                        svc,
                        &c.name,
                        StopOptions {
                            timeout: cx.config.conduit.stop_timeout,
                            kill_after_timeout: false,
                        },
                    )
                    .await?;
                cx.source.remove_app(svc, &c.name).await?;
                removed.push(format!("app {}", c.name));
            }
            ComponentKind::Volume => {
                let op = cx.source.delete_volume(svc, &c.name).await?;
                providers::wait_for(cx.source.as_ref(), &op.id, Duration::from_secs(600)).await?;
                removed.push(format!("volume {}", c.name));
            }
            ComponentKind::Vm => {
                // Powered down at cutover; never switched off here.
                cx.source
                    .stop_vm(
                        svc,
                        &c.name,
                        StopOptions {
                            timeout: cx.config.conduit.stop_timeout,
                            kill_after_timeout: false,
                        },
                    )
                    .await?;
                cx.source.remove_vm(svc, &c.name).await?;
                let op = cx.source.delete_volume(svc, &c.name).await?;
                providers::wait_for(cx.source.as_ref(), &op.id, Duration::from_secs(600)).await?;
                removed.push(format!("vm {} and its disk", c.name));
            }
            ComponentKind::Bucket if !c.keep_at_source => {
                // Each call again on temporary failures: one reset must not leave the
                // relocation in its grace period until the next start.
                let listing = format!("Listing bucket `{svc}/{}` at `{}`", c.name, cx.plan.from);
                let listed = retry_transient(OBJECT_ATTEMPTS, None, &listing, || {
                    cx.source.list_objects(svc, &c.name)
                })
                .await;
                match listed {
                    Ok(objects) => {
                        for o in objects {
                            let what = format!(
                                "Deleting object `{}` of bucket `{svc}/{}` at `{}`",
                                o.key, c.name, cx.plan.from
                            );
                            retry_transient(OBJECT_ATTEMPTS, None, &what, || {
                                cx.source.delete_object(svc, &c.name, &o.key)
                            })
                            .await?;
                        }
                        // Never copied, so never deleted: the bucket stays with them.
                        let others = cx.source.list_non_objects(svc, &c.name).await?;
                        if !others.is_empty() {
                            tracing::warn!(
                                "Relocation {}: bucket `{svc}/{}` at `{}` keeps {} entries that are not objects and were not copied: {}.",
                                cx.id,
                                c.name,
                                cx.plan.from,
                                others.len(),
                                name_some(&others)
                            );
                            left.push(format!(
                                "bucket {}: {} entries that are not objects were not copied and stay at `{}`: {}",
                                c.name,
                                others.len(),
                                cx.plan.from,
                                name_some(&others)
                            ));
                            continue;
                        }
                        let what =
                            format!("Deleting bucket `{svc}/{}` at `{}`", c.name, cx.plan.from);
                        retry_transient(OBJECT_ATTEMPTS, None, &what, || {
                            cx.source.delete_bucket(svc, &c.name)
                        })
                        .await?;
                    }
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e.into()),
                }
                removed.push(format!("bucket {}", c.name));
            }
            _ => {}
        }
    }
    let _ = std::fs::remove_dir_all(&cx.work_dir);
    if left.is_empty() {
        Ok(json!({ "removed": removed }))
    } else {
        Ok(json!({ "removed": removed, "left_in_place": left }))
    }
}
