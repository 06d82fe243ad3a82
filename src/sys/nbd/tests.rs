//! Two kinds of tests: against a real `qemu-nbd` serving images made with `qemu-img` and
//! `qemu-io` (Debian package qemu-utils), and against a scripted server that sends
//! hand-written bytes in the spec's wire format, for the replies QEMU does not send on
//! demand (error chunks, out-of-order chunks, short block status, broken replies).

use super::*;
use std::process::Stdio;
use tokio::io::DuplexStream;
use tokio::process::{Child, Command};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// A QEMU tool on PATH, or beside `$FLUIDCLOUD_QEMU_IMG`.
fn tool(name: &str) -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join(name))
        .find(|p| p.is_file());
    let beside_qemu_img = std::env::var_os("FLUIDCLOUD_QEMU_IMG")
        .and_then(|img| Path::new(&img).parent().map(|dir| dir.join(name)))
        .filter(|p| p.is_file());
    on_path.or(beside_qemu_img).unwrap_or_else(|| {
        panic!(
            "{name} is neither on PATH nor beside $FLUIDCLOUD_QEMU_IMG; \
             it comes with the Debian package qemu-utils"
        )
    })
}

async fn run(name: &str, args: &[&str]) -> String {
    let output = Command::new(tool(name))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
    assert!(
        output.status.success(),
        "{name} {args:?} {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `qemu-nbd` serving one image read-only as export `disk`; killed when dropped.
struct Server {
    _child: Child,
    socket: PathBuf,
}

async fn serve(image: &Path, format: &str, extra: &[&str]) -> Server {
    let socket = image.with_extension("sock");
    let mut child = Command::new(tool("qemu-nbd"))
        .args([
            "--read-only",
            "--persistent",
            "--shared=4",
            "-x",
            "disk",
            "-f",
            format,
        ])
        .arg("-k")
        .arg(&socket)
        .args(extra)
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start qemu-nbd");
    for _ in 0..200 {
        // The socket file appears at bind, a moment before listen: probe it.
        if tokio::net::UnixStream::connect(&socket).await.is_ok() {
            return Server {
                _child: child,
                socket,
            };
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                let _ = pipe.read_to_string(&mut stderr).await;
            }
            panic!("qemu-nbd exited with {status}: {stderr}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "qemu-nbd did not listen on {} within 10 s",
        socket.display()
    );
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// Checks the export against the image's known content: reads it whole (in more than one
/// request) and a hole alone.
async fn check_content(nbd: &mut NbdClient, expected: &[u8]) {
    let mut all = vec![0xff; expected.len()];
    nbd.read(0, &mut all).await.unwrap();
    assert!(
        all == expected,
        "the export's bytes differ from what was written"
    );
    let mut hole = vec![0xff; 64 * KIB as usize];
    nbd.read(4 * MIB, &mut hole).await.unwrap();
    assert!(hole.iter().all(|&b| b == 0), "a hole read as non-zero");
}

#[tokio::test]
async fn qcow2_allocated_extents_are_the_written_areas_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let img = path_str(&image);
    run("qemu-img", &["create", "-q", "-f", "qcow2", img, "48M"]).await;
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 1M 2M",
            "-c",
            "write -P 0xcd 40M 64k",
            // Zero clusters are allocated but read as zeros: nothing to copy.
            "-c",
            "write -z 8M 1M",
            img,
        ],
    )
    .await;
    let server = serve(&image, "qcow2", &[]).await;
    let mut nbd = NbdClient::connect_unix(&server.socket, "disk", &[BASE_ALLOCATION])
        .await
        .unwrap();
    assert_eq!(nbd.size(), 48 * MIB);
    assert!(nbd.read_only());
    assert_eq!(nbd.contexts().len(), 1);
    assert_eq!(nbd.contexts()[0].name, BASE_ALLOCATION);

    let allocated = nbd.allocated_extents(0..nbd.size()).await.unwrap();
    assert_eq!(allocated, vec![MIB..3 * MIB, 40 * MIB..40 * MIB + 64 * KIB]);
    let zeros = nbd
        .block_status(BASE_ALLOCATION, 8 * MIB, MIB)
        .await
        .unwrap();
    assert!(
        zeros.iter().all(|e| e.flags & NBD_STATE_ZERO != 0),
        "{zeros:?}"
    );

    let mut expected = vec![0u8; 48 * MIB as usize];
    expected[MIB as usize..3 * MIB as usize].fill(0xab);
    expected[40 * MIB as usize..(40 * MIB + 64 * KIB) as usize].fill(0xcd);
    check_content(&mut nbd, &expected).await;
    nbd.disconnect().await.unwrap();
}

#[tokio::test]
async fn raw_allocated_extents_are_the_written_areas_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let img = path_str(&image);
    // A sparse file made by hand: `qemu-img create` would allocate the first block.
    std::fs::File::create(&image)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 1M 2M",
            "-c",
            "write -P 0x77 12M 1M",
            img,
        ],
    )
    .await;
    let server = serve(&image, "raw", &[]).await;
    let mut nbd = NbdClient::connect_unix(&server.socket, "disk", &[BASE_ALLOCATION])
        .await
        .unwrap();
    assert_eq!(nbd.size(), 16 * MIB);
    let allocated = nbd.allocated_extents(0..nbd.size()).await.unwrap();
    assert_eq!(allocated, vec![MIB..3 * MIB, 12 * MIB..13 * MIB]);

    let mut expected = vec![0u8; 16 * MIB as usize];
    expected[MIB as usize..3 * MIB as usize].fill(0x5a);
    expected[12 * MIB as usize..13 * MIB as usize].fill(0x77);
    check_content(&mut nbd, &expected).await;
    nbd.disconnect().await.unwrap();
}

