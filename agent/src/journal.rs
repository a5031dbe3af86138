//! The deploy journal and history: one SQLite database in
//! `<state_dir>/journal.sqlite` (WAL, durable commits grouped:
//! [`group_commit`]).
//!
//! Every deploy and rollback is a row in `deploys`, written when the target
//! lock is taken and before any byte is written beside the target. It names
//! the files the run will touch (live path, whether it existed, its temp and
//! backup paths), so recovery can find and finish or undo the work without
//! anything else. Each stage and each verification attempt is appended as it
//! happens; the terminal outcome closes the row. A row without an outcome
//! after a crash is what recovery (`deploy::recover`) works on.
//!
//! Guarantees: every write is a committed transaction. The rows recovery
//! depends on (a run's start, the stages it acts on, the outcome) are
//! durable when the call returns ([`Sync::Now`]: an fsync of the WAL that
//! began after the commit, shared by every commit made while the one before
//! was in flight); informational stage rows ([`Sync::WithNext`]) are in the
//! WAL when the call returns, so they survive the agent being killed, and
//! reach the disk with the next durable write, which fsyncs the WAL they
//! precede in. The
//! journal never holds key material (fingerprints of certificates and of
//! public keys only); the schema is versioned with `PRAGMA user_version`.
//! The file can be read with `sqlite3` while the agent runs (WAL).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use rusqlite::{Connection, OptionalExtension, params};

use group_commit::GroupCommit;

mod group_commit;

/// SQLite's page cache, in KiB (`PRAGMA cache_size` takes it negative).
const CACHE_KIB: i64 = -256;

/// Current schema version (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 3;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS deploys (
    id            TEXT PRIMARY KEY,
    target        TEXT NOT NULL,
    op            TEXT NOT NULL,          -- 'deploy' | 'rollback'
    origin        TEXT NOT NULL,          -- who asked: 'cli uid=1000 pid=42', 'drop /path'
    started_ms    INTEGER NOT NULL,
    stage         TEXT NOT NULL,          -- last stage reached
    files         TEXT NOT NULL,          -- JSON: the files this run touches
    cert_sha256   TEXT NOT NULL,          -- leaf being put in place
    prev_sha256   TEXT NOT NULL,          -- leaf on disk before ('' when none)
    inputs        TEXT NOT NULL,          -- JSON: input fingerprints (never key material)
    finished_ms   INTEGER,                -- NULL until terminal
    outcome       TEXT,                   -- NULL until terminal
    error         TEXT,
    verification  TEXT,
    disk_sha256   TEXT,
    served_sha256 TEXT,
    recovered     INTEGER NOT NULL DEFAULT 0,
    no_reload     INTEGER NOT NULL DEFAULT 0, -- deployed with --no-reload (since version 2)
    host          TEXT NOT NULL DEFAULT ''    -- a remote target's user@host:port; '' for this host (since version 3)
);
CREATE INDEX IF NOT EXISTS deploys_target ON deploys (target, started_ms);
CREATE INDEX IF NOT EXISTS deploys_open ON deploys (outcome)
    WHERE outcome IS NULL OR outcome = 'rollback_failed';
CREATE TABLE IF NOT EXISTS stages (
    deploy_id TEXT NOT NULL REFERENCES deploys (id),
    at_ms     INTEGER NOT NULL,
    stage     TEXT NOT NULL,
    message   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS stages_deploy ON stages (deploy_id);
";

/// Why the journal could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(
        "cannot open the deploy journal {path}: {source}: the agent needs read and write \
         access to its state_dir; if the file is corrupt, move it aside (history is lost, \
         targets are not touched)"
    )]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "the deploy journal {path} has schema version {found}, newer than this agent's \
         {SCHEMA_VERSION}: run the newer agent, or move the file aside"
    )]
    TooNew { path: PathBuf, found: i64 },
    #[error("deploy journal {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("deploy journal {path}: {reason}")]
    Sync { path: PathBuf, reason: String },
    #[error("deploy journal {path}: a record is unreadable: {detail}")]
    Corrupt { path: PathBuf, detail: String },
}

