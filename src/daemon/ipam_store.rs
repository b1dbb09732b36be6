//! The IPAM state on disk: one redb database, `STATE_DIR/ipam.redb`, holding the last
//! [`Persisted`] state (postcard-encoded) under one key.
//!
//! The control loop saves after every IPAM change and before it sends anything that depends
//! on it, so after a crash (even `kill -9`) the restarted router never forgets a range it
//! gave away or an address it handed out. redb commits are durable (fsync) and atomic.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use mesh::ipam::Persisted;
use redb::{Database, TableDefinition};

const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("ipam");
const KEY: &str = "state";

/// How long to wait for another (exiting) process to let go of the store.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The file name inside the state directory.
pub(crate) const FILE: &str = "ipam.redb";

pub(super) struct Store {
    db: Database,
    path: PathBuf,
}

impl Store {
    /// Opens (or creates) the database and returns what it holds.
    pub(super) fn open(dir: &Path) -> Result<(Store, Option<Persisted>)> {
        let path = dir.join(FILE);
        // A router killed a moment ago may still hold the file lock while its last threads
        // exit: retry for a bounded time.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let db = loop {
            match Database::create(&path) {
                Err(redb::DatabaseError::DatabaseAlreadyOpen)
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => break other,
            }
        };
        let db = db.with_context(|| {
            format!(
                "open the IPAM store {}; if another router uses this state directory, stop it; \
                 if the file is damaged, move it away (the router then starts with no address \
                 space)",
                path.display()
            )
        })?;
        let store = Store { db, path };
        let found = store.load()?;
        Ok((store, found))
    }

    fn load(&self) -> Result<Option<Persisted>> {
        let txn = self.db.begin_read().context("read the IPAM store")?;
        let table = match txn.open_table(TABLE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e).context("read the IPAM store"),
        };
        let Some(bytes) = table.get(KEY).context("read the IPAM store")? else {
            return Ok(None);
        };
        let p = postcard::from_bytes(bytes.value()).with_context(|| {
            format!(
                "the IPAM store {} holds state this version cannot read; move it away to start \
                 without address space",
                self.path.display()
            )
        })?;
        Ok(Some(p))
    }

    /// Replaces the stored state (durable when this returns).
    pub(super) fn save(&self, p: &Persisted) -> Result<()> {
        let bytes = postcard::to_allocvec(p).context("encode IPAM state")?;
        let txn = self.db.begin_write().context("write the IPAM store")?;
        {
            let mut table = txn.open_table(TABLE).context("write the IPAM store")?;
            table
                .insert(KEY, bytes.as_slice())
                .context("write the IPAM store")?;
        }
        txn.commit().context("commit the IPAM store")?;
        Ok(())
    }
}
