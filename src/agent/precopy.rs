//! Pre-copy passes over the disks of a VM this host runs: the daemon cannot read them (the
//! emulator's NBD server listens on a unix socket here), so the agent asks its driver for
//! the pass ([`Provider::track_vm_disks`]), reads it into a raw staging image per disk under
//! its pre-copy directory, and, for the last pass, compares each image with the halted
//! guest's disk. The images are then sent from here like volumes
//! ([`super::transfers::Transfers::send_staging`]); a send after the first carries only the
//! chunks that changed.

use std::path::Path;

use tokio_util::sync::CancellationToken;

use super::transfers::TransferError;
use crate::providers::precopy::{compare_held, prepare_staging, read_pass};
use crate::providers::remote::wire::{precopy_staging_name, PassReport, PassedDisk, PrecopyPass};
use crate::providers::{object, DiskPassKind, Provider, ProviderError};

/// Runs one pass of `req` against `provider`, reading into staging images under `dir`.
pub async fn pass(
    provider: &dyn Provider,
    dir: &Path,
    req: &PrecopyPass,
) -> Result<PassReport, TransferError> {
    if req.compare && req.kind != DiskPassKind::Final {
        return Err(TransferError::Invalid(
            "only the final pass of a pre-copy, over a halted guest, can be compared with its disks"
                .into(),
        ));
    }
    let (svc, vm) = (req.service.as_str(), req.vm.as_str());
    let pass = provider.track_vm_disks(svc, vm, req.kind).await?;
    let names: Vec<String> = pass
        .disks
        .iter()
        .map(|d| precopy_staging_name(&req.relocation, provider.name(), svc, &d.volume))
        .collect();
    let mut images = Vec::new();
    for (d, name) in pass.disks.iter().zip(&names) {
        crate::viaduct::check_name(name).map_err(|e| TransferError::Invalid(e.to_string()))?;
        let path = dir.join(name);
        prepare_staging(d, &path)?;
        images.push(path);
    }
    // The daemon's call ending (it was stopped, or it died) drops this future: nothing
    // else cancels a pass.
    let read = read_pass(vm, &pass, &images, &CancellationToken::new()).await?;
    let mut disks = Vec::new();
    for (((d, r), name), image) in pass.disks.iter().zip(read).zip(names).zip(&images) {
        let mut verified = None;
        if req.compare {
            let info = provider.volume_info(svc, &d.volume).await?.ok_or_else(|| {
                ProviderError::NotFound {
                    provider: provider.name().to_string(),
                    object: object::volume(svc, &d.volume),
                }
            })?;
            let source = info.path.ok_or_else(|| TransferError::NoPath {
                provider: provider.name().to_string(),
                service: svc.to_string(),
                volume: d.volume.clone(),
            })?;
            compare_held(info.format, &source, image).await?;
            verified = Some(
                "qemu-img compare of the staging image with the halted source disk, on the source's host"
                    .to_string(),
            );
        }
        disks.push(PassedDisk {
            volume: d.volume.clone(),
            size: d.size,
            incremental: d.bitmap.is_some(),
            bytes_read: r.bytes,
            staging: name,
            verified,
        });
    }
    tracing::info!(
        "Read a {:?} pre-copy pass of {}: {} bytes.",
        req.kind,
        object::vm(svc, vm),
        disks.iter().map(|d| d.bytes_read).sum::<u64>()
    );
    Ok(PassReport { disks })
}
