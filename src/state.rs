//! The state store: what a server keeps across restarts. Address leases of
//! TLS keys, bans, the peers added at run time (`svpnctl peer add`), and
//! invitations (`svpnctl invite`).
//!
//! [`StateStore`] is the whole interface the daemon uses, so that another
//! backend (etcd, for a cluster) can sit behind it later. The embedded
//! default is [`SqliteStore`]: one SQLite file, `state.db` in `state_dir`,
//! readable with the `sqlite3` tool. Its schema is versioned with
//! `PRAGMA user_version` and migrated forward at open; every write is one
//! transaction. A file that is not a database, or one from a newer
//! simplevpnd, is refused at open with one line naming the file: never
//! reset.
//!
//! Tables (times are Unix seconds, keys base64 as `simplevpnd pubkey`
//! prints them, addresses and networks in their usual text form):
//!
//! ```text
//! leases(key TEXT PRIMARY KEY, address TEXT UNIQUE, expires INTEGER,
//!        address6 TEXT UNIQUE (NULL: none; schema version 2))
//! bans(kind TEXT 'key'|'remote', who TEXT, until INTEGER, PRIMARY KEY(kind, who),
//!      reason TEXT ('': not recorded, a ban from before schema version 4))
//! peers(key TEXT PRIMARY KEY, name TEXT UNIQUE, address TEXT UNIQUE,
//!       routes TEXT (space-separated CIDRs), added INTEGER,
//!       address6 TEXT UNIQUE (NULL: none; schema version 2))
//! invites(hash TEXT PRIMARY KEY (SHA-256 of the secret, hex), name TEXT,
//!         address TEXT, created INTEGER, expires INTEGER,
//!         state TEXT 'open'|'used'|'revoked' (schema version 3; one open
//!         invitation per name))
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
#[cfg(feature = "server")]
use rusqlite::{params, Connection, OpenFlags, TransactionBehavior};

use crate::config::PeerSection;
use crate::join::JoinRefusal;
use crate::keys::PublicKey;
use crate::limits::STORE_BUSY_TIMEOUT;

/// How long an invitation stays listed after it expired (used, revoked or
/// not), before `expire` deletes it.
pub const INVITE_HISTORY: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// The database's file name inside `state_dir`.
pub const STATE_FILE: &str = "state.db";

/// Who a ban refuses: a TLS client by its key, an original-protocol client
/// by its remote IP address (it has no other identity).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Banned {
    Key(PublicKey),
    Remote(IpAddr),
}

impl std::fmt::Display for Banned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Banned::Key(key) => write!(f, "key {key}"),
            Banned::Remote(ip) => write!(f, "remote {ip}"),
        }
    }
}

impl Banned {
    /// The `kind` column of the bans table.
    fn kind(&self) -> &'static str {
        match self {
            Banned::Key(_) => "key",
            Banned::Remote(_) => "remote",
        }
    }

    /// The `who` column of the bans table.
    fn who(&self) -> String {
        match self {
            Banned::Key(key) => key.to_string(),
            Banned::Remote(ip) => ip.to_string(),
        }
    }
}

/// A TLS key's claim on a tunnel address (and its IPv6 address, on a
/// server with `network6`) until `expires`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub key: PublicKey,
    pub address: Ipv4Addr,
    pub address6: Option<Ipv6Addr>,
    pub expires: SystemTime,
}

/// A ban until `until`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ban {
    pub who: Banned,
    pub until: SystemTime,
    /// Why (who kicked and banned, and their words); empty when not
    /// recorded (a ban written by an older simplevpnd).
    pub reason: String,
}

/// A ban reason that cannot be kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BanReasonError {
    #[error("ban reason is {0} bytes, at most {max} allowed", max = crate::limits::MAX_BAN_REASON)]
    TooLong(usize),
    #[error("ban reason has a control character (only printable text is allowed)")]
    NotPrintable,
}

/// Checks the text given as a ban's reason (`svpnctl kick --ban --reason`):
/// at most [`crate::limits::MAX_BAN_REASON`] bytes, no control characters.
pub fn check_ban_reason(text: &str) -> Result<(), BanReasonError> {
    if text.len() > crate::limits::MAX_BAN_REASON {
        return Err(BanReasonError::TooLong(text.len()));
    }
    if text.chars().any(char::is_control) {
        return Err(BanReasonError::NotPrintable);
    }
    Ok(())
}

/// Where an invitation stands. Expired is not a state of its own: an open
/// one past its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InviteState {
    Open,
    Used,
    Revoked,
}

impl InviteState {
    /// Its name in the store and in `svpnctl invite list`.
    pub fn as_str(self) -> &'static str {
        match self {
            InviteState::Open => "open",
            InviteState::Used => "used",
            InviteState::Revoked => "revoked",
        }
    }

    pub fn parse(text: &str) -> Option<InviteState> {
        match text {
            "open" => Some(InviteState::Open),
            "used" => Some(InviteState::Used),
            "revoked" => Some(InviteState::Revoked),
            _ => None,
        }
    }
}

