use super::*;
use crate::providers::PortForward;

fn args(settings: &QemuSettings, spec: &VmSpec, disks: &[(PathBuf, DiskFormat)]) -> Vec<String> {
    let ports = [ForwardedPort {
        guest: 80,
        host: 18080,
        address: "127.0.0.1".into(),
    }];
    qemu_args(
        "shop",
        spec,
        settings,
        Accel::Tcg,
        disks,
        &ports,
        Path::new("/pool/vms/shop/web"),
    )
    .into_iter()
    .map(|a| a.to_string_lossy().into_owned())
    .collect()
}

/// The value following `flag` each time it occurs.
fn values<'a>(a: &'a [String], flag: &str) -> Vec<&'a str> {
    a.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].as_str())
        .collect()
}

fn disks() -> Vec<(PathBuf, DiskFormat)> {
    vec![
        (
            PathBuf::from("/pool/volumes/shop/web.qcow2"),
            DiskFormat::Qcow2,
        ),
        (PathBuf::from("/pool/volumes/shop/a,b.raw"), DiskFormat::Raw),
    ]
}

#[test]
fn every_bus_attaches_every_disk_with_its_format() {
    let mut spec = VmSpec::new("web");
    spec.volumes = vec!["data".to_string()];
    for (bus, controller, device) in [
        (DiskBus::Virtio, None, "virtio-blk-pci,drive=disk1"),
        (DiskBus::Ide, None, "ide-hd,drive=disk1,bus=ide.0,unit=1"),
        (
            DiskBus::Sata,
            Some("ahci,id=ahci0"),
            "ide-hd,drive=disk1,bus=ahci0.1",
        ),
        (
            DiskBus::Scsi,
            Some("virtio-scsi-pci,id=scsi0"),
            "scsi-hd,drive=disk1,bus=scsi0.0,scsi-id=1,lun=0",
        ),
    ] {
        let settings = QemuSettings {
            disk_bus: bus,
            ..QemuSettings::default()
        };
        let a = args(&settings, &spec, &disks());
        let drives = values(&a, "-drive");
        assert_eq!(
            drives,
            [
                "file=/pool/volumes/shop/web.qcow2,format=qcow2,id=disk0,if=none",
                "file=/pool/volumes/shop/a,,b.raw,format=raw,id=disk1,if=none"
            ],
            "{bus:?}: a comma in a path must be doubled"
        );
        let devices = values(&a, "-device");
        assert!(devices.contains(&device), "{bus:?}: {devices:?}");
        assert!(
            devices
                .iter()
                .any(|d| d.contains("drive=disk0") && d.ends_with("bootindex=0")),
            "{bus:?}: the first disk boots: {devices:?}"
        );
        if let Some(c) = controller {
            assert_eq!(devices[0], c, "{bus:?}: the controller comes first");
        }
    }
}

#[test]
fn direct_kernel_boot_ports_and_console_are_on_the_command_line() {
    let mut spec = VmSpec::new("web");
    spec.vcpus = 2;
    spec.memory_mib = 300;
    spec.kernel = Some(PathBuf::from("/k/vmlinuz"));
    spec.initrd = Some(PathBuf::from("/k/initrd.gz"));
    spec.append = Some("console=ttyS0 fc.after=serve".to_string());
    spec.ports = vec![PortForward {
        guest: 80,
        host: None,
    }];
    let settings = QemuSettings {
        nic_model: "e1000".to_string(),
        ..QemuSettings::default()
    };
    let a = args(&settings, &spec, &disks()[..1]);
    assert_eq!(values(&a, "-kernel"), ["/k/vmlinuz"]);
    assert_eq!(values(&a, "-initrd"), ["/k/initrd.gz"]);
    assert_eq!(values(&a, "-append"), ["console=ttyS0 fc.after=serve"]);
    assert_eq!(values(&a, "-smp"), ["2"]);
    assert_eq!(values(&a, "-m"), ["300"]);
    assert_eq!(values(&a, "-accel"), ["tcg"]);
    assert_eq!(
        values(&a, "-netdev"),
        ["user,id=net0,hostfwd=tcp:127.0.0.1:18080-:80"]
    );
    assert!(values(&a, "-device").contains(&"e1000,netdev=net0"));
    assert_eq!(
        values(&a, "-qmp"),
        ["unix:/pool/vms/shop/web/qmp.sock,server=on,wait=off"]
    );
    assert_eq!(
        values(&a, "-chardev"),
        ["file,id=console,path=/pool/vms/shop/web/console.log"]
    );
    assert!(a.contains(&"-daemonize".to_string()));
    assert!(
        !a.iter().any(|x| x.contains("bootindex")),
        "a kernel booted directly needs no boot disk: {a:?}"
    );
}

#[test]
fn without_a_nic_there_is_no_network() {
    let settings = QemuSettings {
        nic_model: "none".to_string(),
        ..QemuSettings::default()
    };
    let a = args(&settings, &VmSpec::new("web"), &disks()[..1]);
    assert_eq!(values(&a, "-nic"), ["none"]);
    assert!(values(&a, "-netdev").is_empty());
}

#[test]
fn qmp_states_map_to_what_callers_act_on() {
    assert_eq!(vm_state("running"), VmState::Running);
    assert_eq!(vm_state("paused"), VmState::Paused);
    assert_eq!(vm_state("inmigrate"), VmState::Paused);
    assert_eq!(vm_state("shutdown"), VmState::Halted);
    assert_eq!(vm_state("guest-panicked"), VmState::Halted);
}

#[test]
fn a_missing_emulator_is_named_with_where_it_came_from() {
    let settings = QemuSettings {
        binary: Some(PathBuf::from("/nonexistent/qemu-system-x86_64")),
        ..QemuSettings::default()
    };
    let e = resolve_binary(&settings).expect_err("missing");
    assert!(
        e.contains("/nonexistent/qemu-system-x86_64") && e.contains("`binary`"),
        "{e}"
    );
    let settings = QemuSettings {
        binary: Some(PathBuf::from("no-such-qemu-here")),
        ..QemuSettings::default()
    };
    let e = resolve_binary(&settings).expect_err("missing");
    assert!(
        e.contains("`no-such-qemu-here`") && e.contains("not in PATH"),
        "{e}"
    );
    let settings = QemuSettings {
        binary: Some(PathBuf::from("sh")),
        ..QemuSettings::default()
    };
    assert!(resolve_binary(&settings)
        .expect("sh is in PATH")
        .is_absolute());
}

#[test]
fn only_a_process_naming_the_socket_counts_as_the_vm() {
    let me = std::process::id();
    assert!(!holds_socket(me, Path::new("/pool/vms/shop/web/qmp.sock")));
    assert!(!holds_socket(u32::MAX, Path::new("/x")));
}

#[test]
fn picked_ports_are_distinct_and_fixed_ones_kept() {
    let mut spec = VmSpec::new("web");
    spec.ports = vec![
        PortForward {
            guest: 1,
            host: None,
        },
        PortForward {
            guest: 2,
            host: None,
        },
        PortForward {
            guest: 3,
            host: Some(4433),
        },
    ];
    let p = pick_ports(&spec, "127.0.0.1").unwrap();
    assert_ne!(p[0].host, p[1].host);
    assert!(p[0].host > 0 && p[1].host > 0);
    assert_eq!(
        p[2],
        ForwardedPort {
            guest: 3,
            host: 4433,
            address: "127.0.0.1".into(),
        }
    );
}