#[tokio::test]
async fn dirty_extents_are_the_areas_written_after_the_bitmap_was_added() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let img = path_str(&image);
    run("qemu-img", &["create", "-q", "-f", "qcow2", img, "16M"]).await;
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 0 64k", img],
    )
    .await;
    // A persistent bitmap is loaded, enabled, whenever the image is opened: qemu-io's
    // writes below are recorded in it.
    run("qemu-img", &["bitmap", "--add", img, "b0"]).await;
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x22 2M 128k",
            "-c",
            "write -P 0x33 5M 64k",
            img,
        ],
    )
    .await;
    let info = run("qemu-img", &["info", img]).await;
    assert!(
        info.contains("b0"),
        "qemu-img info shows no bitmap b0: {info}"
    );

    let server = serve(&image, "qcow2", &["-B", "b0"]).await;
    let context = format!("{QEMU_DIRTY_BITMAP}b0");
    let mut nbd = NbdClient::connect_unix(&server.socket, "disk", &[BASE_ALLOCATION, &context])
        .await
        .unwrap();
    assert_eq!(nbd.contexts().len(), 2);
    let dirty = nbd.dirty_extents("b0", 0..nbd.size()).await.unwrap();
    let first = 2 * MIB..2 * MIB + 128 * KIB;
    let second = 5 * MIB..5 * MIB + 64 * KIB;
    assert_eq!(dirty, vec![first.clone(), second.clone()]);
    // A range that starts inside a dirty extent gets it clipped.
    let part = nbd
        .dirty_extents("b0", 2 * MIB + 64 * KIB..6 * MIB)
        .await
        .unwrap();
    assert_eq!(part, vec![2 * MIB + 64 * KIB..first.end, second.clone()]);
    let allocated = nbd.allocated_extents(0..nbd.size()).await.unwrap();
    assert_eq!(allocated, vec![0..64 * KIB, first.clone(), second]);

    let mut data = vec![0; (first.end - first.start) as usize];
    nbd.read(first.start, &mut data).await.unwrap();
    assert!(data.iter().all(|&b| b == 0x22));
    nbd.disconnect().await.unwrap();
}