/// An invitation as the server keeps it: never the secret, only its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invite {
    /// SHA-256 of the secret, hex ([`crate::join::Secret::hash`]).
    pub hash: String,
    /// The name the joining key is allowed under.
    pub name: String,
    /// The address fixed for it, if any.
    pub address: Option<Ipv4Addr>,
    pub created: SystemTime,
    pub expires: SystemTime,
    pub state: InviteState,
}

impl Invite {
    /// Whether `request_name` may redeem this invitation at `now`: the
    /// state it changes to, or why not.
    pub fn redeem(&self, request_name: &str, now: SystemTime) -> Result<(), JoinRefusal> {
        if self.name != request_name {
            return Err(JoinRefusal::Unknown);
        }
        match self.state {
            InviteState::Used => Err(JoinRefusal::Used),
            InviteState::Revoked => Err(JoinRefusal::Revoked),
            InviteState::Open if self.expires <= now => Err(JoinRefusal::Expired),
            InviteState::Open => Ok(()),
        }
    }

    /// What `svpnctl invite list` shows: open, expired, used or revoked.
    pub fn state_at(&self, now: SystemTime) -> &'static str {
        match self.state {
            InviteState::Open if self.expires <= now => "expired",
            state => state.as_str(),
        }
    }
}

/// Why the store failed. Each is one line.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database {path}: {problem}")]
    Open { path: PathBuf, problem: String },
    #[error(
        "state database {path}: schema version {found} is newer than this simplevpnd knows \
         ({known}); run the newer simplevpnd, or move the file away to start afresh"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[cfg(feature = "server")]
    #[error("state database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("state database {path}: table {table}: {problem}")]
    Corrupt {
        path: PathBuf,
        table: &'static str,
        problem: String,
    },
    #[error("an open invitation for {0:?} exists already (svpnctl invite revoke {0} first)")]
    InviteExists(String),
}

/// What the server keeps across restarts. Reads return what has not
/// expired at `now`; writes replace the row of the same key.
pub trait StateStore: Send + Sync {
    /// Every lease that has not expired at `now`.
    fn leases(&self, now: SystemTime) -> Result<Vec<Lease>, StoreError>;
    /// Stores `lease`, replacing the key's previous one and any other key's
    /// lease of the same address.
    fn put_lease(&self, lease: &Lease) -> Result<(), StoreError>;
    /// Every ban still in force at `now`.
    fn bans(&self, now: SystemTime) -> Result<Vec<Ban>, StoreError>;
    fn put_ban(&self, ban: &Ban) -> Result<(), StoreError>;
    /// Forgets the ban on `who`; false if there was none.
    fn remove_ban(&self, who: &Banned) -> Result<bool, StoreError>;
    /// The peers added at run time, in the order they were added.
    fn peers(&self) -> Result<Vec<PeerSection>, StoreError>;
    /// Stores a peer added at run time (replacing one with the same key).
    fn put_peer(&self, peer: &PeerSection) -> Result<(), StoreError>;
    /// Forgets a peer added at run time; false if it was not stored.
    fn remove_peer(&self, key: &PublicKey) -> Result<bool, StoreError>;
    /// Deletes leases and bans expired at `now`, and invitations expired
    /// [`INVITE_HISTORY`] before; returns how many.
    fn expire(&self, now: SystemTime) -> Result<usize, StoreError>;
    /// Stores a new invitation; refused if an open one of the same name has
    /// not expired at `now` (an expired one is replaced).
    fn put_invite(&self, invite: &Invite, now: SystemTime) -> Result<(), StoreError>;
    /// Every invitation kept, oldest first.
    fn invites(&self) -> Result<Vec<Invite>, StoreError>;
    /// Revokes the open invitation named `name`; false if there is none.
    fn revoke_invite(&self, name: &str) -> Result<bool, StoreError>;
    /// Marks the invitation with `hash` used if `name` may redeem it at
    /// `now`, in one transaction: of two redeeming at once, one wins.
    fn redeem_invite(
        &self,
        hash: &str,
        name: &str,
        now: SystemTime,
    ) -> Result<Result<Invite, JoinRefusal>, StoreError>;
    /// Opens a redeemed invitation again (its peer could not be added).
    fn unredeem_invite(&self, hash: &str) -> Result<(), StoreError>;
}

