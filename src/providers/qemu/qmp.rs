//! A small QMP (QEMU Machine Protocol) client: JSON objects, one per line, over the VM's
//! unix socket. After the greeting the client must send `qmp_capabilities`; every command
//! then gets one `return` or `error` answer, and asynchronous events may arrive in between
//! (they are logged at debug level and otherwise skipped).

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// How long one exchange with the emulator may take; QMP answers at once unless the
/// emulator is wedged.
const TIMEOUT: Duration = Duration::from_secs(10);
/// A line longer than this is not QMP.
const MAX_LINE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to the QMP socket {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP did not answer within {0:?}")]
    Timeout(Duration),
    #[error("QMP closed the connection")]
    Closed,
    #[error("QMP sent something unexpected: {0}")]
    Protocol(String),
    #[error("QMP command `{command}` failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connects, reads the greeting and enters command mode.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let stream = tokio::time::timeout(TIMEOUT, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout(TIMEOUT))?
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer: w,
        };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected the QMP greeting, got {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        tokio::time::timeout(TIMEOUT, self.writer.write_all(line.as_bytes()))
            .await
            .map_err(|_| QmpError::Timeout(TIMEOUT))??;
        loop {
            let answer = self.read_message().await?;
            if let Some(event) = answer.get("event") {
                tracing::debug!("QMP event {event} while waiting for `{command}`.");
                continue;
            }
            if let Some(ret) = answer.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = answer.get("error") {
                let field = |k: &str| {
                    err.get(k)
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_string()
                };
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(QmpError::Protocol(format!(
                "answer to `{command}` is neither return nor error: {answer}"
            )));
        }
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = tokio::time::timeout(
            TIMEOUT,
            (&mut self.reader)
                .take(MAX_LINE as u64)
                .read_line(&mut line),
        )
        .await
        .map_err(|_| QmpError::Timeout(TIMEOUT))??;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        if !line.ends_with('\n') {
            return Err(QmpError::Protocol(format!(
                "a message longer than {MAX_LINE} bytes or cut short"
            )));
        }
        serde_json::from_str(line.trim_end())
            .map_err(|e| QmpError::Protocol(format!("not JSON ({e}): {}", line.trim_end())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A fake emulator that greets, acknowledges capabilities, then answers `query-status`
    /// after an unrelated event, and `bogus` with an error.
    async fn serve(listener: UnixListener) {
        let (stream, _) = listener.accept().await.expect("accept");
        let (r, mut w) = stream.into_split();
        let mut lines = BufReader::new(r).lines();
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .unwrap();
        while let Ok(Some(line)) = lines.next_line().await {
            let v: Value = serde_json::from_str(&line).unwrap();
            let reply = match v["execute"].as_str() {
                Some("qmp_capabilities") => "{\"return\": {}}\n".to_string(),
                Some("query-status") => "{\"event\": \"RESUME\", \"timestamp\": {}}\n{\"return\": {\"status\": \"running\", \"running\": true}}\n".to_string(),
                _ => "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command bogus has not been found\"}}\n".to_string(),
            };
            w.write_all(reply.as_bytes()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn commands_get_their_answers_and_events_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(serve(listener));
        let mut qmp = Qmp::connect(&path).await.expect("connects");
        let status = qmp.execute("query-status", None).await.expect("answers");
        assert_eq!(status["status"], "running");
        let err = qmp.execute("bogus", None).await.expect_err("fails");
        assert!(
            matches!(&err, QmpError::Command { class, .. } if class == "CommandNotFound"),
            "{err}"
        );
        drop(qmp);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_socket_nobody_listens_on_is_a_connect_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = match Qmp::connect(&dir.path().join("none.sock")).await {
            Ok(_) => panic!("connected to nothing"),
            Err(e) => e,
        };
        assert!(matches!(err, QmpError::Connect { .. }), "{err}");
    }
}
