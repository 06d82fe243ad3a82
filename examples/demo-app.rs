//! The quickstart's demo service: a tiny HTTP server whose state lives on a volume and in a
//! bucket, so a relocation has real data to carry and something to check afterwards.
//!
//! It reads a TOML file named by its first argument or by `$DEMO_APP_CONFIG`:
//!
//! ```toml
//! listen = "127.0.0.1:8080"
//! data_file = "volumes/shop/data.raw"   # on a volume; relative to this file
//! bucket_dir = "buckets/shop/assets"    # or bucket_url = "http://…" when kept at the source
//! seed_mib = 32                         # fill a fresh (all-zero) data file with data first
//! ```
//!
//! and serves `GET /health` (200), `GET /data` (the data file's bytes), `GET /hash` (BLAKE3
//! of the data file, hex), `GET /bucket` (the bucket's objects as `key size` lines) and
//! `GET /config` (the configuration it runs with, as JSON).
//!
//! Run it with `cargo run --example demo-app -- demo.toml`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct DemoConfig {
    listen: String,
    data_file: PathBuf,
    bucket_dir: Option<PathBuf>,
    bucket_url: Option<String>,
    /// When the data file starts with a zero block (a fresh volume), write this many MiB of
    /// the app's own data into it first, as a service would over its life.
    #[serde(default)]
    seed_mib: u32,
    /// Not read from the file: where the configuration came from.
    #[serde(default, skip_deserializing)]
    config_file: PathBuf,
}

/// Requests larger than this are refused; the demo has no use for bodies.
const MAX_HEAD_BYTES: usize = 16 * 1024;

fn main() -> ExitCode {
    let path = match std::env::args_os()
        .nth(1)
        .or_else(|| std::env::var_os("DEMO_APP_CONFIG"))
    {
        Some(p) => PathBuf::from(p),
        None => {
            eprintln!("usage: demo-app CONFIG.toml (or set DEMO_APP_CONFIG)");
            return ExitCode::from(2);
        }
    };
    let config = match load(&path) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("demo-app: {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    if config.seed_mib > 0 {
        match seed(&config.data_file, config.seed_mib) {
            Ok(true) => println!(
                "demo-app seeded {} MiB into {}",
                config.seed_mib,
                config.data_file.display()
            ),
            Ok(false) => {}
            Err(e) => {
                eprintln!(
                    "demo-app: cannot seed the data file {}: {e}",
                    config.data_file.display()
                );
                return ExitCode::from(1);
            }
        }
    }
    let listener = match TcpListener::bind(&config.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("demo-app: cannot listen on {}: {e}", config.listen);
            return ExitCode::from(1);
        }
    };
    println!(
        "demo-app listening on {} with data file {}",
        config.listen,
        config.data_file.display()
    );
    let _ = std::io::stdout().flush();
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let config = config.clone();
                std::thread::spawn(move || {
                    if let Err(e) = serve(stream, &config) {
                        eprintln!("demo-app: connection failed: {e}");
                    }
                });
            }
            Err(e) => eprintln!("demo-app: accept failed: {e}"),
        }
    }
    ExitCode::SUCCESS
}

fn load(path: &Path) -> Result<DemoConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
    let mut config: DemoConfig = toml::from_str(&text).map_err(|e| e.to_string())?;
    if config.bucket_dir.is_some() && config.bucket_url.is_some() {
        return Err("set `bucket_dir` or `bucket_url`, not both".to_string());
    }
    // Relative paths start at the configuration file, wherever the app is started from.
    let base = path.parent().unwrap_or(Path::new("."));
    config.data_file = base.join(&config.data_file);
    config.bucket_dir = config.bucket_dir.map(|d| base.join(d));
    config.config_file = path.to_path_buf();
    Ok(config)
}

fn serve(mut stream: TcpStream, config: &DemoConfig) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?).take(MAX_HEAD_BYTES as u64);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Headers are read and ignored; the blank line ends them.
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            b"only GET\n",
        );
    }
    match target {
        "/health" => respond(&mut stream, "200 OK", "text/plain", b"ok\n"),
        "/bucket" => match &config.bucket_dir {
            Some(dir) => match bucket_listing(dir) {
                Ok(list) => respond(&mut stream, "200 OK", "text/plain", list.as_bytes()),
                Err(e) => unavailable(&mut stream, dir, e),
            },
            None => respond(
                &mut stream,
                "404 Not Found",
                "text/plain",
                b"no bucket_dir\n",
            ),
        },
        "/config" => {
            let body = serde_json::to_vec_pretty(config).map_err(std::io::Error::other)?;
            respond(&mut stream, "200 OK", "application/json", &body)
        }
        "/hash" => match hash(&config.data_file) {
            Ok(h) => respond(
                &mut stream,
                "200 OK",
                "text/plain",
                format!("{h}\n").as_bytes(),
            ),
            Err(e) => unavailable(&mut stream, &config.data_file, e),
        },
        "/data" => match std::fs::File::open(&config.data_file) {
            Ok(mut file) => {
                let len = file.metadata()?.len();
                write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
                )?;
                std::io::copy(&mut file, &mut stream)?;
                stream.flush()
            }
            Err(e) => unavailable(&mut stream, &config.data_file, e),
        },
        _ => respond(&mut stream, "404 Not Found", "text/plain", b"not found\n"),
    }
}

/// Writes `mib` MiB of data (alternating random and text megabytes) at the start of a data
/// file whose first block is zero. Returns whether it wrote anything.
fn seed(path: &Path, mib: u32) -> std::io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let mut head = vec![0u8; 4096];
    let n = file.read_at(&mut head, 0)?;
    if head[..n].iter().any(|b| *b != 0) {
        return Ok(false);
    }
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(mib);
    let mut block = vec![0u8; 1 << 20];
    for i in 0..u64::from(mib) {
        if i % 2 == 0 {
            for chunk in block.chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
            }
        } else {
            let line =
                format!("demo-app record block {i}: the quick brown fox jumps over the lazy dog\n");
            for (j, b) in block.iter_mut().enumerate() {
                *b = line.as_bytes()[j % line.len()];
            }
        }
        file.write_all_at(&block, i << 20)?;
    }
    file.sync_all()?;
    Ok(true)
}

/// The bucket's objects as `key size` lines, sorted.
fn bucket_listing(dir: &Path) -> std::io::Result<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                stack.push(path);
            } else {
                let key = path
                    .strip_prefix(dir)
                    .unwrap_or(&path)
                    .display()
                    .to_string();
                out.push(format!("{key} {}", entry.metadata()?.len()));
            }
        }
    }
    out.sort();
    Ok(out.join("\n") + "\n")
}

fn hash(path: &Path) -> std::io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    std::io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
    Ok(hasher.finalize().to_hex().to_string())
}

fn unavailable(stream: &mut TcpStream, path: &Path, e: std::io::Error) -> std::io::Result<()> {
    let body = format!("cannot read the data file {}: {e}\n", path.display());
    respond(
        stream,
        "503 Service Unavailable",
        "text/plain",
        body.as_bytes(),
    )
}

fn respond(stream: &mut TcpStream, status: &str, kind: &str, body: &[u8]) -> std::io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)?;
    stream.flush()
}