#[cfg(feature = "server")]
/// The schema, one migration per version: `MIGRATIONS[i]` takes
/// `user_version` i to i + 1. Append; never edit a released step.
const MIGRATIONS: &[&str] = &[
    // 1: leases, bans, peers added at run time.
    "CREATE TABLE leases (
        key TEXT PRIMARY KEY NOT NULL,
        address TEXT NOT NULL UNIQUE,
        expires INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE bans (
        kind TEXT NOT NULL CHECK (kind IN ('key', 'remote')),
        who TEXT NOT NULL,
        until INTEGER NOT NULL,
        PRIMARY KEY (kind, who)
    ) STRICT;
    CREATE TABLE peers (
        key TEXT PRIMARY KEY NOT NULL,
        name TEXT UNIQUE,
        address TEXT UNIQUE,
        routes TEXT NOT NULL DEFAULT '',
        added INTEGER NOT NULL
    ) STRICT;",
    // 2: IPv6 inside the tunnel: the IPv6 address leased with the IPv4 one,
    // and the one fixed for a peer added live.
    "ALTER TABLE leases ADD COLUMN address6 TEXT;
    CREATE UNIQUE INDEX leases_address6 ON leases (address6);
    ALTER TABLE peers ADD COLUMN address6 TEXT;
    CREATE UNIQUE INDEX peers_address6 ON peers (address6);",
    // 3: invitations (svpnctl invite): the secret's hash, never the secret.
    "CREATE TABLE invites (
        hash TEXT PRIMARY KEY NOT NULL,
        name TEXT NOT NULL,
        address TEXT,
        created INTEGER NOT NULL,
        expires INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('open', 'used', 'revoked'))
    ) STRICT;
    CREATE UNIQUE INDEX invites_open_name ON invites (name) WHERE state = 'open';",
    // 4: why each ban was made (svpnctl bans); older bans have none.
    "ALTER TABLE bans ADD COLUMN reason TEXT NOT NULL DEFAULT '';",
];

#[cfg(feature = "server")]
/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

#[cfg(feature = "server")]
/// The SQLite state store.
pub struct SqliteStore {
    path: PathBuf,
    connection: Mutex<Connection>,
}

#[cfg(feature = "server")]
fn secs(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs().min(i64::MAX as u64) as i64)
}

#[cfg(feature = "server")]
/// Seconds rounded up: a ban or lease never ends before it should.
fn secs_up(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| {
        let up = d.as_secs() + u64::from(d.subsec_nanos() > 0);
        up.min(i64::MAX as u64) as i64
    })
}

#[cfg(feature = "server")]
fn time(secs: i64) -> SystemTime {
    crate::wallclock::from_unix_secs(secs.max(0) as u64)
}

#[cfg(feature = "server")]
impl SqliteStore {
    /// Opens (creating if missing) `dir`/state.db and migrates it to
    /// [`SCHEMA_VERSION`]. Fails, without touching the file, if it is not a
    /// database or has a newer schema; fails if it cannot be written.
    pub fn open_dir(dir: &Path) -> Result<SqliteStore, StoreError> {
        SqliteStore::open(&dir.join(STATE_FILE))
    }

    /// Opens the database file `path` (see [`SqliteStore::open_dir`]).
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let open_err = |problem: String| StoreError::Open {
            path: path.to_path_buf(),
            problem,
        };
        let connection = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| open_err(e.to_string()))?;
        connection
            .busy_timeout(STORE_BUSY_TIMEOUT)
            .map_err(|e| open_err(e.to_string()))?;
        // The first read of the file: a file that is not a database fails here.
        let mode: String = connection
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(|e| open_err(e.to_string()))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(open_err(format!(
                "cannot use the write-ahead log (journal mode {mode})"
            )));
        }
        // WAL with NORMAL: a commit does not wait for fsync; a power cut may
        // lose the last commits, never corrupt the file.
        connection
            .execute_batch("PRAGMA synchronous = NORMAL")
            .map_err(|e| open_err(e.to_string()))?;
        let store = SqliteStore {
            path: path.to_path_buf(),
            connection: Mutex::new(connection),
        };
        store.migrate()?;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version of the file.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        let connection = self.lock();
        connection
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(|e| self.sqlite(e))
    }

    /// Applies the missing migrations in one write transaction; this is
    /// also where an unwritable file is found.
    fn migrate(&self) -> Result<(), StoreError> {
        self.write(|tx| {
            let found: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
            if found > SCHEMA_VERSION {
                return Ok(Err(StoreError::TooNew {
                    path: self.path.clone(),
                    found,
                    known: SCHEMA_VERSION,
                }));
            }
            for step in &MIGRATIONS[found.max(0) as usize..] {
                tx.execute_batch(step)?;
            }
            tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
            Ok(Ok(()))
        })?
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic inside a transaction rolls it back when the transaction
        // drops: the connection is usable.
        self.connection.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sqlite(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn corrupt(&self, table: &'static str, problem: String) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            table,
            problem,
        }
    }

    /// Runs `f` in one IMMEDIATE transaction (the write lock is taken at
    /// the start, so concurrent writers wait for each other instead of
    /// failing half-way) and commits it.
    fn write<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut connection = self.lock();
        let tx = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.sqlite(e))?;
        let value = f(&tx).map_err(|e| self.sqlite(e))?;
        tx.commit().map_err(|e| self.sqlite(e))?;
        Ok(value)
    }
}

