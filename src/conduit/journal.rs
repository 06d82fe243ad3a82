//! The relocation journal: every relocation is a persisted state machine in SQLite (WAL,
//! synchronous writes) in the state directory. Each step of a plan is checkpointed before and
//! after it runs, so that after a crash the executor knows, for every relocation, which steps
//! finished, which one was in flight, and what each produced.
//!
//! The journal records; it does not decide. Whether an in-flight step is re-run (steps are
//! idempotent) or rolled back is the executor's call.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::{RelocationRequest, RelocationState};
use crate::model::{Placement, PlacementBook, PlacementReadError, Placements};

/// Where one step of a plan stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Pending,
    /// Started and not known to have finished: after a crash, re-run or compensate it.
    Running,
    Done,
    Failed,
    /// Undone during a rollback.
    Compensated,
}

impl StepState {
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Running => "running",
            StepState::Done => "done",
            StepState::Failed => "failed",
            StepState::Compensated => "compensated",
        }
    }

    fn parse(s: &str) -> Result<Self, JournalError> {
        Ok(match s {
            "pending" => StepState::Pending,
            "running" => StepState::Running,
            "done" => StepState::Done,
            "failed" => StepState::Failed,
            "compensated" => StepState::Compensated,
            other => {
                return Err(JournalError::Corrupt(format!(
                    "unknown step state `{other}`"
                )))
            }
        })
    }
}

fn relocation_state_str(s: RelocationState) -> &'static str {
    match s {
        RelocationState::Queued => "queued",
        RelocationState::Running => "running",
        RelocationState::Completed => "completed",
        RelocationState::Failed => "failed",
        RelocationState::RolledBack => "rolled_back",
        RelocationState::RollingBack => "rolling_back",
        RelocationState::Grace => "grace",
    }
}

fn parse_relocation_state(s: &str) -> Result<RelocationState, JournalError> {
    Ok(match s {
        "queued" => RelocationState::Queued,
        "running" => RelocationState::Running,
        "completed" => RelocationState::Completed,
        "failed" => RelocationState::Failed,
        "rolled_back" => RelocationState::RolledBack,
        "rolling_back" => RelocationState::RollingBack,
        "grace" => RelocationState::Grace,
        other => {
            return Err(JournalError::Corrupt(format!(
                "unknown relocation state `{other}`"
            )))
        }
    })
}

/// One step as journalled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub seq: u32,
    pub name: String,
    pub state: StepState,
    /// What the step produced (paths, digests, operation ids), as JSON.
    pub output: serde_json::Value,
    pub error: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// One relocation with its steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelocationRecord {
    pub id: String,
    pub request: RelocationRequest,
    pub state: RelocationState,
    pub detail: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub steps: Vec<StepRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("the relocation journal {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("no relocation `{0}` in the journal")]
    Unknown(String),
    #[error("relocation `{id}` has no step {seq}")]
    UnknownStep { id: String, seq: u32 },
    #[error("relocation `{0}` is already in the journal; a relocation id is used once")]
    Exists(String),
    #[error("a relocation needs an id (the decision that asked for it); it was empty")]
    NoId,
    #[error("the relocation journal holds unreadable data: {0}")]
    Corrupt(String),
    #[error("the relocation journal {} has schema version {found}, newer than the {known} this FluidCloud knows; run the release that wrote it", path.display())]
    Newer {
        path: PathBuf,
        found: u32,
        known: u32,
    },
}

pub struct Journal {
    path: PathBuf,
    conn: Mutex<Connection>,
}

/// The schema, one migration per version: the journal's `user_version` says how many have
/// been applied. A migration is only ever appended, so a journal written by this release
/// opens in the next. The first one creates only what is missing, so a journal written before
/// the schema had a version takes it without losing a row.
const MIGRATIONS: &[&str] = &[SCHEMA_1, SCHEMA_2];

