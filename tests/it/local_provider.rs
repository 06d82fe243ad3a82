//! The `local` provider against real files, real `qemu-img` and real processes: volumes,
//! buckets, the demo app under supervision (crash, restart, stop, adoption by a new provider
//! instance), health checks and pid files that name someone else's process.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{demo_app, free_port};
use fluidcloud::model::HealthCheck;
use fluidcloud::providers::local::LocalProvider;
use fluidcloud::providers::{
    wait_for, AppSpec, AppState, AppStatus, DiskFormat, OperationKind, OperationState, Provider,
    ProviderError, StopOptions, StopOutcome, VolumeSpec,
};

const MIB: u64 = 1024 * 1024;

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client")
}

async fn get_text(url: &str) -> Result<String, String> {
    let r = http().get(url).send().await.map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        return Err(format!("{url} answered {}", r.status()));
    }
    r.text().await.map_err(|e| e.to_string())
}

/// Polls the app's status until `ok` holds; panics with the last status after `timeout`.
async fn wait_status(
    p: &dyn Provider,
    service: &str,
    app: &str,
    timeout: Duration,
    ok: impl Fn(&AppStatus) -> bool,
) -> AppStatus {
    let deadline = Instant::now() + timeout;
    loop {
        let status = p
            .app_status(service, app)
            .await
            .expect("status")
            .expect("app is known");
        if ok(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "condition not reached within {timeout:?}; last status {status:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn alive(pid: u32) -> bool {
    // A zombie has exited; only a process that still runs counts.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z')
        })
        .unwrap_or(false)
}

fn kill9(pid: u32) {
    // SAFETY: plain signal to a process the test started through the provider.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
}

fn health(url: String, timeout: Duration) -> HealthCheck {
    HealthCheck {
        url: Some(url),
        command: None,
        timeout,
    }
}