#[cfg(feature = "server")]
impl StateStore for SqliteStore {
    fn leases(&self, now: SystemTime) -> Result<Vec<Lease>, StoreError> {
        let connection = self.lock();
        type Row = (String, String, i64, Option<String>);
        let rows: Vec<Row> = connection
            .prepare(
                "SELECT key, address, expires, address6 FROM leases WHERE expires > ?1 ORDER BY key",
            )
            .and_then(|mut stmt| {
                stmt.query_map([secs_up(now)], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })?
                .collect()
            })
            .map_err(|e| self.sqlite(e))?;
        rows.into_iter()
            .map(|(key, address, expires, address6)| {
                Ok(Lease {
                    key: key
                        .parse()
                        .map_err(|e| self.corrupt("leases", format!("{e}")))?,
                    address: address.parse().map_err(|_| {
                        self.corrupt("leases", format!("{address:?} is no address"))
                    })?,
                    address6: address6
                        .map(|a| {
                            a.parse().map_err(|_| {
                                self.corrupt("leases", format!("{a:?} is no IPv6 address"))
                            })
                        })
                        .transpose()?,
                    expires: time(expires),
                })
            })
            .collect()
    }

    fn put_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        let (key, address) = (lease.key.to_string(), lease.address.to_string());
        let address6 = lease.address6.map(|a| a.to_string());
        self.write(|tx| {
            tx.execute(
                "DELETE FROM leases WHERE (address = ?1 OR address6 = ?3) AND key <> ?2",
                params![address, key, address6],
            )?;
            tx.execute(
                "INSERT INTO leases (key, address, expires, address6) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (key) DO UPDATE SET address = excluded.address,
                     expires = excluded.expires, address6 = excluded.address6",
                params![key, address, secs_up(lease.expires), address6],
            )?;
            Ok(())
        })
    }

    fn bans(&self, now: SystemTime) -> Result<Vec<Ban>, StoreError> {
        let connection = self.lock();
        let rows: Vec<(String, String, i64, String)> = connection
            .prepare(
                "SELECT kind, who, until, reason FROM bans WHERE until > ?1 ORDER BY kind, who",
            )
            .and_then(|mut stmt| {
                stmt.query_map([secs_up(now)], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })?
                .collect()
            })
            .map_err(|e| self.sqlite(e))?;
        rows.into_iter()
            .map(|(kind, who, until, reason)| {
                let bad = || self.corrupt("bans", format!("{kind} {who:?}"));
                let who = match kind.as_str() {
                    "key" => Banned::Key(who.parse().map_err(|_| bad())?),
                    "remote" => Banned::Remote(who.parse().map_err(|_| bad())?),
                    _ => return Err(bad()),
                };
                Ok(Ban {
                    who,
                    until: time(until),
                    reason,
                })
            })
            .collect()
    }

    fn put_ban(&self, ban: &Ban) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO bans (kind, who, until, reason) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (kind, who) DO UPDATE SET until = excluded.until,
                     reason = excluded.reason",
                params![
                    ban.who.kind(),
                    ban.who.who(),
                    secs_up(ban.until),
                    ban.reason
                ],
            )?;
            Ok(())
        })
    }

    fn remove_ban(&self, who: &Banned) -> Result<bool, StoreError> {
        self.write(|tx| {
            let removed = tx.execute(
                "DELETE FROM bans WHERE kind = ?1 AND who = ?2",
                params![who.kind(), who.who()],
            )?;
            Ok(removed > 0)
        })
    }

    fn peers(&self) -> Result<Vec<PeerSection>, StoreError> {
        type Row = (
            String,
            Option<String>,
            Option<String>,
            String,
            Option<String>,
        );
        let connection = self.lock();
        let rows: Vec<Row> = connection
            .prepare("SELECT key, name, address, routes, address6 FROM peers ORDER BY added, key")
            .and_then(|mut stmt| {
                stmt.query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?
                .collect()
            })
            .map_err(|e| self.sqlite(e))?;
        rows.into_iter()
            .map(|(key, name, address, routes, address6)| {
                let bad = |what: String| self.corrupt("peers", what);
                Ok(PeerSection {
                    client_to_client: None,
                    key: key.parse().map_err(|e| bad(format!("{e}")))?,
                    name,
                    address: address
                        .map(|a| a.parse().map_err(|_| bad(format!("{a:?} is no address"))))
                        .transpose()?,
                    address6: address6
                        .map(|a| {
                            a.parse()
                                .map_err(|_| bad(format!("{a:?} is no IPv6 address")))
                        })
                        .transpose()?,
                    routes: routes
                        .split_whitespace()
                        .map(|r| {
                            r.parse::<IpNet>()
                                .map_err(|_| bad(format!("{r:?} is no network")))
                        })
                        .collect::<Result<_, _>>()?,
                })
            })
            .collect()
    }

    fn put_peer(&self, peer: &PeerSection) -> Result<(), StoreError> {
        let routes: Vec<String> = peer.routes.iter().map(ToString::to_string).collect();
        self.write(|tx| {
            tx.execute(
                "INSERT INTO peers (key, name, address, routes, added, address6)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (key) DO UPDATE SET name = excluded.name,
                     address = excluded.address, routes = excluded.routes,
                     address6 = excluded.address6",
                params![
                    peer.key.to_string(),
                    peer.name,
                    peer.address.map(|a| a.to_string()),
                    routes.join(" "),
                    secs(SystemTime::now()),
                    peer.address6.map(|a| a.to_string()),
                ],
            )?;
            Ok(())
        })
    }

    fn remove_peer(&self, key: &PublicKey) -> Result<bool, StoreError> {
        self.write(|tx| {
            let removed = tx.execute("DELETE FROM peers WHERE key = ?1", [key.to_string()])?;
            Ok(removed > 0)
        })
    }

    fn expire(&self, now: SystemTime) -> Result<usize, StoreError> {
        let now = secs_up(now);
        self.write(|tx| {
            let leases = tx.execute("DELETE FROM leases WHERE expires <= ?1", [now])?;
            let bans = tx.execute("DELETE FROM bans WHERE until <= ?1", [now])?;
            // Invitations are listed for a while after they end, then go.
            let invites = tx.execute(
                "DELETE FROM invites WHERE expires <= ?1",
                [now.saturating_sub(INVITE_HISTORY.as_secs() as i64)],
            )?;
            Ok(leases + bans + invites)
        })
    }

    fn put_invite(&self, invite: &Invite, now: SystemTime) -> Result<(), StoreError> {
        let inserted = self.write(|tx| {
            tx.execute(
                "DELETE FROM invites WHERE name = ?1 AND state = 'open' AND expires <= ?2",
                params![invite.name, secs(now)],
            )?;
            tx.execute(
                "INSERT INTO invites (hash, name, address, created, expires, state)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
                params![
                    invite.hash,
                    invite.name,
                    invite.address.map(|a| a.to_string()),
                    secs(invite.created),
                    secs_up(invite.expires),
                    invite.state.as_str(),
                ],
            )
        })?;
        match inserted {
            0 => Err(StoreError::InviteExists(invite.name.clone())),
            _ => Ok(()),
        }
    }

    fn invites(&self) -> Result<Vec<Invite>, StoreError> {
        type Row = (String, String, Option<String>, i64, i64, String);
        let connection = self.lock();
        let rows: Vec<Row> = connection
            .prepare(
                "SELECT hash, name, address, created, expires, state FROM invites
                 ORDER BY created, name",
            )
            .and_then(|mut stmt| {
                stmt.query_map([], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                })?
                .collect()
            })
            .map_err(|e| self.sqlite(e))?;
        rows.into_iter()
            .map(|(hash, name, address, created, expires, state)| {
                let bad = |what: String| self.corrupt("invites", what);
                Ok(Invite {
                    hash,
                    name,
                    address: address
                        .map(|a| a.parse().map_err(|_| bad(format!("{a:?} is no address"))))
                        .transpose()?,
                    created: time(created),
                    expires: time(expires),
                    state: InviteState::parse(&state)
                        .ok_or_else(|| bad(format!("{state:?} is no state")))?,
                })
            })
            .collect()
    }

    fn revoke_invite(&self, name: &str) -> Result<bool, StoreError> {
        self.write(|tx| {
            let revoked = tx.execute(
                "UPDATE invites SET state = 'revoked' WHERE name = ?1 AND state = 'open'",
                [name],
            )?;
            Ok(revoked > 0)
        })
    }

    fn redeem_invite(
        &self,
        hash: &str,
        name: &str,
        now: SystemTime,
    ) -> Result<Result<Invite, JoinRefusal>, StoreError> {
        // Read and marked in one IMMEDIATE transaction: a second redeemer
        // waits for the write lock and then reads "used".
        let found = self.write(|tx| {
            let row = tx
                .query_row(
                    "SELECT name, address, created, expires, state FROM invites WHERE hash = ?1",
                    [hash],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, Option<String>>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, i64>(3)?,
                            r.get::<_, String>(4)?,
                        ))
                    },
                )
                .map(Some)
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(e),
                })?;
            let Some((stored_name, address, created, expires, state)) = row else {
                return Ok(None);
            };
            let invite = (|| {
                Some(Invite {
                    hash: hash.to_string(),
                    name: stored_name,
                    address: address.map(|a| a.parse()).transpose().ok()?,
                    created: time(created),
                    expires: time(expires),
                    state: InviteState::parse(&state)?,
                })
            })();
            let Some(invite) = invite else {
                return Ok(Some(Err(())));
            };
            if invite.redeem(name, now).is_ok() {
                tx.execute("UPDATE invites SET state = 'used' WHERE hash = ?1", [hash])?;
            }
            Ok(Some(Ok(invite)))
        })?;
        match found {
            None => Ok(Err(JoinRefusal::Unknown)),
            Some(Err(())) => Err(self.corrupt("invites", format!("row {hash}"))),
            Some(Ok(invite)) => Ok(invite.redeem(name, now).map(|()| invite)),
        }
    }

    fn unredeem_invite(&self, hash: &str) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE invites SET state = 'open' WHERE hash = ?1 AND state = 'used'",
                [hash],
            )?;
            Ok(())
        })
    }
}

