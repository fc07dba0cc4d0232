//! pgwatch-client: a subscriber of [pgwatch](https://github.com/pgwatch) channels that hands out
//! every change exactly once and in order, or an explicit reset ("refetch"), never a silent hole.
//!
//! It follows the subscriber protocol (docs/protocol.md in pgwatch's repository, version
//! [`PROTOCOL_VERSION`]): it LISTENs before it takes a channel's position, replays from the
//! server's log what a reconnect or a slow consumer missed on a retained channel
//! (`watch_table(..., retain => ...)`), drops duplicates, checks what the channel says against
//! the log (any role can NOTIFY a forged payload), keeps reading the connection while the
//! consumer is busy (within a bounded buffer), and notices a dead connection with keepalives and
//! a periodic query.
//!
//! - [`Subscriber`]: the events of one or more channels ([`Event`]).
//! - [`Mirror`]: a map of key → row kept equal to a table, refetched on every reset.
//! - [`Scope`]: only the rows with one value in one column, and those that leave it.
//! - [`parse`]: the payload grammar alone.
//!
//! ```no_run
//! # async fn example() -> Result<(), pgwatch_client::Error> {
//! use pgwatch_client::{Event, Mirror, Scope, Subscriber};
//!
//! // Users of role 7: their changes, and the users that leave the role.
//! let mut subscriber = Subscriber::builder("host=localhost user=app dbname=app")?
//!     .scoped("public.users", Scope::new("role_id", 7))
//!     .connect()
//!     .await?;
//! while let Ok(event) = subscriber.next().await {
//!     if let Event::Change(change) = event {
//!         for row in &change.rows {
//!             #[derive(serde::Deserialize)]
//!             struct User { id: i64, role_id: i32 }
//!             let user: User = row.deserialize().expect("the watch sends id and role_id");
//!             println!("{:?} user {} (left the role: {})", change.op, user.id, row.has_left());
//!         }
//!     }
//! }
//! # Ok(())
//! # }
//! ```

mod connection;
mod event;
mod inbox;
mod mirror;
mod payload;
mod scope;
mod sequence;
mod subscriber;

use std::fmt;

pub use connection::PROTOCOL_VERSION;
pub use event::{Change, Event, Reset, ResetReason};
pub use mirror::{Mirror, SnapshotFn, Table};
pub use payload::{parse, Key, KeyPart, Op, ParseError, Payload, Row};
pub use scope::Scope;
pub use subscriber::{Builder, Stats, Subscriber};

/// What a subscriber cannot mend by connecting again.
#[derive(Debug)]
pub enum Error {
    /// An error of the server or of the first connection.
    Postgres(tokio_postgres::Error),
    /// The server does not speak this client's protocol, or has no such watch.
    Protocol(String),
    /// The subscriber is used wrongly.
    Config(String),
    /// A snapshot function failed.
    Snapshot(Box<dyn std::error::Error + Send + Sync>),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Postgres(e) => write!(f, "{e}"),
            Error::Protocol(why) | Error::Config(why) => f.write_str(why),
            Error::Snapshot(e) => write!(f, "snapshot failed: {e}"),
        }
    }
}

impl std::error::Error for Error {}