/// One file a run touches, as recorded before it is touched.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileRecord {
    /// The operator-visible path.
    pub live: PathBuf,
    /// Something was at `live` before the run.
    pub existed: bool,
    /// Where the previous file is kept (when `existed`).
    pub backup: PathBuf,
    /// The temp file the new content is written to.
    pub tmp: PathBuf,
    /// Generations layout: set on the record of `..data` (`live`), whose
    /// `backup` is where the link pointed before; this is the generation it
    /// points at after the switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<PathBuf>,
    /// The run wrote `generation` (undoing the run removes it).
    #[serde(default)]
    pub created_generation: bool,
}

/// What is recorded when a run takes the target lock.
#[derive(Debug, Clone)]
pub struct Begin<'a> {
    pub id: &'a str,
    pub target: &'a str,
    /// `deploy` or `rollback`.
    pub op: &'a str,
    pub origin: &'a str,
    pub files: &'a [FileRecord],
    pub cert_sha256: &'a str,
    pub prev_sha256: &'a str,
    /// Input fingerprints: `(role, sha256)` of certificates and public keys.
    pub inputs: &'a [(String, String)],
    /// Deployed with `--no-reload`: recovery completes it without reload
    /// or verification.
    pub no_reload: bool,
    /// A remote target's `user@host:port`; empty for this host. Recovery
    /// never acts on a run's files on any other host than this one.
    pub host: &'a str,
}

/// What is recorded when a run ends.
#[derive(Debug, Clone)]
pub struct Finish<'a> {
    pub outcome: &'a str,
    pub error: &'a str,
    pub verification: &'a str,
    pub disk_sha256: &'a str,
    pub served_sha256: &'a str,
    /// Set when recovery finished the run.
    pub recovered: bool,
    /// When it ended (also what status says until the agent restarts).
    pub finished: SystemTime,
}

/// One run as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub id: String,
    pub target: String,
    pub op: String,
    pub origin: String,
    pub started: SystemTime,
    pub stage: String,
    pub files: Vec<FileRecord>,
    pub cert_sha256: String,
    pub prev_sha256: String,
    pub finished: Option<SystemTime>,
    pub outcome: Option<String>,
    pub error: String,
    pub verification: String,
    pub disk_sha256: String,
    pub served_sha256: String,
    pub recovered: bool,
    /// Deployed with `--no-reload`.
    pub no_reload: bool,
    /// A remote target's `user@host:port`; empty for this host.
    pub host: String,
    /// Stages with their times, oldest first (only filled by `history`).
    pub stages: Vec<(SystemTime, String, String)>,
}

/// How soon a write must be on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// On disk when the call returns, also across a power cut: an fsync
    /// of the WAL that began after the commit ([`group_commit`]).
    Now,
    /// In the WAL when the call returns (it survives the agent being
    /// killed), on disk with the next [`Sync::Now`] write. Only for rows
    /// recovery does not act on:
    /// losing one to a power cut leaves recovery doing what it does for
    /// the row before it.
    WithNext,
}

/// The journal of one agent.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    /// The connection (`synchronous = NORMAL`: commits are not fsynced).
    conn: Mutex<Connection>,
    /// The fsyncs of the WAL that make [`Sync::Now`] writes durable.
    wal: GroupCommit,
}