#[tokio::test]
async fn errors_say_what_failed_and_where() {
    let dir = tempfile::tempdir().unwrap();

    // A socket file nobody listens on.
    let dead = dir.path().join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
    let err = NbdClient::connect_unix(&dead, "disk", &[])
        .await
        .unwrap_err();
    assert!(matches!(err, NbdError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("dead.sock"), "{err}");

    let image = dir.path().join("disk.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", path_str(&image), "1M"],
    )
    .await;
    let server = serve(&image, "qcow2", &[]).await;

    let err = NbdClient::connect_unix(&server.socket, "nope", &[BASE_ALLOCATION])
        .await
        .unwrap_err();
    let NbdError::UnknownExport { message, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(!message.is_empty(), "the server's message is lost: {err}");
    let text = err.to_string();
    assert!(
        text.contains("`nope`") && text.contains(message.as_str()),
        "{text}"
    );

    let err = NbdClient::connect_unix(&server.socket, "disk", &["qemu:dirty-bitmap:missing"])
        .await
        .unwrap_err();
    assert!(matches!(err, NbdError::ContextNotGranted { .. }), "{err:?}");
    assert!(
        err.to_string().contains("qemu:dirty-bitmap:missing"),
        "{err}"
    );

    let mut nbd = NbdClient::connect_unix(&server.socket, "disk", &[])
        .await
        .unwrap();
    let mut buf = vec![0; 8192];
    let err = nbd.read(MIB - 4096, &mut buf).await.unwrap_err();
    assert!(matches!(err, NbdError::OutOfRange { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&format!("offset {}", MIB - 4096)),
        "{err}"
    );
    let err = nbd.allocated_extents(0..MIB).await.unwrap_err();
    assert!(matches!(err, NbdError::Invalid { .. }), "{err:?}");
    // Errors found before sending leave the connection usable.
    nbd.read(0, &mut buf).await.unwrap();
    nbd.disconnect().await.unwrap();
}

// The scripted server: the spec's wire format, written by hand.

struct Script {
    io: DuplexStream,
}

impl Script {
    async fn u16(&mut self) -> u16 {
        self.io.read_u16().await.unwrap()
    }
    async fn u32(&mut self) -> u32 {
        self.io.read_u32().await.unwrap()
    }
    async fn u64(&mut self) -> u64 {
        self.io.read_u64().await.unwrap()
    }
    async fn send(&mut self, parts: &[&[u8]]) {
        for part in parts {
            self.io.write_all(part).await.unwrap();
        }
    }

    async fn greet(&mut self) {
        let flags = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;
        self.send(&[
            &NBDMAGIC.to_be_bytes(),
            &IHAVEOPT.to_be_bytes(),
            &flags.to_be_bytes(),
        ])
        .await;
        assert_eq!(
            self.u32().await,
            NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
        );
    }

    /// The client's next option and its data.
    async fn option(&mut self) -> (u32, Vec<u8>) {
        assert_eq!(self.u64().await, IHAVEOPT);
        let option = self.u32().await;
        let mut data = vec![0; self.u32().await as usize];
        self.io.read_exact(&mut data).await.unwrap();
        (option, data)
    }

    async fn option_reply(&mut self, option: u32, kind: u32, data: &[u8]) {
        let len = data.len() as u32;
        self.send(&[
            &NBD_REP_MAGIC.to_be_bytes(),
            &option.to_be_bytes(),
            &kind.to_be_bytes(),
            &len.to_be_bytes(),
            data,
        ])
        .await;
    }

    /// Answers the handshake: structured replies, context id 7 for `base:allocation`, and
    /// a read-only export of 1 MiB with a 64 KiB maximum payload.
    async fn handshake(&mut self) {
        self.greet().await;
        assert_eq!(self.option().await.0, NBD_OPT_STRUCTURED_REPLY);
        self.option_reply(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, &[])
            .await;
        let (option, data) = self.option().await;
        assert_eq!(option, NBD_OPT_SET_META_CONTEXT);
        assert!(data.ends_with(BASE_ALLOCATION.as_bytes()));
        let mut granted = 7u32.to_be_bytes().to_vec();
        granted.extend_from_slice(BASE_ALLOCATION.as_bytes());
        self.option_reply(NBD_OPT_SET_META_CONTEXT, NBD_REP_META_CONTEXT, &granted)
            .await;
        self.option_reply(NBD_OPT_SET_META_CONTEXT, NBD_REP_ACK, &[])
            .await;
        assert_eq!(self.option().await.0, NBD_OPT_GO);
        let mut export = NBD_INFO_EXPORT.to_be_bytes().to_vec();
        export.extend_from_slice(&MIB.to_be_bytes());
        export.extend_from_slice(&(1u16 | NBD_FLAG_READ_ONLY).to_be_bytes());
        self.option_reply(NBD_OPT_GO, NBD_REP_INFO, &export).await;
        let mut sizes = NBD_INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for size in [512u32, 4096, 64 * 1024] {
            sizes.extend_from_slice(&size.to_be_bytes());
        }
        self.option_reply(NBD_OPT_GO, NBD_REP_INFO, &sizes).await;
        self.option_reply(NBD_OPT_GO, NBD_REP_ACK, &[]).await;
    }

    /// The client's next request: command, cookie, offset, length.
    async fn request(&mut self) -> (u16, u64, u64, u32) {
        assert_eq!(self.u32().await, NBD_REQUEST_MAGIC);
        assert_eq!(self.u16().await, 0, "command flags");
        (
            self.u16().await,
            self.u64().await,
            self.u64().await,
            self.u32().await,
        )
    }

    async fn chunk(&mut self, cookie: u64, flags: u16, kind: u16, payload: &[&[u8]]) {
        let len: usize = payload.iter().map(|p| p.len()).sum();
        self.send(&[
            &NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes(),
            &flags.to_be_bytes(),
            &kind.to_be_bytes(),
            &cookie.to_be_bytes(),
            &(len as u32).to_be_bytes(),
        ])
        .await;
        self.send(payload).await;
    }
}

async fn scripted(timeout: Duration) -> (Result<NbdClient, NbdError>, Script) {
    let (client, server) = tokio::io::duplex(256 * 1024);
    let mut script = Script { io: server };
    let at = "export `disk` at a scripted server".to_string();
    let connect = NbdClient::handshake(Box::new(client), at, "disk", &[BASE_ALLOCATION], timeout);
    let (nbd, ()) = tokio::join!(connect, script.handshake());
    (nbd, script)
}

#[tokio::test]
async fn replies_in_chunks_are_reassembled_and_their_errors_reported() {
    let (nbd, mut server) = scripted(Duration::from_secs(5)).await;
    let mut nbd = nbd.unwrap();
    assert_eq!(nbd.size(), MIB);
    assert!(nbd.read_only());
    assert_eq!(
        nbd.contexts(),
        [MetaContext {
            id: 7,
            name: BASE_ALLOCATION.into()
        }]
    );
    assert_eq!(
        nbd.block_size(),
        BlockSize {
            minimum: 512,
            preferred: 4096,
            maximum_read: 64 * 1024
        }
    );

    let serve = async move {
        // A read of 128 KiB comes as two requests of the 64 KiB maximum. The first is
        // answered out of order: a hole for its second half, then data, then NONE.
        let (cmd, cookie, offset, len) = server.request().await;
        assert_eq!((cmd, offset, len), (NBD_CMD_READ, 0, 65536));
        let hole = [32768u64.to_be_bytes().as_slice(), &32768u32.to_be_bytes()].concat();
        server
            .chunk(cookie, 0, NBD_REPLY_TYPE_OFFSET_HOLE, &[&hole])
            .await;
        let data = vec![0x5a; 32768];
        server
            .chunk(
                cookie,
                0,
                NBD_REPLY_TYPE_OFFSET_DATA,
                &[&0u64.to_be_bytes(), &data],
            )
            .await;
        server
            .chunk(cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, &[])
            .await;
        let (_, cookie, offset, len) = server.request().await;
        assert_eq!((offset, len), (65536, 65536));
        let data = vec![0xa5; 65536];
        let done = NBD_REPLY_FLAG_DONE;
        server
            .chunk(
                cookie,
                done,
                NBD_REPLY_TYPE_OFFSET_DATA,
                &[&offset.to_be_bytes(), &data],
            )
            .await;

        // An error at an offset, with a message.
        let (_, cookie, offset, _) = server.request().await;
        let message = b"disk on fire";
        server
            .chunk(
                cookie,
                done,
                NBD_REPLY_TYPE_ERROR_OFFSET,
                &[
                    &5u32.to_be_bytes(),
                    &(message.len() as u16).to_be_bytes(),
                    message,
                    &(offset + 512).to_be_bytes(),
                ],
            )
            .await;

        // Block status answered short, then the rest with an extent past the end.
        let (cmd, cookie, offset, len) = server.request().await;
        assert_eq!((cmd, offset, len), (NBD_CMD_BLOCK_STATUS, 0, MIB as u32));
        let extent = |len: u32, flags: u32| [len.to_be_bytes(), flags.to_be_bytes()].concat();
        server
            .chunk(
                cookie,
                done,
                NBD_REPLY_TYPE_BLOCK_STATUS,
                &[&7u32.to_be_bytes(), &extent(65536, 0), &extent(65536, 0)],
            )
            .await;
        let (_, cookie, offset, len) = server.request().await;
        assert_eq!((offset, len), (131072, MIB as u32 - 131072));
        server
            .chunk(
                cookie,
                done,
                NBD_REPLY_TYPE_BLOCK_STATUS,
                &[&7u32.to_be_bytes(), &extent(MIB as u32, 3)],
            )
            .await;

        // Data outside the request breaks the protocol.
        let (_, cookie, _, _) = server.request().await;
        server
            .chunk(
                cookie,
                done,
                NBD_REPLY_TYPE_OFFSET_DATA,
                &[&MIB.to_be_bytes(), &[0; 512]],
            )
            .await;
        server
    };
    let check = async {
        let mut buf = vec![0xff; 131072];
        nbd.read(0, &mut buf).await.unwrap();
        assert!(buf[..32768].iter().all(|&b| b == 0x5a));
        assert!(buf[32768..65536].iter().all(|&b| b == 0));
        assert!(buf[65536..].iter().all(|&b| b == 0xa5));

        let err = nbd.read(4096, &mut buf[..512]).await.unwrap_err();
        let NbdError::Command {
            code, error_offset, ..
        } = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!((*code, *error_offset), (5, Some(4608)));
        let text = err.to_string();
        assert!(
            text.contains("disk on fire") && text.contains("NBD_EIO"),
            "{text}"
        );

        let extents = nbd.block_status(BASE_ALLOCATION, 0, MIB).await.unwrap();
        assert_eq!(
            extents,
            [
                Extent {
                    offset: 0,
                    length: 131072,
                    flags: 0
                },
                Extent {
                    offset: 131072,
                    length: MIB - 131072,
                    flags: 3
                }
            ]
        );

        let err = nbd.read(0, &mut buf[..512]).await.unwrap_err();
        assert!(matches!(err, NbdError::Protocol { .. }), "{err:?}");
        let err = nbd.read(0, &mut buf[..512]).await.unwrap_err();
        assert!(matches!(err, NbdError::Broken { .. }), "{err:?}");
    };
    let (_server, ()) = tokio::join!(serve, check);
}

#[tokio::test]
async fn a_wedged_server_times_out() {
    let (client, server) = tokio::io::duplex(1024);
    let mut script = Script { io: server };
    let at = "export `disk` at a scripted server".to_string();
    let timeout = Duration::from_millis(200);
    let connect = NbdClient::handshake(Box::new(client), at, "disk", &[], timeout);
    // The server greets, then never answers the first option.
    let (nbd, ()) = tokio::join!(connect, script.greet());
    let err = nbd.unwrap_err();
    assert!(matches!(err, NbdError::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains("the handshake"), "{err}");

    let (nbd, mut server) = scripted(timeout).await;
    let mut nbd = nbd.unwrap();
    let mut buf = [0; 512];
    let (err, _) = tokio::join!(nbd.read(0, &mut buf), server.request());
    let err = err.unwrap_err();
    assert!(matches!(err, NbdError::Timeout { .. }), "{err:?}");
    assert!(
        err.to_string().contains("reading 512 bytes at offset 0"),
        "{err}"
    );
}
