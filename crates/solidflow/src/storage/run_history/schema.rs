//! The run-history schema and its migrations.
//!
//! The schema version is SQLite's `PRAGMA user_version`. Version 0 is the schema of the
//! releases before versioning (runs and events only). Each migration moves one version
//! up inside one `BEGIN IMMEDIATE` transaction, so two processes opening an old database
//! at once upgrade it exactly once. A database newer than this build is refused rather
//! than misread.

use rusqlite::{Connection, TransactionBehavior};

/// The schema of the releases before versioning; kept verbatim so a fresh database
/// goes through the same migrations as an old one.
const VERSION_0: &str = "
    CREATE TABLE IF NOT EXISTS runs (
        run_id TEXT PRIMARY KEY, pipeline TEXT NOT NULL, mode TEXT NOT NULL,
        status TEXT NOT NULL, config TEXT NOT NULL, parent_run_id TEXT,
        started_at TEXT NOT NULL, ended_at TEXT);
    CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, step_key TEXT,
        event_type TEXT NOT NULL, timestamp TEXT NOT NULL, body TEXT NOT NULL);
    CREATE INDEX IF NOT EXISTS events_by_run ON events (run_id, id);";

/// Migration `i` moves the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: lineage, tags, liveness of the run's process, and steps reused from a parent.
    "ALTER TABLE runs ADD COLUMN root_run_id TEXT;
     ALTER TABLE runs ADD COLUMN host TEXT;
     ALTER TABLE runs ADD COLUMN pid INTEGER;
     ALTER TABLE runs ADD COLUMN process_start TEXT;
     ALTER TABLE runs ADD COLUMN heartbeat_at TEXT;
     UPDATE runs SET root_run_id = parent_run_id WHERE parent_run_id IS NOT NULL;
     CREATE INDEX runs_by_start ON runs (started_at);
     CREATE INDEX runs_by_status ON runs (status);
     CREATE TABLE run_tags (
        run_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
        PRIMARY KEY (run_id, key));
     CREATE INDEX run_tags_by_tag ON run_tags (key, value);
     CREATE TABLE reused_steps (
        run_id TEXT NOT NULL, step_key TEXT NOT NULL, source_run_id TEXT NOT NULL,
        PRIMARY KEY (run_id, step_key));
     CREATE INDEX events_by_type ON events (run_id, event_type);",
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Why a database cannot be brought to [`SCHEMA_VERSION`].
#[derive(Debug)]
pub(super) enum MigrateError {
    /// SQLite failed.
    Sqlite(rusqlite::Error),
    /// The database was written by a newer build.
    TooNew(u32),
}

impl From<rusqlite::Error> for MigrateError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Sqlite(e)
    }
}

fn version(conn: &Connection) -> rusqlite::Result<u32> {
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
}

/// Creates or upgrades the schema in place.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), MigrateError> {
    if version(conn)? == SCHEMA_VERSION {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let from = version(&tx)?;
    if from > SCHEMA_VERSION {
        return Err(MigrateError::TooNew(from));
    }
    if from == 0 {
        tx.execute_batch(VERSION_0)?;
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(from as usize) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as u32 + 1)?;
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_database_gets_the_latest_version_and_migrating_twice_is_a_no_op() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        assert_eq!(version(&conn).unwrap(), SCHEMA_VERSION);
        migrate(&mut conn).unwrap();
        assert_eq!(version(&conn).unwrap(), SCHEMA_VERSION);
    }

    #[test]
    fn a_newer_database_is_refused() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        assert!(matches!(
            migrate(&mut conn),
            Err(MigrateError::TooNew(v)) if v == SCHEMA_VERSION + 1
        ));
    }
}