#[cfg(all(test, feature = "server"))]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("svstate-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    fn key(n: u8) -> PublicKey {
        PublicKey::from_raw(&[n; 32]).expect("key")
    }

    #[test]
    fn an_empty_file_is_migrated_and_reopened_as_is() {
        let dir = dir("migrate");
        let store = SqliteStore::open_dir(&dir).expect("open");
        assert_eq!(store.schema_version().expect("version"), SCHEMA_VERSION);
        let later = SystemTime::now() + Duration::from_secs(3600);
        let lease = Lease {
            key: key(1),
            address: Ipv4Addr::new(198, 19, 0, 5),
            address6: Some("2001:2:0:100::5".parse().expect("v6")),
            expires: later,
        };
        store.put_lease(&lease).expect("lease");
        drop(store);
        // An existing empty file (as `touch` makes) is a new database too.
        let touched = dir.join("touched.db");
        std::fs::write(&touched, b"").expect("touch");
        let fresh = SqliteStore::open(&touched).expect("open an empty file");
        assert_eq!(fresh.schema_version().expect("version"), SCHEMA_VERSION);

        let again = SqliteStore::open_dir(&dir).expect("reopen");
        let leases = again.leases(SystemTime::now()).expect("leases");
        assert_eq!(leases.len(), 1);
        assert_eq!(leases[0].address, lease.address);
        assert_eq!(leases[0].address6, lease.address6);
        assert_eq!(leases[0].key, lease.key);
        assert!(leases[0].expires >= later - Duration::from_secs(1));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_version_3_database_opens_and_its_bans_have_no_reason() {
        let dir = dir("v3");
        let path = dir.join("state.db");
        let until = SystemTime::now() + Duration::from_secs(3600);
        {
            // A database as simplevpnd wrote it at schema version 3.
            let old = Connection::open(&path).expect("create");
            for step in &MIGRATIONS[..3] {
                old.execute_batch(step).expect("migration");
            }
            old.execute_batch("PRAGMA user_version = 3")
                .expect("version");
            old.execute(
                "INSERT INTO bans (kind, who, until) VALUES ('remote', '198.18.1.9', ?1)",
                [secs_up(until)],
            )
            .expect("old ban");
        }
        let store = SqliteStore::open(&path).expect("open a v3 database");
        assert_eq!(store.schema_version().expect("version"), SCHEMA_VERSION);
        let bans = store.bans(SystemTime::now()).expect("bans");
        assert_eq!(bans.len(), 1);
        assert_eq!(
            bans[0].who,
            Banned::Remote("198.18.1.9".parse().expect("ip"))
        );
        assert_eq!(bans[0].reason, "");
        // A new ban on the same one records its reason.
        store
            .put_ban(&Ban {
                reason: "kicked by uid 0".into(),
                ..bans[0].clone()
            })
            .expect("ban");
        let bans = store.bans(SystemTime::now()).expect("bans");
        assert_eq!(bans[0].reason, "kicked by uid 0");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn ban_reasons_are_short_printable_text() {
        assert_eq!(check_ban_reason(""), Ok(()));
        assert_eq!(check_ban_reason("spam, 3rd time — bye"), Ok(()));
        let long = "x".repeat(crate::limits::MAX_BAN_REASON + 1);
        assert_eq!(check_ban_reason(&long), Err(BanReasonError::TooLong(201)));
        assert_eq!(
            check_ban_reason(&long[1..]),
            Ok(()),
            "exactly the limit is kept"
        );
        assert_eq!(
            check_ban_reason("two\nlines"),
            Err(BanReasonError::NotPrintable)
        );
    }

    #[test]
    fn expired_leases_and_bans_are_not_returned_and_are_deleted() {
        let dir = dir("expire");
        let store = SqliteStore::open_dir(&dir).expect("open");
        let now = SystemTime::now();
        let (past, future) = (now - Duration::from_secs(10), now + Duration::from_secs(60));
        for (n, expires) in [(1, past), (2, future)] {
            store
                .put_lease(&Lease {
                    key: key(n),
                    address: Ipv4Addr::new(198, 19, 0, n + 1),
                    address6: None,
                    expires,
                })
                .expect("lease");
        }
        let remote = Banned::Remote("198.18.1.2".parse().expect("ip"));
        store
            .put_ban(&Ban {
                who: remote.clone(),
                until: past,
                reason: String::new(),
            })
            .expect("ban");
        store
            .put_ban(&Ban {
                who: Banned::Key(key(3)),
                until: future,
                reason: "kicked by uid 0: spam".into(),
            })
            .expect("ban");
        let leases = store.leases(now).expect("leases");
        assert_eq!(leases.iter().map(|l| l.key).collect::<Vec<_>>(), [key(2)]);
        let bans = store.bans(now).expect("bans");
        assert_eq!(bans.len(), 1);
        assert_eq!(bans[0].who, Banned::Key(key(3)));
        assert_eq!(bans[0].reason, "kicked by uid 0: spam");
        // The future ones expire later.
        assert!(store.leases(future).expect("leases").is_empty());
        assert_eq!(store.expire(now).expect("expire"), 2);
        assert_eq!(store.expire(future).expect("expire"), 2);
        assert!(store.bans(past).expect("bans").is_empty());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn an_address_is_leased_to_one_key_at_a_time() {
        let dir = dir("onekey");
        let store = SqliteStore::open_dir(&dir).expect("open");
        let later = SystemTime::now() + Duration::from_secs(60);
        let address = Ipv4Addr::new(198, 19, 0, 9);
        for n in [1, 2] {
            store
                .put_lease(&Lease {
                    key: key(n),
                    address,
                    address6: None,
                    expires: later,
                })
                .expect("lease");
        }
        let leases = store.leases(SystemTime::now()).expect("leases");
        assert_eq!(leases.len(), 1);
        assert_eq!(leases[0].key, key(2));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn peers_added_live_round_trip() {
        let dir = dir("peers");
        let store = SqliteStore::open_dir(&dir).expect("open");
        let peer = PeerSection {
            client_to_client: None,
            key: key(7),
            name: Some("laptop".into()),
            address: Some(Ipv4Addr::new(198, 19, 0, 70)),
            address6: Some("2001:2:0:100::70".parse().expect("v6")),
            routes: vec!["198.18.201.0/24".parse().expect("net")],
        };
        store.put_peer(&peer).expect("put");
        let bare = PeerSection {
            client_to_client: None,
            key: key(8),
            name: None,
            address: None,
            address6: None,
            routes: Vec::new(),
        };
        store.put_peer(&bare).expect("put");
        assert_eq!(store.peers().expect("peers"), vec![peer.clone(), bare]);
        assert!(store.remove_peer(&key(8)).expect("remove"));
        assert!(!store.remove_peer(&key(8)).expect("remove again"));
        assert_eq!(store.peers().expect("peers"), vec![peer]);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn invitations_are_redeemed_once_listed_and_revoked() {
        let dir = dir("invites");
        let store = SqliteStore::open_dir(&dir).expect("open");
        let now = SystemTime::now();
        let invite = |hash: &str, name: &str, expires| Invite {
            hash: hash.into(),
            name: name.into(),
            address: Some(Ipv4Addr::new(198, 19, 0, 80)),
            created: now,
            expires,
            state: InviteState::Open,
        };
        let later = now + Duration::from_secs(3600);
        store
            .put_invite(&invite("aa", "laptop", later), now)
            .expect("put");
        // One open invitation per name.
        let twice = store.put_invite(&invite("bb", "laptop", later), now);
        assert!(matches!(twice, Err(StoreError::InviteExists(ref n)) if n == "laptop"));
        assert_eq!(store.invites().expect("list").len(), 1);
        // The wrong name or hash is unknown, and changes nothing.
        assert_eq!(
            store.redeem_invite("aa", "phone", now).expect("redeem"),
            Err(JoinRefusal::Unknown)
        );
        assert_eq!(
            store.redeem_invite("zz", "laptop", now).expect("redeem"),
            Err(JoinRefusal::Unknown)
        );
        assert_eq!(store.invites().expect("list")[0].state, InviteState::Open);
        // Past its time (kept to the second, rounded up): expired, still
        // open in the store.
        let past = later + Duration::from_secs(1);
        assert_eq!(
            store.redeem_invite("aa", "laptop", past).expect("redeem"),
            Err(JoinRefusal::Expired)
        );
        assert_eq!(store.invites().expect("list")[0].state_at(past), "expired");
        let redeemed = store.redeem_invite("aa", "laptop", now).expect("redeem");
        assert_eq!(
            redeemed.map(|i| i.address),
            Ok(Some(Ipv4Addr::new(198, 19, 0, 80)))
        );
        assert_eq!(
            store.redeem_invite("aa", "laptop", now).expect("redeem"),
            Err(JoinRefusal::Used)
        );
        // Opened again when its peer could not be added.
        store.unredeem_invite("aa").expect("unredeem");
        assert_eq!(store.invites().expect("list")[0].state, InviteState::Open);
        assert!(store.revoke_invite("laptop").expect("revoke"));
        assert!(!store.revoke_invite("laptop").expect("revoke again"));
        assert_eq!(
            store.redeem_invite("aa", "laptop", now).expect("redeem"),
            Err(JoinRefusal::Revoked)
        );
        // A new one of the same name after the old one ended.
        store
            .put_invite(&invite("cc", "laptop", later), now)
            .expect("again");
        // An expired open one is replaced by a new one.
        let soon = now + Duration::from_secs(1);
        store
            .put_invite(&invite("dd", "phone", soon), now)
            .expect("put");
        store
            .put_invite(&invite("ee", "phone", later), soon + Duration::from_secs(2))
            .expect("replaces the expired one");
        let names: Vec<_> = store
            .invites()
            .expect("list")
            .into_iter()
            .map(|i| (i.hash, i.state))
            .collect();
        assert_eq!(
            names,
            [
                ("aa".to_string(), InviteState::Revoked),
                ("cc".to_string(), InviteState::Open),
                ("ee".to_string(), InviteState::Open),
            ]
        );
        // Listed for a while after their end, then deleted.
        store
            .expire(later + Duration::from_secs(2))
            .expect("expire");
        assert_eq!(store.invites().expect("list").len(), 3);
        store
            .expire(later + INVITE_HISTORY + Duration::from_secs(2))
            .expect("expire");
        assert!(store.invites().expect("list").is_empty());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn two_redeemers_of_one_invitation_one_wins() {
        let dir = dir("invites-race");
        let path = dir.join(STATE_FILE);
        let now = SystemTime::now();
        SqliteStore::open(&path)
            .expect("create")
            .put_invite(
                &Invite {
                    hash: "aa".into(),
                    name: "laptop".into(),
                    address: None,
                    created: now,
                    expires: now + Duration::from_secs(60),
                    state: InviteState::Open,
                },
                now,
            )
            .expect("put");
        let redeemers: Vec<_> = (0..4)
            .map(|_| {
                let store = SqliteStore::open(&path).expect("open");
                std::thread::spawn(move || {
                    store.redeem_invite("aa", "laptop", now).expect("redeem")
                })
            })
            .collect();
        let results: Vec<_> = redeemers
            .into_iter()
            .map(|r| r.join().expect("redeemer"))
            .collect();
        assert_eq!(
            results.iter().filter(|r| r.is_ok()).count(),
            1,
            "{results:?}"
        );
        assert_eq!(
            results
                .iter()
                .filter(|r| **r == Err(JoinRefusal::Used))
                .count(),
            3
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn an_ipv6_address_is_leased_to_one_key_at_a_time() {
        let dir = dir("onekey6");
        let store = SqliteStore::open_dir(&dir).expect("open");
        let later = SystemTime::now() + Duration::from_secs(60);
        let address6 = Some("2001:2:0:100::9".parse().expect("v6"));
        for n in [1, 2] {
            store
                .put_lease(&Lease {
                    key: key(n),
                    address: Ipv4Addr::new(198, 19, 0, n),
                    address6,
                    expires: later,
                })
                .expect("lease");
        }
        let leases = store.leases(SystemTime::now()).expect("leases");
        assert_eq!(leases.len(), 1);
        assert_eq!((leases[0].key, leases[0].address6), (key(2), address6));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn concurrent_writers_all_land() {
        let dir = dir("concurrent");
        let path = dir.join(STATE_FILE);
        SqliteStore::open(&path).expect("create");
        let later = SystemTime::now() + Duration::from_secs(60);
        let writers: Vec<_> = (0..4u8)
            .map(|w| {
                // A connection each, as two processes would have.
                let store = Arc::new(SqliteStore::open(&path).expect("open"));
                std::thread::spawn(move || {
                    for i in 0..25u8 {
                        let n = w * 25 + i;
                        store
                            .put_lease(&Lease {
                                key: key(n),
                                address: Ipv4Addr::new(198, 19, 1, n),
                                address6: None,
                                expires: later,
                            })
                            .expect("write under contention");
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().expect("writer");
        }
        let store = SqliteStore::open(&path).expect("open");
        assert_eq!(store.leases(SystemTime::now()).expect("leases").len(), 100);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_corrupt_or_newer_file_is_refused_and_left_alone() {
        let dir = dir("corrupt");
        let path = dir.join(STATE_FILE);
        let garbage = b"this is not a database, but it is long enough to look like one ".repeat(20);
        std::fs::write(&path, &garbage).expect("write");
        let err = SqliteStore::open(&path).err().expect("refused").to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("not a database"), "{err}");
        assert!(!err.contains('\n'), "{err}");
        assert_eq!(
            std::fs::read(&path).expect("read"),
            garbage,
            "left as it was"
        );

        let newer = dir.join("newer.db");
        {
            let store = SqliteStore::open(&newer).expect("open");
            store
                .write(|tx| tx.execute_batch("PRAGMA user_version = 99"))
                .expect("bump");
        }
        let err = SqliteStore::open(&newer)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("schema version 99 is newer"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