const SCHEMA_1: &str = "
CREATE TABLE IF NOT EXISTS relocations (
    id TEXT PRIMARY KEY,
    request TEXT NOT NULL,
    state TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS steps (
    relocation_id TEXT NOT NULL REFERENCES relocations(id),
    seq INTEGER NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    output TEXT NOT NULL DEFAULT 'null',
    error TEXT,
    started_at TEXT,
    finished_at TEXT,
    PRIMARY KEY (relocation_id, seq)
);
CREATE TABLE IF NOT EXISTS plans (
    relocation_id TEXT PRIMARY KEY REFERENCES relocations(id),
    plan TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS placements (
    service TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    since TEXT NOT NULL,
    relocation_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deployed (
    service TEXT NOT NULL,
    provider TEXT NOT NULL,
    component TEXT NOT NULL,
    PRIMARY KEY (service, provider, component)
);
CREATE INDEX IF NOT EXISTS relocations_by_state ON relocations(state);
";

/// What the broker reads every tick and the API pages through, found without reading (or
/// sorting) the whole history: relocations in the order they were submitted, and each
/// service's relocations.
const SCHEMA_2: &str = "
CREATE INDEX IF NOT EXISTS relocations_by_creation ON relocations(created_at, id);
CREATE INDEX IF NOT EXISTS relocations_by_service
    ON relocations(json_extract(request, '$.service'), created_at);
";

impl Journal {
    /// Opens (creating) the journal at `path`: WAL mode, `synchronous=FULL`, so a step
    /// reported done survives a power cut.
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        let err = |source| JournalError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        // SQLite creates its -wal and -shm files with the mode of the database file: make that
        // private before SQLite creates it (with 0644) itself.
        {
            use std::os::unix::fs::OpenOptionsExt;
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path);
        }
        let mut conn = Connection::open(path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        migrate(&mut conn, path)?;
        Ok(Journal {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    fn sql(&self, source: rusqlite::Error) -> JournalError {
        JournalError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (statements are
        // atomic), so a poisoned lock is safe to take over.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a new relocation and its planned steps in one transaction. Its id is the
    /// decision's: an empty id, or one the journal holds already, is refused, so one decision
    /// can never stand for two relocations nor two decisions share one.
    pub fn create(
        &self,
        request: &RelocationRequest,
        steps: &[&str],
    ) -> Result<RelocationRecord, JournalError> {
        let id = request.decision_id.clone();
        if id.is_empty() {
            return Err(JournalError::NoId);
        }
        let now = Utc::now().to_rfc3339();
        let req = serde_json::to_string(request).expect("request serialises");
        {
            let mut conn = self.lock();
            let tx = conn.transaction().map_err(|e| self.sql(e))?;
            let exists: bool = tx
                .query_row(
                    "SELECT EXISTS(SELECT 1 FROM relocations WHERE id = ?1)",
                    params![id],
                    |r| r.get(0),
                )
                .map_err(|e| self.sql(e))?;
            if exists {
                return Err(JournalError::Exists(id));
            }
            tx.execute(
                "INSERT INTO relocations (id, request, state, created_at, updated_at) VALUES (?1, ?2, 'queued', ?3, ?3)",
                params![id, req, now],
            )
            .map_err(|e| self.sql(e))?;
            for (seq, name) in steps.iter().enumerate() {
                tx.execute(
                    "INSERT INTO steps (relocation_id, seq, name, state) VALUES (?1, ?2, ?3, 'pending')",
                    params![id, seq as u32, name],
                )
                .map_err(|e| self.sql(e))?;
            }
            tx.commit().map_err(|e| self.sql(e))?;
        }
        self.get(&id)?.ok_or(JournalError::Unknown(id))
    }

    /// Sets the relocation's state and its human-readable detail.
    pub fn set_state(
        &self,
        id: &str,
        state: RelocationState,
        detail: &str,
    ) -> Result<(), JournalError> {
        let n = self
            .lock()
            .execute(
                "UPDATE relocations SET state = ?2, detail = ?3, updated_at = ?4 WHERE id = ?1",
                params![
                    id,
                    relocation_state_str(state),
                    detail,
                    Utc::now().to_rfc3339()
                ],
            )
            .map_err(|e| self.sql(e))?;
        if n == 0 {
            return Err(JournalError::Unknown(id.to_string()));
        }
        Ok(())
    }

    /// Moves one step to `state`, recording its output or error. `Running` stamps the start,
    /// every other state the finish.
    pub fn set_step(
        &self,
        id: &str,
        seq: u32,
        state: StepState,
        output: Option<&serde_json::Value>,
        error: Option<&str>,
    ) -> Result<(), JournalError> {
        let now = Utc::now().to_rfc3339();
        let output = output.map(|o| o.to_string());
        let conn = self.lock();
        let n = if state == StepState::Running {
            conn.execute(
                "UPDATE steps SET state = 'running', started_at = ?3, error = NULL WHERE relocation_id = ?1 AND seq = ?2",
                params![id, seq, now],
            )
        } else {
            conn.execute(
                "UPDATE steps SET state = ?3, finished_at = ?4, output = COALESCE(?5, output), error = COALESCE(?6, error) WHERE relocation_id = ?1 AND seq = ?2",
                params![id, seq, state.as_str(), now, output, error],
            )
        }
        .map_err(|e| self.sql(e))?;
        drop(conn);
        if n == 0 {
            return Err(JournalError::UnknownStep {
                id: id.to_string(),
                seq,
            });
        }
        self.touch(id)
    }

    fn touch(&self, id: &str) -> Result<(), JournalError> {
        self.lock()
            .execute(
                "UPDATE relocations SET updated_at = ?2 WHERE id = ?1",
                params![id, Utc::now().to_rfc3339()],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// One relocation with its steps.
    pub fn get(&self, id: &str) -> Result<Option<RelocationRecord>, JournalError> {
        let conn = self.lock();
        let row = conn
            .query_row(
                "SELECT request, state, detail, created_at, updated_at FROM relocations WHERE id = ?1",
                params![id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                    ))
                },
            )
            .optional()
            .map_err(|e| self.sql(e))?;
        let Some((request, state, detail, created, updated)) = row else {
            return Ok(None);
        };
        let mut stmt = conn
            .prepare(
                "SELECT seq, name, state, output, error, started_at, finished_at FROM steps WHERE relocation_id = ?1 ORDER BY seq",
            )
            .map_err(|e| self.sql(e))?;
        let raw_steps = stmt
            .query_map(params![id], |r| {
                Ok((
                    r.get::<_, u32>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, Option<String>>(6)?,
                ))
            })
            .map_err(|e| self.sql(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.sql(e))?;
        let mut steps = Vec::with_capacity(raw_steps.len());
        for (seq, name, state, output, error, started, finished) in raw_steps {
            steps.push(StepRecord {
                seq,
                name,
                state: StepState::parse(&state)?,
                output: serde_json::from_str(&output)
                    .map_err(|e| JournalError::Corrupt(format!("step {seq} output: {e}")))?,
                error,
                started_at: started.as_deref().map(parse_time).transpose()?,
                finished_at: finished.as_deref().map(parse_time).transpose()?,
            });
        }
        Ok(Some(RelocationRecord {
            id: id.to_string(),
            request: serde_json::from_str(&request)
                .map_err(|e| JournalError::Corrupt(format!("request of `{id}`: {e}")))?,
            state: parse_relocation_state(&state)?,
            detail,
            created_at: parse_time(&created)?,
            updated_at: parse_time(&updated)?,
            steps,
        }))
    }

    /// Without their steps, oldest first: the relocations that have not ended (queued,
    /// running, rolling back, in their grace period) and every one submitted at or after
    /// `since`. What the broker reads each tick, as long as the history grows.
    pub fn summaries_since(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<RelocationRecord>, JournalError> {
        // Times are compared as the RFC 3339 text they are stored as, which sorts like the
        // times themselves up to the year 9999 (later years take a sign).
        let latest = DateTime::parse_from_rfc3339("9999-12-31T23:59:59Z")
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or(since);
        let since = since.min(latest);
        self.summary_rows(
            &format!(
                "SELECT {SUMMARY} FROM relocations WHERE created_at >= ?1 \
                 UNION SELECT {SUMMARY} FROM relocations \
                 WHERE state IN ('queued', 'running', 'rolling_back', 'grace') \
                 ORDER BY created_at, id"
            ),
            [since.to_rfc3339()],
        )
    }

    /// Up to `n` relocations without their steps, newest first, submitted before the one
    /// `after` names (its submission time and id; `None` starts from the newest).
    pub fn summaries_page(
        &self,
        after: Option<(DateTime<Utc>, &str)>,
        n: usize,
    ) -> Result<Vec<RelocationRecord>, JournalError> {
        let n = n.min(i64::MAX as usize) as i64;
        match after {
            None => self.summary_rows(
                &format!(
                    "SELECT {SUMMARY} FROM relocations ORDER BY created_at DESC, id DESC LIMIT ?1"
                ),
                params![n],
            ),
            Some((at, id)) => self.summary_rows(
                &format!(
                    "SELECT {SUMMARY} FROM relocations WHERE (created_at, id) < (?1, ?2) \
                     ORDER BY created_at DESC, id DESC LIMIT ?3"
                ),
                params![at.to_rfc3339(), id, n],
            ),
        }
    }

    /// When each service's last relocation was submitted.
    pub fn last_by_service(&self) -> Result<BTreeMap<String, DateTime<Utc>>, JournalError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare(
                "SELECT json_extract(request, '$.service') AS service, MAX(created_at) \
                 FROM relocations GROUP BY service",
            )
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, Option<String>>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(|e| self.sql(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.sql(e))?;
        rows.into_iter()
            .map(|(service, at)| {
                let service = service.ok_or_else(|| {
                    JournalError::Corrupt(format!(
                        "a relocation submitted at {at} names no service"
                    ))
                })?;
                Ok((service, parse_time(&at)?))
            })
            .collect()
    }

    /// The relocations `query` (selecting [`SUMMARY`]) finds, without their steps.
    fn summary_rows(
        &self,
        query: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<RelocationRecord>, JournalError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(query).map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map(params, |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                ))
            })
            .map_err(|e| self.sql(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.sql(e))?;
        rows.into_iter()
            .map(|(id, request, state, detail, created, updated)| {
                Ok(RelocationRecord {
                    request: serde_json::from_str(&request)
                        .map_err(|e| JournalError::Corrupt(format!("request of `{id}`: {e}")))?,
                    id,
                    state: parse_relocation_state(&state)?,
                    detail,
                    created_at: parse_time(&created)?,
                    updated_at: parse_time(&updated)?,
                    steps: Vec::new(),
                })
            })
            .collect()
    }

    /// The relocations that have not ended, without their steps, oldest first.
    pub fn unfinished_summaries(&self) -> Result<Vec<RelocationRecord>, JournalError> {
        self.summary_rows(
            &format!(
                "SELECT {SUMMARY} FROM relocations \
                 WHERE state IN ('queued', 'running', 'rolling_back', 'grace') \
                 ORDER BY created_at, id"
            ),
            [],
        )
    }

    /// Every relocation, oldest first.
    pub fn list(&self) -> Result<Vec<RelocationRecord>, JournalError> {
        self.records("SELECT id FROM relocations ORDER BY created_at, id")
    }

    /// Relocations a crash interrupted: queued, running, rolling back or in their grace
    /// period. The executor resumes or rolls back each of them at start.
    pub fn unfinished(&self) -> Result<Vec<RelocationRecord>, JournalError> {
        self.records(
            "SELECT id FROM relocations WHERE state IN ('queued', 'running', 'rolling_back', 'grace') ORDER BY created_at, id",
        )
    }

    /// The relocations whose ids `query` selects, in its order.
    fn records(&self, query: &str) -> Result<Vec<RelocationRecord>, JournalError> {
        let ids: Vec<String> = {
            let conn = self.lock();
            let mut stmt = conn.prepare(query).map_err(|e| self.sql(e))?;
            let ids = stmt
                .query_map([], |r| r.get(0))
                .map_err(|e| self.sql(e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.sql(e))?;
            ids
        };
        ids.iter()
            .filter_map(|id| self.get(id).transpose())
            .collect()
    }

    /// Stores the plan a relocation executes, so a restart resumes the same plan even when
    /// the configuration changed meanwhile. Storing it again is a no-op.
    pub fn set_plan(&self, id: &str, plan: &serde_json::Value) -> Result<(), JournalError> {
        self.lock()
            .execute(
                "INSERT OR IGNORE INTO plans (relocation_id, plan) VALUES (?1, ?2)",
                params![id, plan.to_string()],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    pub fn plan(&self, id: &str) -> Result<Option<serde_json::Value>, JournalError> {
        let text: Option<String> = self
            .lock()
            .query_row(
                "SELECT plan FROM plans WHERE relocation_id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.sql(e))?;
        text.map(|t| {
            serde_json::from_str(&t)
                .map_err(|e| JournalError::Corrupt(format!("plan of `{id}`: {e}")))
        })
        .transpose()
    }

    /// Records that `service` now lives on `provider`, moved there by `relocation_id`.
    pub fn set_placement(
        &self,
        service: &str,
        provider: &str,
        relocation_id: &str,
    ) -> Result<(), JournalError> {
        self.lock()
            .execute(
                "INSERT INTO placements (service, provider, since, relocation_id) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(service) DO UPDATE SET provider = ?2, since = ?3, relocation_id = ?4",
                params![service, provider, Utc::now().to_rfc3339(), relocation_id],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Remembers that `component` (`volume:data`) of `service` was created at `provider`, so a
    /// later disappearance is reported instead of papered over with an empty one.
    pub fn set_deployed(
        &self,
        service: &str,
        provider: &str,
        component: &str,
    ) -> Result<(), JournalError> {
        self.lock()
            .execute(
                "INSERT OR IGNORE INTO deployed (service, provider, component) VALUES (?1, ?2, ?3)",
                params![service, provider, component],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// The components of `service` known to have existed at `provider`.
    pub fn deployed(
        &self,
        service: &str,
        provider: &str,
    ) -> Result<std::collections::BTreeSet<String>, JournalError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare("SELECT component FROM deployed WHERE service = ?1 AND provider = ?2")
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map(params![service, provider], |r| r.get::<_, String>(0))
            .map_err(|e| self.sql(e))?
            .collect::<Result<_, _>>()
            .map_err(|e| self.sql(e))?;
        Ok(rows)
    }

    /// Forgets what was deployed of `service` at `provider` (after decommissioning).
    pub fn clear_deployed(&self, service: &str, provider: &str) -> Result<(), JournalError> {
        self.lock()
            .execute(
                "DELETE FROM deployed WHERE service = ?1 AND provider = ?2",
                params![service, provider],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Where relocations placed services: service to provider.
    pub fn placements(&self) -> Result<std::collections::BTreeMap<String, String>, JournalError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare("SELECT service, provider FROM placements")
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(|e| self.sql(e))?
            .collect::<Result<_, _>>()
            .map_err(|e| self.sql(e))?;
        Ok(rows)
    }

    /// Where relocations placed services, with when and by which relocation.
    pub fn placement_records(&self) -> Result<Placements, JournalError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare("SELECT service, provider, since, relocation_id FROM placements")
            .map_err(|e| self.sql(e))?;
        let rows: Vec<(String, String, String, String)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .map_err(|e| self.sql(e))?
            .collect::<Result<_, _>>()
            .map_err(|e| self.sql(e))?;
        rows.into_iter()
            .map(|(service, provider, since, relocation_id)| {
                let since = DateTime::parse_from_rfc3339(&since)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| {
                        JournalError::Corrupt(format!("placement time of `{service}`: {e}"))
                    })?;
                Ok(Placement {
                    service,
                    provider,
                    since,
                    relocation_id,
                })
            })
            .collect()
    }
}

/// The Broker reads where services run from here, never writes it.
impl PlacementBook for Journal {
    fn placements(&self) -> Result<Placements, PlacementReadError> {
        self.placement_records()
            .map_err(|e| PlacementReadError { source: e.into() })
    }
}

/// Brings the journal's schema to the newest version, each migration in its own transaction.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), JournalError> {
    let err = |source| JournalError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let found: u32 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(err)?;
    let known = MIGRATIONS.len() as u32;
    if found > known {
        return Err(JournalError::Newer {
            path: path.to_path_buf(),
            found,
            known,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction().map_err(err)?;
        tx.execute_batch(sql).map_err(err)?;
        tx.pragma_update(None, "user_version", i as u32 + 1)
            .map_err(err)?;
        tx.commit().map_err(err)?;
    }
    Ok(())
}

/// The columns of a relocation without its steps, as [`Journal::summary_rows`] reads them.
const SUMMARY: &str = "id, request, state, detail, created_at, updated_at";

fn parse_time(s: &str) -> Result<DateTime<Utc>, JournalError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| JournalError::Corrupt(format!("time `{s}`: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: &str) -> RelocationRequest {
        RelocationRequest {
            decision_id: id.into(),
            service: "shop".into(),
            from: "a".into(),
            to: "b".into(),
            reason: "cheaper".into(),
            origin: "policy".into(),
        }
    }

    #[test]
    fn steps_are_checkpointed_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.sqlite");
        {
            let j = Journal::open(&path).unwrap();
            j.create(&request("r1"), &["copy-volume", "cutover"])
                .unwrap();
            j.set_state("r1", RelocationState::Running, "copying")
                .unwrap();
            j.set_step("r1", 0, StepState::Running, None, None).unwrap();
            j.set_step(
                "r1",
                0,
                StepState::Done,
                Some(&serde_json::json!({"digest": "abc"})),
                None,
            )
            .unwrap();
            j.set_step("r1", 1, StepState::Running, None, None).unwrap();
            // The process dies here.
        }
        let j = Journal::open(&path).unwrap();
        let open = j.unfinished().unwrap();
        assert_eq!(open.len(), 1);
        let r = &open[0];
        assert_eq!(r.state, RelocationState::Running);
        assert_eq!(r.detail, "copying");
        assert_eq!(r.steps[0].state, StepState::Done);
        assert_eq!(r.steps[0].output["digest"], "abc");
        assert!(r.steps[0].finished_at.is_some());
        assert_eq!(r.steps[1].state, StepState::Running);
        assert!(r.steps[1].started_at.is_some() && r.steps[1].finished_at.is_none());

        j.set_step("r1", 1, StepState::Failed, None, Some("target unhealthy"))
            .unwrap();
        j.set_step("r1", 0, StepState::Compensated, None, None)
            .unwrap();
        j.set_state("r1", RelocationState::RolledBack, "target unhealthy")
            .unwrap();
        assert!(j.unfinished().unwrap().is_empty());
        let r = j.get("r1").unwrap().unwrap();
        assert_eq!(r.steps[1].error.as_deref(), Some("target unhealthy"));
        // The output of a compensated step is kept: rollback needs to know what was made.
        assert_eq!(r.steps[0].output["digest"], "abc");
    }

    #[test]
    fn the_broker_reads_placements_with_their_commit_time() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("journal.sqlite")).unwrap();
        let book: &dyn PlacementBook = &j;
        assert!(book.placements().unwrap().is_empty());
        let before = Utc::now();
        j.set_placement("shop", "b", "r1").unwrap();
        j.set_placement("shop", "c", "r2").unwrap();
        let placements = book.placements().unwrap();
        let shop = placements.get("shop").unwrap();
        assert_eq!(
            (shop.provider.as_str(), shop.relocation_id.as_str()),
            ("c", "r2")
        );
        assert!(shop.since >= before);
        assert_eq!(placements.provider_of("crm", "a"), "a");
    }

    #[test]
    fn the_schema_has_a_version_and_a_newer_journal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.sqlite");
        let version = |p: &Path| -> u32 {
            Connection::open(p)
                .unwrap()
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .unwrap()
        };
        // A journal from before the schema had a version keeps its rows.
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA_1).unwrap();
            conn.execute(
                "INSERT INTO placements (service, provider, since, relocation_id) VALUES ('shop', 'b', 'now', 'r0')",
                [],
            )
            .unwrap();
        }
        assert_eq!(version(&path), 0);
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.placements().unwrap()["shop"], "b");
        drop(j);
        assert_eq!(version(&path), MIGRATIONS.len() as u32);
        // One written by a later release is refused, not misread.
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let e = Journal::open(&path).err().expect("refused").to_string();
        assert!(e.contains("schema version 99"), "{e}");
    }

    #[test]
    fn an_empty_or_reused_relocation_id_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.sqlite")).unwrap();
        let a = j.create(&request("r1"), &["x", "y"]).unwrap();
        j.set_step("r1", 0, StepState::Done, None, None).unwrap();
        // A second decision under the same id must not be answered with the first one's
        // relocation, whatever its service.
        let mut other = request("r1");
        other.service = "crm".into();
        assert!(matches!(
            j.create(&other, &["x", "y"]),
            Err(JournalError::Exists(_))
        ));
        assert!(matches!(
            j.create(&request("r1"), &["x", "y"]),
            Err(JournalError::Exists(_))
        ));
        assert!(matches!(
            j.create(&request(""), &["x"]),
            Err(JournalError::NoId)
        ));
        let b = j.get("r1").unwrap().unwrap();
        assert_eq!(a.created_at, b.created_at);
        assert_eq!(b.steps[0].state, StepState::Done, "nothing was reset");
        assert!(matches!(
            j.set_step("r1", 7, StepState::Done, None, None),
            Err(JournalError::UnknownStep { seq: 7, .. })
        ));
        assert!(matches!(
            j.set_state("nope", RelocationState::Failed, ""),
            Err(JournalError::Unknown(_))
        ));
        assert_eq!(j.list().unwrap().len(), 1);
    }

    /// A journal of `n` relocations of `service` that ended, submitted a minute apart up
    /// to an hour before now, ids `old-<i>`.
    fn history(j: &Journal, service: &str, n: usize) {
        for i in 0..n {
            let mut r = request(&format!("old-{service}-{i}"));
            r.service = service.into();
            j.create(&r, &["copy"]).unwrap();
            j.set_state(&r.decision_id, RelocationState::Completed, "")
                .unwrap();
            let at = Utc::now() - chrono::Duration::minutes(60 + (n - i) as i64);
            j.lock()
                .execute(
                    "UPDATE relocations SET created_at = ?1 WHERE id = ?2",
                    params![at.to_rfc3339(), r.decision_id],
                )
                .unwrap();
        }
    }

    #[test]
    fn a_tick_reads_what_is_under_way_and_what_the_rails_window_holds_not_the_history() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("journal.sqlite")).unwrap();
        history(&j, "shop", 300);
        history(&j, "crm", 5);
        // One that ended an hour ago and is still in its grace period, one running now.
        let mut grace = request("graced");
        grace.service = "blog".into();
        j.create(&grace, &["copy"]).unwrap();
        j.set_state("graced", RelocationState::Grace, "").unwrap();
        j.lock()
            .execute(
                "UPDATE relocations SET created_at = ?1 WHERE id = 'graced'",
                params![(Utc::now() - chrono::Duration::hours(3)).to_rfc3339()],
            )
            .unwrap();
        j.create(&request("now"), &["copy"]).unwrap();

        let ids = |records: Vec<RelocationRecord>| -> Vec<String> {
            records.into_iter().map(|r| r.id).collect()
        };
        // The rails' window reaches back 62.5 minutes: two of each history are in it.
        let window = Utc::now() - chrono::Duration::seconds(62 * 60 + 30);
        assert_eq!(
            ids(j.summaries_since(window).unwrap()),
            [
                "graced",
                "old-shop-298",
                "old-crm-3",
                "old-shop-299",
                "old-crm-4",
                "now"
            ]
        );
        assert_eq!(
            ids(j.summaries_since(DateTime::<Utc>::MAX_UTC).unwrap()),
            ["graced", "now"]
        );
        assert_eq!(ids(j.unfinished_summaries().unwrap()), ["graced", "now"]);
        let last = j.last_by_service().unwrap();
        assert_eq!(last.len(), 3, "{last:?}");
        assert_eq!(last["shop"], j.get("now").unwrap().unwrap().created_at);
        assert_eq!(last["crm"], j.get("old-crm-4").unwrap().unwrap().created_at);
        assert_eq!(last["blog"], j.get("graced").unwrap().unwrap().created_at);
    }

    /// Regression: the broker's tick read every relocation ever made (and SQLite sorted them
    /// all), so the daemon's memory rose with its history. Each read it makes now walks an
    /// index to what it returns.
    #[test]
    fn the_reads_of_a_tick_and_of_a_page_use_indexes_not_a_sort_of_the_history() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("journal.sqlite")).unwrap();
        history(&j, "shop", 50);
        let conn = j.lock();
        conn.execute_batch("ANALYZE").unwrap();
        let plan = |sql: &str| -> String {
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let rows = stmt
                .query_map([], |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            rows.join("; ")
        };
        let t = "'2026-01-01T00:00:00+00:00'";
        for (what, sql) in [
            (
                "summaries_since",
                format!(
                    "SELECT {SUMMARY} FROM relocations WHERE created_at >= {t} \
                     UNION SELECT {SUMMARY} FROM relocations \
                     WHERE state IN ('queued', 'running', 'rolling_back', 'grace') \
                     ORDER BY created_at, id"
                ),
            ),
            (
                "summaries_page",
                format!(
                    "SELECT {SUMMARY} FROM relocations WHERE (created_at, id) < ({t}, 'x') \
                     ORDER BY created_at DESC, id DESC LIMIT 10"
                ),
            ),
            (
                "last_by_service",
                "SELECT json_extract(request, '$.service') AS service, MAX(created_at) \
                 FROM relocations GROUP BY service"
                    .to_string(),
            ),
        ] {
            let p = plan(&sql);
            assert!(p.contains("USING"), "{what} reads no index: {p}");
            assert!(
                !p.split("; ").any(|step| step == "SCAN relocations"),
                "{what} scans the table: {p}"
            );
            if what != "summaries_since" {
                assert!(!p.contains("TEMP B-TREE"), "{what} sorts the history: {p}");
            }
        }
    }
}