fn ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn time(ms: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

impl Journal {
    /// Opens (creating when missing) `<state_dir>/journal.sqlite`.
    pub fn open(state_dir: &Path) -> Result<Journal, JournalError> {
        let path = state_dir.join("journal.sqlite");
        let open_err = |source| JournalError::Open {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        // WAL: readers never block the writer. NORMAL: a commit is in the
        // WAL when it returns and SQLite fsyncs around checkpoints; the
        // fsync after a durable commit is the group commit's, shared by
        // the commits of concurrent runs.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err)?;
        // The writes append and the reads go by index: a small page cache
        // does (SQLite's default, 2 MiB, stays allocated after a burst).
        conn.pragma_update(None, "cache_size", CACHE_KIB)
            .map_err(open_err)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(open_err)?;
        if version > SCHEMA_VERSION {
            return Err(JournalError::TooNew {
                path,
                found: version,
            });
        }
        conn.execute_batch(SCHEMA).map_err(open_err)?;
        if version == 1 {
            // Version 1 had no no_reload column; its runs all reloaded.
            conn.execute_batch(
                "ALTER TABLE deploys ADD COLUMN no_reload INTEGER NOT NULL DEFAULT 0",
            )
            .map_err(open_err)?;
        }
        if (1..3).contains(&version) {
            // Before version 3 every run was on this host.
            conn.execute_batch("ALTER TABLE deploys ADD COLUMN host TEXT NOT NULL DEFAULT ''")
                .map_err(open_err)?;
        }
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(open_err)?;
        let wal = GroupCommit::new(PathBuf::from(format!("{}-wal", path.display())));
        Ok(Journal {
            path,
            conn: Mutex::new(conn),
            wal,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, JournalError> {
        let mut conn = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut conn).map_err(|source| JournalError::Write {
            path: self.path.clone(),
            source,
        })
    }

    /// [`Self::with`] for a write that must reach the disk as `sync` says:
    /// committed under the connection lock, then, for [`Sync::Now`],
    /// made durable by the group commit without it.
    fn write<T>(
        &self,
        sync: Sync,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, JournalError> {
        // Numbered under the connection lock: numbers follow the WAL.
        let (value, seq) = self.with(|c| Ok((f(c)?, self.wal.committed())))?;
        if sync == Sync::Now {
            self.wal.durable(seq).map_err(|reason| JournalError::Sync {
                path: self.path.clone(),
                reason,
            })?;
        }
        Ok(value)
    }

    /// Records a run that took its lock, before it touches any file.
    pub fn begin(&self, b: &Begin<'_>) -> Result<(), JournalError> {
        let files = serde_json::to_string(b.files).unwrap_or_default();
        let inputs = serde_json::to_string(b.inputs).unwrap_or_default();
        let now = ms(SystemTime::now());
        self.write(Sync::Now, |c| {
            let tx = c.transaction()?;
            tx.prepare_cached(
                "INSERT INTO deploys (id, target, op, origin, started_ms, stage, files,
                                      cert_sha256, prev_sha256, inputs, no_reload, host)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'locked', ?6, ?7, ?8, ?9, ?10, ?11)"
            )?
            .execute(
                params![
                    b.id,
                    b.target,
                    b.op,
                    b.origin,
                    now,
                    files,
                    b.cert_sha256,
                    b.prev_sha256,
                    inputs,
                    b.no_reload,
                    b.host
                ],
            )?;
            tx.prepare_cached(
                "INSERT INTO stages (deploy_id, at_ms, stage, message) VALUES (?1, ?2, 'locked', '')"
            )?
            .execute(
                params![b.id, now],
            )?;
            tx.commit()
        })
    }

    /// Records that run `id` reached `stage`, on disk as `sync` says.
    pub fn stage(
        &self,
        id: &str,
        stage: &str,
        message: &str,
        sync: Sync,
    ) -> Result<(), JournalError> {
        let now = ms(SystemTime::now());
        self.write(sync, |c| {
            let tx = c.transaction()?;
            tx.prepare_cached(
                "INSERT INTO stages (deploy_id, at_ms, stage, message) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![id, now, stage, message])?;
            tx.prepare_cached("UPDATE deploys SET stage = ?2 WHERE id = ?1")?
                .execute(params![id, stage])?;
            tx.commit()
        })
    }

    /// Closes run `id` with its outcome.
    pub fn finish(&self, id: &str, f: &Finish<'_>) -> Result<(), JournalError> {
        let now = ms(f.finished);
        self.write(Sync::Now, |c| {
            let tx = c.transaction()?;
            tx.prepare_cached(
                "INSERT INTO stages (deploy_id, at_ms, stage, message) VALUES (?1, ?2, 'done', ?3)",
            )?
            .execute(params![id, now, f.outcome])?;
            tx.prepare_cached(
                "UPDATE deploys SET stage = 'done', finished_ms = ?2, outcome = ?3, error = ?4,
                        verification = ?5, disk_sha256 = ?6, served_sha256 = ?7,
                        recovered = ?8
                 WHERE id = ?1",
            )?
            .execute(params![
                id,
                now,
                f.outcome,
                f.error,
                f.verification,
                f.disk_sha256,
                f.served_sha256,
                f.recovered
            ])?;
            tx.commit()
        })
    }

    /// Marks a finished run as looked at by recovery, its outcome
    /// unchanged: it is never handed to recovery again.
    pub fn settle(&self, id: &str) -> Result<(), JournalError> {
        self.write(Sync::Now, |c| {
            c.prepare_cached("UPDATE deploys SET recovered = 1 WHERE id = ?1")?
                .execute(params![id])
                .map(|_| ())
        })
    }

    /// Records a run that touched no file (rejected input, busy,
    /// unchanged): one closed row, so history shows every request. Nothing
    /// acts on it after a crash, so it is informational ([`Sync::WithNext`]:
    /// kept when the agent is killed, on disk with the next durable write).
    pub fn closed(&self, b: &Begin<'_>, f: &Finish<'_>) -> Result<(), JournalError> {
        let files = serde_json::to_string(b.files).unwrap_or_default();
        let inputs = serde_json::to_string(b.inputs).unwrap_or_default();
        let now = ms(f.finished);
        self.write(Sync::WithNext, |c| {
            c.prepare_cached(
                "INSERT INTO deploys (id, target, op, origin, started_ms, stage, files,
                                      cert_sha256, prev_sha256, inputs, finished_ms, outcome,
                                      error, verification, disk_sha256, served_sha256)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'done', ?6, ?7, ?8, ?9, ?5, ?10, ?11, ?12, ?13, ?14)",
            )?
            .execute(params![
                b.id,
                b.target,
                b.op,
                b.origin,
                now,
                files,
                b.cert_sha256,
                b.prev_sha256,
                inputs,
                f.outcome,
                f.error,
                f.verification,
                f.disk_sha256,
                f.served_sha256
            ])
            .map(|_| ())
        })
    }

    /// Runs recovery must look at, oldest first: those without an outcome
    /// (interrupted by a crash), and those that ended `rollback_failed` and
    /// were not looked at by a recovery yet. Recovery retries the latter
    /// only when nothing has happened to the target since
    /// (`deploy::recover`), and [`Journal::settle`]s them either way.
    pub fn unfinished(&self) -> Result<Vec<Record>, JournalError> {
        self.query(
            "WHERE outcome IS NULL OR (outcome = 'rollback_failed' AND recovered = 0)
             ORDER BY started_ms, id",
            params![],
        )
    }

    /// The newest `limit` runs, of `target` or of every target, newest
    /// first, with their stages.
    pub fn history(&self, target: Option<&str>, limit: u32) -> Result<Vec<Record>, JournalError> {
        let mut records = match target {
            Some(t) => self.query(
                "WHERE target = ?1 ORDER BY started_ms DESC, id DESC LIMIT ?2",
                params![t, limit],
            )?,
            None => self.query("ORDER BY started_ms DESC, id DESC LIMIT ?1", params![limit])?,
        };
        for r in &mut records {
            r.stages = self.stages(&r.id)?;
        }
        Ok(records)
    }

    /// The newest finished run of `target`.
    pub fn last(&self, target: &str) -> Result<Option<Record>, JournalError> {
        Ok(self
            .query(
                "WHERE target = ?1 AND outcome IS NOT NULL AND outcome != 'dry_run'
                 ORDER BY started_ms DESC, id DESC LIMIT 1",
                params![target],
            )?
            .pop())
    }

    /// The newest finished run of every target that has one, in one query
    /// (start-up: status then never asks the journal per target), as
    /// [`Journal::last`] gives each (the stages stay empty).
    pub fn last_of_all(&self) -> Result<HashMap<String, Record>, JournalError> {
        let records = self.query(
            "WHERE rowid IN (
                 SELECT (SELECT d.rowid FROM deploys d
                         WHERE d.target = t.target AND d.outcome IS NOT NULL
                               AND d.outcome != 'dry_run'
                         ORDER BY d.started_ms DESC, d.id DESC LIMIT 1)
                 FROM (SELECT DISTINCT target FROM deploys) t)",
            params![],
        )?;
        // The pages that query read are not needed again soon: give the
        // cache back rather than keep it for the agent's idle life.
        self.with(|c| c.execute_batch("PRAGMA shrink_memory"))?;
        Ok(records.into_iter().map(|r| (r.target.clone(), r)).collect())
    }

    fn stages(&self, id: &str) -> Result<Vec<(SystemTime, String, String)>, JournalError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT at_ms, stage, message FROM stages WHERE deploy_id = ?1 ORDER BY rowid",
            )?;
            st.query_map(params![id], |r| {
                Ok((
                    time(r.get(0)?),
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })?
            .collect()
        })
    }

    fn query(&self, tail: &str, args: impl rusqlite::Params) -> Result<Vec<Record>, JournalError> {
        let sql = format!(
            "SELECT id, target, op, origin, started_ms, stage, files, cert_sha256, prev_sha256,
                    finished_ms, outcome, error, verification, disk_sha256, served_sha256, recovered,
                    no_reload, host
             FROM deploys {tail}"
        );
        let rows: Vec<(Record, String)> = self.with(|c| {
            let mut st = c.prepare(&sql)?;
            st.query_map(args, |r| {
                Ok((
                    Record {
                        id: r.get(0)?,
                        target: r.get(1)?,
                        op: r.get(2)?,
                        origin: r.get(3)?,
                        started: time(r.get(4)?),
                        stage: r.get(5)?,
                        files: Vec::new(),
                        cert_sha256: r.get(7)?,
                        prev_sha256: r.get(8)?,
                        finished: r.get::<_, Option<i64>>(9)?.map(time),
                        outcome: r.get(10)?,
                        error: r.get::<_, Option<String>>(11)?.unwrap_or_default(),
                        verification: r.get::<_, Option<String>>(12)?.unwrap_or_default(),
                        disk_sha256: r.get::<_, Option<String>>(13)?.unwrap_or_default(),
                        served_sha256: r.get::<_, Option<String>>(14)?.unwrap_or_default(),
                        recovered: r.get(15)?,
                        no_reload: r.get(16)?,
                        host: r.get(17)?,
                        stages: Vec::new(),
                    },
                    r.get::<_, String>(6)?,
                ))
            })?
            .collect()
        })?;
        rows.into_iter()
            .map(|(mut rec, files)| {
                rec.files = serde_json::from_str(&files).map_err(|e| JournalError::Corrupt {
                    path: self.path.clone(),
                    detail: format!("deploy {}: files: {e}", rec.id),
                })?;
                Ok(rec)
            })
            .collect()
    }

    /// Whether `id` is recorded (for tests and recovery checks).
    pub fn contains(&self, id: &str) -> Result<bool, JournalError> {
        self.with(|c| {
            c.query_row("SELECT 1 FROM deploys WHERE id = ?1", params![id], |_| {
                Ok(())
            })
            .optional()
            .map(|o| o.is_some())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(n: &str) -> FileRecord {
        FileRecord {
            live: PathBuf::from(format!("/t/{n}")),
            existed: true,
            backup: PathBuf::from(format!("/t/.certctl/backup/web/x/{n}")),
            tmp: PathBuf::from(format!("/t/.certctl-tmp-x-{n}")),
            generation: None,
            created_generation: false,
        }
    }

    fn begin<'a>(id: &'a str, files: &'a [FileRecord]) -> Begin<'a> {
        Begin {
            id,
            target: "web",
            op: "deploy",
            origin: "cli uid=0",
            files,
            cert_sha256: "aa",
            prev_sha256: "bb",
            inputs: &[],
            no_reload: false,
            host: "",
        }
    }

    fn finish(outcome: &str) -> Finish<'_> {
        Finish {
            outcome,
            error: "",
            verification: "unverified",
            disk_sha256: "aa",
            served_sha256: "",
            recovered: false,
            finished: SystemTime::now(),
        }
    }

    #[test]
    fn a_run_is_open_until_finished_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let files = [file("cert.pem"), file("key.pem")];
        {
            let j = Journal::open(dir.path()).unwrap();
            j.begin(&begin("d1", &files)).unwrap();
            j.stage("d1", "staged", "2 temp files", Sync::WithNext)
                .unwrap();
            j.stage("d1", "committed", "", Sync::Now).unwrap();
        }
        let j = Journal::open(dir.path()).unwrap();
        let open = j.unfinished().unwrap();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].stage, "committed");
        assert_eq!(open[0].files, files);
        assert_eq!(open[0].prev_sha256, "bb");
        j.finish("d1", &finish("deployed")).unwrap();
        assert!(j.unfinished().unwrap().is_empty());
        let last = j.last("web").unwrap().unwrap();
        assert_eq!(last.outcome.as_deref(), Some("deployed"));
        let h = j.history(Some("web"), 10).unwrap();
        let stages: Vec<&str> = h[0].stages.iter().map(|(_, s, _)| s.as_str()).collect();
        assert_eq!(stages, ["locked", "staged", "committed", "done"]);
    }

    #[test]
    fn history_is_newest_first_and_limited() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        for i in 0..5 {
            let id = format!("d{i}");
            j.closed(&begin(&id, &[]), &finish("rejected")).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        let h = j.history(None, 3).unwrap();
        let ids: Vec<&str> = h.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["d4", "d3", "d2"]);
        assert!(j.history(Some("other"), 3).unwrap().is_empty());
        assert!(j.contains("d0").unwrap());
    }

    #[test]
    fn the_last_run_of_every_target_is_what_last_says_of_each() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let runs = [
            ("a1", "web", Some("deployed")),
            ("a2", "web", Some("rolled_back")),
            ("a3", "web", Some("dry_run")),
            ("a4", "web", None),
            ("b1", "mail", Some("unchanged")),
            ("c1", "open", None),
        ];
        for (id, target, outcome) in runs {
            let b = Begin {
                target,
                ..begin(id, &[])
            };
            match outcome {
                Some(o) => j.closed(&b, &finish(o)).unwrap(),
                None => j.begin(&b).unwrap(),
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let all = j.last_of_all().unwrap();
        for t in ["web", "mail", "open", "none"] {
            assert_eq!(
                all.get(t).map(|r| r.id.clone()),
                j.last(t).unwrap().map(|r| r.id),
                "{t}"
            );
        }
        assert_eq!(all["web"].id, "a2");
        assert_eq!(all.len(), 2);
    }

    #[test]
    fn a_version_2_journal_gets_the_host_column_and_keeps_its_runs() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Connection::open(dir.path().join("journal.sqlite")).unwrap();
            // Version 2's table: no host column.
            let v2 = SCHEMA.replace(
                "DEFAULT 0, -- deployed with --no-reload (since version 2)\n    host          TEXT NOT NULL DEFAULT ''    -- a remote target's user@host:port; '' for this host (since version 3)",
                "DEFAULT 0 -- deployed with --no-reload (since version 2)",
            );
            assert!(!v2.contains("host"));
            c.execute_batch(&v2).unwrap();
            c.execute(
                "INSERT INTO deploys (id, target, op, origin, started_ms, stage, files,
                                      cert_sha256, prev_sha256, inputs, no_reload)
                 VALUES ('d1', 'web', 'deploy', 'cli', 1, 'committed', '[]', 'aa', 'bb', '[]', 1)",
                [],
            )
            .unwrap();
            c.pragma_update(None, "user_version", 2).unwrap();
        }
        let j = Journal::open(dir.path()).unwrap();
        let open = j.unfinished().unwrap();
        assert_eq!(open.len(), 1);
        // The run was on this host, and keeps what version 2 recorded.
        assert!(open[0].no_reload);
        assert_eq!(open[0].host, "");
        drop(j);
        // Opened again at version 3: nothing more to migrate.
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.unfinished().unwrap().len(), 1);
    }

    #[test]
    fn a_version_1_journal_is_migrated_and_keeps_its_runs() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Connection::open(dir.path().join("journal.sqlite")).unwrap();
            // Version 1's table: no no_reload column.
            let v1 = SCHEMA.replace(
                ",\n    no_reload     INTEGER NOT NULL DEFAULT 0, -- deployed with --no-reload (since version 2)\n    host          TEXT NOT NULL DEFAULT ''    -- a remote target's user@host:port; '' for this host (since version 3)",
                "",
            );
            assert!(!v1.contains("no_reload") && !v1.contains("host"));
            c.execute_batch(&v1).unwrap();
            c.execute(
                "INSERT INTO deploys (id, target, op, origin, started_ms, stage, files,
                                      cert_sha256, prev_sha256, inputs)
                 VALUES ('d1', 'web', 'deploy', 'cli', 1, 'committed', '[]', 'aa', 'bb', '[]')",
                [],
            )
            .unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
        }
        let j = Journal::open(dir.path()).unwrap();
        let open = j.unfinished().unwrap();
        assert_eq!(open.len(), 1);
        assert!(!open[0].no_reload);
        j.begin(&Begin {
            no_reload: true,
            ..begin("d2", &[])
        })
        .unwrap();
        assert!(j.unfinished().unwrap()[1].no_reload);
        assert_eq!(open[0].host, "");
        j.begin(&Begin {
            host: "deploy@edge:22",
            ..begin("d3", &[])
        })
        .unwrap();
        assert_eq!(j.unfinished().unwrap()[2].host, "deploy@edge:22");
    }

    #[test]
    fn a_settled_run_is_never_handed_to_recovery_again() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.begin(&begin("d1", &[])).unwrap();
        j.finish("d1", &finish("rollback_failed")).unwrap();
        assert_eq!(j.unfinished().unwrap().len(), 1);
        j.settle("d1").unwrap();
        assert!(j.unfinished().unwrap().is_empty());
        let last = j.last("web").unwrap().unwrap();
        assert_eq!(last.outcome.as_deref(), Some("rollback_failed"));
    }

    #[test]
    fn a_newer_schema_is_refused_with_a_remedy() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Connection::open(dir.path().join("journal.sqlite")).unwrap();
            c.pragma_update(None, "user_version", 99).unwrap();
        }
        let e = Journal::open(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("schema version 99") && e.contains("move the file aside"),
            "{e}"
        );
    }

    #[test]
    fn informational_rows_wait_for_the_next_durable_write() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.begin(&begin("d1", &[file("cert.pem")])).unwrap();
        assert_eq!(j.wal.syncs(), 1, "a run's start is durable");
        j.stage("d1", "staged", "1 temp file", Sync::WithNext)
            .unwrap();
        assert_eq!(j.wal.syncs(), 1, "an informational row: no fsync");
        // Visible at once (in the WAL), to readers and to recovery.
        assert_eq!(j.unfinished().unwrap()[0].stage, "staged");
        j.finish("d1", &finish("deployed")).unwrap();
        assert_eq!(
            j.wal.syncs(),
            2,
            "the outcome is durable, and the rows before it"
        );
        let h = j.history(Some("web"), 1).unwrap();
        let stages: Vec<&str> = h[0].stages.iter().map(|(_, s, _)| s.as_str()).collect();
        assert_eq!(stages, ["locked", "staged", "done"]);
    }

    #[test]
    fn wal_mode_and_commits_left_to_the_group_commit() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let (mode, sync): (String, i64) = j
            .with(|c| {
                Ok((
                    c.pragma_query_value(None, "journal_mode", |r| r.get(0))?,
                    c.pragma_query_value(None, "synchronous", |r| r.get(0))?,
                ))
            })
            .unwrap();
        assert_eq!(mode, "wal");
        assert_eq!(sync, 1, "synchronous = NORMAL: the group commit fsyncs");
        assert!(
            dir.path().join("journal.sqlite-wal").exists(),
            "the WAL the group commit fsyncs is there from the start"
        );
    }

    #[test]
    fn runs_on_many_threads_share_fsyncs_and_all_are_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let j = std::sync::Arc::new(Journal::open(dir.path()).unwrap());
        let threads: Vec<_> = (0..16)
            .map(|t| {
                let j = j.clone();
                std::thread::spawn(move || {
                    for i in 0..20 {
                        let id = format!("d{t}-{i}");
                        j.begin(&begin(&id, &[file("cert.pem")])).unwrap();
                        j.finish(&id, &finish("deployed")).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(j.history(None, 1000).unwrap().len(), 320);
        assert!(j.unfinished().unwrap().is_empty());
        // At most one fsync per durable write; fewer when they overlap.
        assert!(j.wal.syncs() <= 640, "{}", j.wal.syncs());
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.history(None, 1000).unwrap().len(), 320, "reopened");
    }
}