fn stop_gently() -> StopOptions {
    StopOptions {
        timeout: Duration::from_secs(5),
        kill_after_timeout: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_are_created_inspected_and_deleted_idempotently() {
    let tmp = tempfile::tempdir().unwrap();
    let p = LocalProvider::open_at("home", tmp.path(), DiskFormat::Qcow2).unwrap();
    assert_eq!(p.preferred_disk_format(), DiskFormat::Qcow2);
    let size = 64 * MIB;
    let mut ops = Vec::new();
    for format in DiskFormat::ALL {
        let name = format!("data-{format}");
        let spec = VolumeSpec {
            name: name.clone(),
            size_bytes: size,
            format,
        };
        let op = p.create_volume("shop", &spec).await.unwrap();
        assert_eq!(op.kind, OperationKind::CreateVolume);
        assert_eq!(op.state, OperationState::Succeeded);
        let info = p
            .volume_info("shop", &name)
            .await
            .unwrap()
            .expect("created");
        assert_eq!((info.format, info.virtual_size), (format, size));
        assert!(
            info.allocated_bytes < size,
            "{format}: a new image should be sparse, allocated {}",
            info.allocated_bytes
        );
        let path = info.path.clone().expect("local path");
        assert_eq!(
            path,
            p.root()
                .join("volumes/shop")
                .join(format!("{name}.{format}"))
        );
        // qemu-img, asked to guess, must recognise the file as the format we asked for.
        let probe = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&path)
            .output()
            .unwrap();
        let probed: serde_json::Value = serde_json::from_slice(&probe.stdout).unwrap();
        assert_eq!(probed["format"], format.as_str());

        let again = p.create_volume("shop", &spec).await.unwrap();
        assert_eq!(again.state, OperationState::Succeeded);
        assert!(again.detail.contains("already existed"), "{}", again.detail);

        let bigger = VolumeSpec {
            size_bytes: size * 2,
            ..spec.clone()
        };
        let err = p.create_volume("shop", &bigger).await.unwrap_err();
        assert!(matches!(err, ProviderError::Conflict { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("provider `home`") && msg.contains(&format!("volume `shop/{name}`")),
            "{msg}"
        );

        let other_format = if format == DiskFormat::Raw {
            DiskFormat::Qcow2
        } else {
            DiskFormat::Raw
        };
        let err = p
            .create_volume(
                "shop",
                &VolumeSpec {
                    format: other_format,
                    ..spec.clone()
                },
            )
            .await
            .unwrap_err();
        assert!(matches!(err, ProviderError::Conflict { .. }), "{err}");
        ops.push(op.id);
    }

    // Data written through the path is what a reader of the volume gets.
    let raw = p.volume_info("shop", "data-raw").await.unwrap().unwrap();
    let raw_path = raw.path.unwrap();
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&raw_path)
            .unwrap();
        f.write_all(&[7u8; 4096]).unwrap();
    }
    let after = p.volume_info("shop", "data-raw").await.unwrap().unwrap();
    assert!(after.allocated_bytes >= 4096, "{after:?}");
    assert_eq!(after.virtual_size, size, "writing must not change the size");

    let names: Vec<String> = p
        .list_volumes("shop")
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["data-qcow2", "data-raw", "data-vhdx", "data-vmdk"]);
    assert!(p.list_volumes("nobody").await.unwrap().is_empty());

    for (bad_name, bad_size) in [("../x", MIB), ("ok", 1000), ("ok", 0)] {
        let err = p
            .create_volume(
                "shop",
                &VolumeSpec {
                    name: bad_name.to_string(),
                    size_bytes: bad_size,
                    format: DiskFormat::Raw,
                },
            )
            .await
            .unwrap_err();
        assert!(matches!(err, ProviderError::Invalid { .. }), "{err}");
    }

    // Operations stay answerable by id after the provider is dropped and opened again, as
    // they must be for a journal resuming after a restart.
    drop(p);
    let p = LocalProvider::open_at("home", tmp.path(), DiskFormat::Qcow2).unwrap();
    for id in &ops {
        let op = wait_for(&*p, id, Duration::from_secs(1)).await.unwrap();
        assert_eq!(op.kind, OperationKind::CreateVolume);
    }
    let err = p
        .operation(&fluidcloud::providers::OperationId::new("op-1-ffff"))
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");

    for format in DiskFormat::ALL {
        let name = format!("data-{format}");
        let op = p.delete_volume("shop", &name).await.unwrap();
        assert_eq!(op.state, OperationState::Succeeded);
        assert!(p.volume_info("shop", &name).await.unwrap().is_none());
        let again = p.delete_volume("shop", &name).await.unwrap();
        assert!(again.detail.contains("did not exist"), "{}", again.detail);
    }
    assert!(!raw_path.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buckets_store_list_and_refuse_keys_that_escape() {
    let tmp = tempfile::tempdir().unwrap();
    let p = LocalProvider::open_at("home", &tmp.path().join("root"), DiskFormat::Raw).unwrap();
    let err = p.list_objects("shop", "assets").await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    p.ensure_bucket("shop", "assets").await.unwrap();
    p.ensure_bucket("shop", "assets").await.unwrap();

    let big: Vec<u8> = (0..700_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let objects: Vec<(&str, Vec<u8>)> = vec![
        ("a.txt", b"hello".to_vec()),
        ("img/2024/logo.bin", big.clone()),
        ("img/empty", Vec::new()),
    ];
    for (key, data) in &objects {
        let info = p
            .write_object(
                "shop",
                "assets",
                key,
                Box::pin(std::io::Cursor::new(data.clone())),
            )
            .await
            .unwrap();
        assert_eq!(info.size, data.len() as u64);
        assert_eq!(
            info.blake3.as_deref(),
            Some(blake3::hash(data).to_hex().as_str())
        );
    }
    let listed = p.list_objects("shop", "assets").await.unwrap();
    let keys: Vec<&str> = listed.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(keys, ["a.txt", "img/2024/logo.bin", "img/empty"]);
    for (o, (_, data)) in listed.iter().zip(&objects) {
        assert_eq!(o.size, data.len() as u64, "{}", o.key);
        assert_eq!(
            o.blake3.as_deref(),
            Some(blake3::hash(data).to_hex().as_str()),
            "{}",
            o.key
        );
    }
    // Objects are plain files at the documented place.
    assert_eq!(
        std::fs::read(p.root().join("buckets/shop/assets/img/2024/logo.bin")).unwrap(),
        big
    );

    let mut body = p
        .read_object("shop", "assets", "img/2024/logo.bin")
        .await
        .unwrap();
    assert_eq!(body.size, big.len() as u64);
    let mut back = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut body.stream, &mut back)
        .await
        .unwrap();
    assert_eq!(back, big);

    // Overwrite replaces; the listing follows.
    p.write_object("shop", "assets", "a.txt", Box::pin(&b"bye"[..]))
        .await
        .unwrap();
    let listed = p.list_objects("shop", "assets").await.unwrap();
    assert_eq!(listed[0].size, 3);

    // A new version has another entity tag than the one it replaces, even written at once
    // with the same size, and a write, a stat and a listing describe one version alike.
    let mut tags = Vec::new();
    for data in [&b"one"[..], &b"two"[..], &b"two"[..]] {
        let written = p
            .write_object("shop", "assets", "a.txt", Box::pin(data))
            .await
            .unwrap();
        let stat = p.stat_object("shop", "assets", "a.txt").await.unwrap();
        let listed = p.list_objects("shop", "assets").await.unwrap();
        let tag = written.etag.expect("a written object has an entity tag");
        assert_eq!(stat.unwrap().info.etag.as_deref(), Some(tag.as_str()));
        assert_eq!(listed[0].etag.as_deref(), Some(tag.as_str()));
        tags.push(tag);
    }
    assert!(tags[0] != tags[1] && tags[1] != tags[2], "{tags:?}");

    // Listings keep the hash of a file that has settled, and hash it again once it changes;
    // a file modified moments ago is hashed every time.
    let file = p.root().join("buckets/shop/assets/img/2024/logo.bin");
    let kept = |path: &Path| xattr::get(path, "user.fluidcloud.blake3").unwrap();
    assert_eq!(kept(&file), None, "a fresh file's hash was kept");
    let old = std::time::SystemTime::now() - Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let listed = p.list_objects("shop", "assets").await.unwrap();
    let logo = listed
        .iter()
        .find(|o| o.key == "img/2024/logo.bin")
        .unwrap();
    let hash = blake3::hash(&big).to_hex().to_string();
    assert_eq!(logo.blake3.as_deref(), Some(hash.as_str()));
    let value = String::from_utf8(kept(&file).expect("the settled file's hash is kept")).unwrap();
    assert_eq!(
        value,
        format!("{} {hash}", logo.etag.as_deref().unwrap()),
        "the hash is kept with the tag of the version it belongs to"
    );
    let mut changed = big.clone();
    changed[0] ^= 1;
    std::fs::write(&file, &changed).unwrap();
    let listed = p.list_objects("shop", "assets").await.unwrap();
    let logo = listed
        .iter()
        .find(|o| o.key == "img/2024/logo.bin")
        .unwrap();
    assert_eq!(
        logo.blake3.as_deref(),
        Some(blake3::hash(&changed).to_hex().as_str())
    );
    std::fs::write(&file, &big).unwrap();

    // A file outside the bucket that escaping keys would reach.
    std::fs::write(tmp.path().join("secret"), b"x").unwrap();
    for key in [
        "../../../../secret",
        "/etc/passwd",
        "img/../../other/x",
        "a//b",
        "",
    ] {
        let err = p
            .write_object("shop", "assets", key, Box::pin(&b"evil"[..]))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ProviderError::Invalid { .. }),
            "{key:?}: {err}"
        );
        let err = p.read_object("shop", "assets", key).await.unwrap_err();
        assert!(
            matches!(err, ProviderError::Invalid { .. }),
            "{key:?}: {err}"
        );
    }
    // A symbolic link planted inside the bucket is never followed.
    std::os::unix::fs::symlink(tmp.path(), p.root().join("buckets/shop/assets/link")).unwrap();
    let err = p
        .write_object("shop", "assets", "link/secret", Box::pin(&b"evil"[..]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("symbolic link"), "{err}");
    let err = p
        .read_object("shop", "assets", "link/secret")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read(tmp.path().join("secret")).unwrap(), b"x");
    let keys: Vec<String> = p
        .list_objects("shop", "assets")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert!(!keys.iter().any(|k| k.starts_with("link")), "{keys:?}");
    std::fs::remove_file(p.root().join("buckets/shop/assets/link")).unwrap();

    // A key cannot live below an object, nor an object where other keys live below.
    let err = p
        .write_object("shop", "assets", "a.txt/x", Box::pin(&b"1"[..]))
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Conflict { .. }), "{err}");
    let err = p
        .write_object("shop", "assets", "img", Box::pin(&b"1"[..]))
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Conflict { .. }), "{err}");

    let err = p.delete_bucket("shop", "assets").await.unwrap_err();
    assert!(err.to_string().contains("3 object(s)"), "{err}");
    for (key, _) in &objects {
        p.delete_object("shop", "assets", key).await.unwrap();
        p.delete_object("shop", "assets", key).await.unwrap();
    }
    assert!(
        !p.root().join("buckets/shop/assets/img").exists(),
        "emptied key directories are removed"
    );
    assert!(p.list_objects("shop", "assets").await.unwrap().is_empty());
    let err = p.read_object("shop", "assets", "a.txt").await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    p.delete_bucket("shop", "assets").await.unwrap();
    p.delete_bucket("shop", "assets").await.unwrap();
    assert!(!p.root().join("buckets/shop/assets").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_is_never_deleted_with_the_links_and_special_files_it_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let p = LocalProvider::open_at("home", &tmp.path().join("root"), DiskFormat::Raw).unwrap();
    p.ensure_bucket("shop", "assets").await.unwrap();
    p.write_object("shop", "assets", "img/a.txt", Box::pin(&b"object"[..]))
        .await
        .unwrap();
    let bucket = p.root().join("buckets/shop/assets");
    std::fs::write(tmp.path().join("elsewhere"), b"data living elsewhere").unwrap();
    std::os::unix::fs::symlink(tmp.path().join("elsewhere"), bucket.join("img/link")).unwrap();
    let fifo = std::ffi::CString::new(bucket.join("pipe").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    std::fs::create_dir(bucket.join("empty")).unwrap();

    // Neither is an object; both are reported as what the bucket holds besides objects.
    let keys: Vec<String> = p
        .list_objects("shop", "assets")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(keys, ["img/a.txt"]);
    assert_eq!(
        p.list_non_objects("shop", "assets").await.unwrap(),
        ["img/link", "pipe"]
    );
    // With every object deleted, the bucket still refuses to go and keeps them.
    p.delete_object("shop", "assets", "img/a.txt")
        .await
        .unwrap();
    let err = p.delete_bucket("shop", "assets").await.unwrap_err();
    assert!(matches!(err, ProviderError::Conflict { .. }), "{err}");
    assert!(
        err.to_string().contains("2 entries that are not objects"),
        "{err}"
    );
    assert!(std::fs::symlink_metadata(bucket.join("img/link"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(std::fs::symlink_metadata(bucket.join("pipe")).is_ok());
    // Once they are gone, so is the bucket with its empty directories.
    std::fs::remove_file(bucket.join("img/link")).unwrap();
    std::fs::remove_file(bucket.join("pipe")).unwrap();
    p.delete_bucket("shop", "assets").await.unwrap();
    assert!(!bucket.exists());
    assert!(tmp.path().join("elsewhere").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_app_is_supervised_restarted_stopped_and_readopted() {
    let bin = demo_app();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("provider");
    let p: Arc<dyn Provider> = LocalProvider::open_at("home", &root, DiskFormat::Raw).unwrap();

    // The app's data lives on a raw volume; what it serves must be what we wrote there.
    p.create_volume(
        "shop",
        &VolumeSpec {
            name: "data".to_string(),
            size_bytes: MIB,
            format: DiskFormat::Raw,
        },
    )
    .await
    .unwrap();
    let volume = p.volume_info("shop", "data").await.unwrap().unwrap();
    let data: Vec<u8> = (0..MIB).map(|_| fastrand::u8(..)).collect();
    std::fs::write(volume.path.as_ref().unwrap(), &data).unwrap();
    p.ensure_bucket("shop", "assets").await.unwrap();

    let port = free_port();
    let config = tmp.path().join("demo.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_file = {:?}\nbucket_dir = {:?}\n",
            volume.path.as_ref().unwrap(),
            root.join("buckets/shop/assets")
        ),
    )
    .unwrap();
    let mut spec = AppSpec::new("web", bin.to_string_lossy());
    spec.args = vec![config.to_string_lossy().into_owned()];
    spec.port = Some(port);

    let op = p.start_app("shop", &spec).await.unwrap();
    assert_eq!(op.kind, OperationKind::StartApp);
    let endpoint = p.app_endpoint("shop", "web").await.unwrap().expect("port");
    let report = p
        .health_check(
            "shop",
            &health(endpoint.http_url("/health"), Duration::from_secs(20)),
        )
        .await
        .unwrap();
    assert!(report.detail.contains("200"), "{report:?}");
    let hash = get_text(&endpoint.http_url("/hash")).await.unwrap();
    assert_eq!(hash.trim(), blake3::hash(&data).to_hex().as_str());
    let served: serde_json::Value =
        serde_json::from_str(&get_text(&endpoint.http_url("/config")).await.unwrap()).unwrap();
    assert_eq!(
        served["data_file"].as_str().map(PathBuf::from),
        volume.path.clone()
    );

    let first = p.app_status("shop", "web").await.unwrap().unwrap();
    assert_eq!(first.state, AppState::Running);
    assert!(!first.adopted);
    let pid1 = first.pid.expect("pid");
    let app_dir = root.join("apps/shop/web");
    let pid_file = std::fs::read_to_string(app_dir.join("pid")).unwrap();
    assert!(pid_file.starts_with(&format!("{pid1} ")), "{pid_file}");
    assert!(std::fs::read_to_string(app_dir.join("stdout.log"))
        .unwrap()
        .contains("demo-app listening"));
    let saved: AppSpec =
        serde_json::from_slice(&std::fs::read(app_dir.join("spec.json")).unwrap()).unwrap();
    assert_eq!(saved, spec);

    // Starting what runs with the same spec is success; with another spec, a conflict.
    let again = p.start_app("shop", &spec).await.unwrap();
    assert!(again.detail.contains("already running"), "{}", again.detail);
    let mut changed = spec.clone();
    changed.args.push("extra".to_string());
    let err = p.start_app("shop", &changed).await.unwrap_err();
    assert!(matches!(err, ProviderError::Conflict { .. }), "{err}");

    // A crash is noticed and the app started again.
    kill9(pid1);
    let second = wait_status(&*p, "shop", "web", Duration::from_secs(10), |s| {
        s.state == AppState::Running && s.pid.is_some_and(|p| p != pid1)
    })
    .await;
    assert_eq!(second.restarts, 1);
    assert!(
        second
            .last_exit
            .as_deref()
            .unwrap_or("")
            .contains("signal 9"),
        "{second:?}"
    );
    let pid2 = second.pid.unwrap();
    p.health_check(
        "shop",
        &health(endpoint.http_url("/health"), Duration::from_secs(20)),
    )
    .await
    .unwrap();

    // Dropping the provider leaves the app running; a new one on the same root adopts it.
    drop(p);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(alive(pid2), "the app must outlive its provider instance");
    assert_eq!(
        get_text(&endpoint.http_url("/hash")).await.unwrap().trim(),
        blake3::hash(&data).to_hex().as_str()
    );
    let p: Arc<dyn Provider> = LocalProvider::open_at("home", &root, DiskFormat::Raw).unwrap();
    let adopted = p.app_status("shop", "web").await.unwrap().unwrap();
    assert_eq!(
        (adopted.state, adopted.pid, adopted.adopted),
        (AppState::Running, Some(pid2), true),
        "{adopted:?}"
    );
    assert_eq!(adopted.spec, spec);

    // ...and keeps supervising it.
    kill9(pid2);
    let third = wait_status(&*p, "shop", "web", Duration::from_secs(10), |s| {
        s.state == AppState::Running && s.pid.is_some_and(|p| p != pid2)
    })
    .await;
    assert_eq!(third.restarts, 1);
    let pid3 = third.pid.unwrap();
    p.health_check(
        "shop",
        &health(endpoint.http_url("/health"), Duration::from_secs(20)),
    )
    .await
    .unwrap();

    // A stop on request ends it for good.
    let outcome = p.stop_app("shop", "web", stop_gently()).await.unwrap();
    assert!(
        matches!(outcome, StopOutcome::Stopped { .. }),
        "{outcome:?}"
    );
    let stopped = wait_status(&*p, "shop", "web", Duration::from_secs(5), |s| {
        s.state == AppState::Stopped
    })
    .await;
    assert_eq!(stopped.pid, None);
    assert!(!alive(pid3));
    assert!(!app_dir.join("pid").exists());
    assert!(get_text(&endpoint.http_url("/health")).await.is_err());
    // Nothing restarts it behind our back.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let still = p.app_status("shop", "web").await.unwrap().unwrap();
    assert_eq!((still.state, still.pid), (AppState::Stopped, None));
    assert_eq!(
        p.stop_app("shop", "web", stop_gently()).await.unwrap(),
        StopOutcome::AlreadyStopped
    );
    let err = p
        .health_check(
            "shop",
            &health(endpoint.http_url("/health"), Duration::from_millis(500)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Unhealthy { .. }), "{err}");

    // A stopped app stays stopped for the next provider instance too, and starts again on
    // request.
    drop(p);
    let p: Arc<dyn Provider> = LocalProvider::open_at("home", &root, DiskFormat::Raw).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let st = p.app_status("shop", "web").await.unwrap().unwrap();
    assert_eq!(st.state, AppState::Stopped);
    p.start_app("shop", &spec).await.unwrap();
    p.health_check(
        "shop",
        &health(endpoint.http_url("/health"), Duration::from_secs(20)),
    )
    .await
    .unwrap();
    p.stop_app("shop", "web", stop_gently()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_ignoring_sigterm_is_killed_only_when_the_caller_asks() {
    let tmp = tempfile::tempdir().unwrap();
    let p = LocalProvider::open_at("home", tmp.path(), DiskFormat::Raw).unwrap();
    let mut spec = AppSpec::new("stubborn", "sh");
    // `exec` so the pid is the process that ignores SIGTERM (an ignored signal stays
    // ignored across exec).
    spec.args = vec!["-c".into(), "trap '' TERM; exec sleep 300".into()];
    p.start_app("svc", &spec).await.unwrap();
    let pid = wait_status(&*p, "svc", "stubborn", Duration::from_secs(5), |s| {
        s.state == AppState::Running
    })
    .await
    .pid
    .unwrap();
    // Let the shell install its trap before it is signalled.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    let err = p
        .stop_app(
            "svc",
            "stubborn",
            StopOptions {
                timeout: Duration::from_millis(600),
                kill_after_timeout: false,
            },
        )
        .await
        .unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(600));
    assert!(matches!(err, ProviderError::StopTimedOut { .. }), "{err}");
    assert!(err.to_string().contains("not killed"), "{err}");
    assert!(alive(pid), "the provider must not kill without being asked");
    let st = p.app_status("svc", "stubborn").await.unwrap().unwrap();
    assert_eq!(st.state, AppState::Stopping);

    let outcome = p
        .stop_app(
            "svc",
            "stubborn",
            StopOptions {
                timeout: Duration::from_millis(300),
                kill_after_timeout: true,
            },
        )
        .await
        .unwrap();
    assert!(matches!(outcome, StopOutcome::Killed { .. }), "{outcome:?}");
    assert!(!alive(pid));
    let st = wait_status(&*p, "svc", "stubborn", Duration::from_secs(5), |s| {
        s.state == AppState::Stopped
    })
    .await;
    assert_eq!(st.restarts, 0, "a stopped app is not restarted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_that_never_pass_time_out_with_the_last_failure() {
    let tmp = tempfile::tempdir().unwrap();
    let p = LocalProvider::open_at("home", tmp.path(), DiskFormat::Raw).unwrap();

    let url = format!("http://127.0.0.1:{}/health", free_port());
    let started = Instant::now();
    let err = p
        .health_check("shop", &health(url.clone(), Duration::from_secs(1)))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(4),
        "took {took:?}"
    );
    let ProviderError::Unhealthy { attempts, .. } = &err else {
        panic!("{err}")
    };
    assert!(*attempts > 1, "a check is retried until its deadline");
    let msg = err.to_string();
    assert!(msg.contains("health check of service `shop`"), "{msg}");
    assert!(msg.contains("did not pass within 1s"), "{msg}");
    assert!(msg.contains(&url), "{msg}");
    assert!(msg.to_lowercase().contains("refused"), "{msg}");

    let failing = HealthCheck {
        url: None,
        command: Some(vec![
            "sh".into(),
            "-c".into(),
            "echo database unreachable >&2; exit 3".into(),
        ]),
        timeout: Duration::from_millis(500),
    };
    let err = p.health_check("shop", &failing).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("exit status: 3"), "{msg}");
    assert!(msg.contains("database unreachable"), "{msg}");

    let passing = HealthCheck {
        url: None,
        command: Some(vec!["true".into()]),
        timeout: Duration::from_secs(1),
    };
    let report = p.health_check("shop", &passing).await.unwrap();
    assert_eq!(report.attempts, 1);

    let empty = HealthCheck {
        url: None,
        command: None,
        timeout: Duration::from_secs(1),
    };
    let err = p.health_check("shop", &empty).await.unwrap_err();
    assert!(matches!(err, ProviderError::Invalid { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pid_file_naming_another_process_is_not_adopted() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("provider");
    let p = LocalProvider::open_at("home", &root, DiskFormat::Raw).unwrap();
    let mut spec = AppSpec::new("sleeper", "sleep");
    spec.args = vec!["300".into()];
    p.start_app("svc", &spec).await.unwrap();
    let ours = p
        .app_status("svc", "sleeper")
        .await
        .unwrap()
        .unwrap()
        .pid
        .unwrap();
    let pid_path = p.app_dir("svc", "sleeper").join("pid");
    let recorded = std::fs::read_to_string(&pid_path).unwrap();
    let start_time: u64 = recorded.split_whitespace().nth(1).unwrap().parse().unwrap();
    drop(p);

    // The app dies while no provider watches it, and its pid now names someone else's
    // process: a foreign process carrying that pid, or here (the pid cannot be forced) the
    // same situation seen from the pid file: a live pid whose start time is not the app's.
    kill9(ours);
    // SAFETY: reaping our own child (the provider started it from this process).
    unsafe { libc::waitpid(ours as i32, std::ptr::null_mut(), 0) };
    // Start times count clock ticks (10 ms here): a process started within the same tick
    // as the app would carry the same identity, so let at least two ticks pass.
    std::thread::sleep(Duration::from_millis(30));
    let mut foreign = Command::new("sleep").arg("300").spawn().unwrap();
    let foreign_pid = foreign.id();
    std::fs::write(&pid_path, format!("{foreign_pid} {start_time}\n")).unwrap();

    let p = LocalProvider::open_at("home", &root, DiskFormat::Raw).unwrap();
    // The app is wanted running, so the provider starts a fresh one rather than adopting.
    let st = wait_status(&*p, "svc", "sleeper", Duration::from_secs(5), |s| {
        s.state == AppState::Running
    })
    .await;
    assert!(!st.adopted, "{st:?}");
    assert_ne!(st.pid, Some(foreign_pid));
    let fresh = st.pid.unwrap();
    let recorded = std::fs::read_to_string(&pid_path).unwrap();
    assert!(recorded.starts_with(&format!("{fresh} ")), "{recorded}");

    // Stopping the app never touches the foreign process.
    p.stop_app("svc", "sleeper", stop_gently()).await.unwrap();
    assert!(!alive(fresh));
    assert!(alive(foreign_pid), "the foreign process was signalled");

    // A pid file naming a live process with the right pid but a garbled line is ignored.
    std::fs::write(&pid_path, format!("{foreign_pid}\n")).unwrap();
    drop(p);
    let p = LocalProvider::open_at("home", &root, DiskFormat::Raw).unwrap();
    let st = p.app_status("svc", "sleeper").await.unwrap().unwrap();
    assert_eq!((st.state, st.adopted), (AppState::Stopped, false));
    assert!(!pid_path.exists());
    assert!(alive(foreign_pid));

    foreign.kill().unwrap();
    foreign.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_root_serves_one_provider_and_bad_commands_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let p = LocalProvider::open_at("home", tmp.path(), DiskFormat::Raw).unwrap();
    // The same provider opened twice is the same instance: one supervisor per app.
    let same = LocalProvider::open_at("home", tmp.path(), DiskFormat::Raw).unwrap();
    assert!(Arc::ptr_eq(&p, &same));
    let err = LocalProvider::open_at("other", tmp.path(), DiskFormat::Raw)
        .err()
        .expect("a second provider on one root");
    assert!(
        err.to_string().contains("already used by provider `home`"),
        "{err}"
    );

    let spec = AppSpec::new("ghost", "/nonexistent/bin/app");
    let err = p.start_app("svc", &spec).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("app `svc/ghost`")
            && msg.contains("/nonexistent/bin/app")
            && msg.contains("No such file"),
        "{msg}"
    );
    let st = p.app_status("svc", "ghost").await.unwrap().unwrap();
    assert_eq!(st.state, AppState::Stopped);

    let mut spec = AppSpec::new("lost", "sleep");
    spec.workdir = Some(tmp.path().join("missing"));
    let err = p.start_app("svc", &spec).await.unwrap_err();
    assert!(err.to_string().contains("working directory"), "{err}");
}
