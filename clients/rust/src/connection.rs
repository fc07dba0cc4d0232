//! One connection of a subscriber: opened with keepalives, read by a task of its own into the
//! inbox, checked by a periodic query, and the catalog facts of the channels it listens on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::task::JoinHandle;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{AsyncMessage, Client, Socket};

use crate::inbox::Inbox;

/// The protocol version of docs/protocol.md this client follows.
pub const PROTOCOL_VERSION: i32 = 1;

/// Opens a connection whose notifications go to the inbox; the task reading it is returned so
/// that a failed health check can end it.
pub(crate) type Connector = Arc<
    dyn Fn(
            tokio_postgres::Config,
            Arc<Inbox>,
        ) -> BoxFuture<'static, Result<(Client, JoinHandle<()>), tokio_postgres::Error>>
        + Send
        + Sync,
>;

/// A connector with the given TLS setup (`tokio_postgres::NoTls` for none).
pub(crate) fn connector<T>(tls: T) -> Connector
where
    T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    Arc::new(move |config, inbox| {
        let tls = tls.clone();
        Box::pin(async move {
            let (client, mut connection) = config.connect(tls).await?;
            let reader = tokio::spawn(async move {
                // Reads every message as it comes, whatever the consumer does.
                let why = loop {
                    match futures_util::future::poll_fn(|cx| connection.poll_message(cx)).await {
                        Some(Ok(AsyncMessage::Notification(n))) => {
                            inbox.push((Arc::from(n.channel()), n.payload().to_owned()))
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => break e.to_string(),
                        None => break "the server closed the connection".to_owned(),
                    }
                };
                inbox.close(why);
            });
            Ok((client, reader))
        })
    })
}

/// A live connection: the client, its inbox, and the tasks that read and check it (ended when
/// it is dropped).
pub(crate) struct Conn {
    pub client: Arc<Client>,
    pub inbox: Arc<Inbox>,
    /// Queries of the subscriber in flight, during which the health check waits (a long query
    /// would delay its answer; keepalives and the TCP user timeout watch the connection then).
    busy: Arc<AtomicUsize>,
    reader: JoinHandle<()>,
    health: JoinHandle<()>,
}

/// A query in flight on a connection.
pub(crate) struct Busy(Arc<AtomicUsize>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.health.abort();
        self.reader.abort();
    }
}

impl Conn {
    /// Marks a query of the subscriber in flight until the guard is dropped.
    pub fn busy(&self) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        Busy(self.busy.clone())
    }

    /// Connects; a connection that does not answer `SELECT 1` within half of `dead_after`, asked
    /// every half of `dead_after` while no query of the subscriber is in flight, is ended (and
    /// the inbox says so).
    pub async fn open(
        connector: &Connector,
        config: &tokio_postgres::Config,
        capacity: usize,
        dead_after: Duration,
    ) -> Result<Conn, tokio_postgres::Error> {
        let inbox = Inbox::new(capacity);
        let (client, reader) = connector(config.clone(), inbox.clone()).await?;
        let client = Arc::new(client);
        let busy = Arc::new(AtomicUsize::new(0));
        let (checked, told, stop, queries) = (client.clone(), inbox.clone(), reader.abort_handle(), busy.clone());
        let every = dead_after / 2;
        let health = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if queries.load(Ordering::Relaxed) > 0 {
                    continue;
                }
                match tokio::time::timeout(every, checked.simple_query("SELECT 1")).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => break told.close(format!("health check failed: {e}")),
                    Err(_) => break told.close(format!("no answer to a health check within {every:?}")),
                }
            }
            stop.abort();
        });
        Ok(Conn { client, inbox, busy, reader, health })
    }
}

/// What the catalog says of a channel's watch.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Watch {
    /// The table, as a quoted name.
    pub tbl: String,
    /// Key columns first, then the extra columns.
    pub columns: Vec<String>,
    pub key_columns: usize,
    pub retained: bool,
}

/// The server's protocol version, which must be this client's.
pub(crate) async fn protocol(client: &Client) -> Result<i32, tokio_postgres::Error> {
    Ok(client.query_one("SELECT pgwatch.protocol_version()", &[]).await?.get(0))
}

/// The watches sending on `channels`, by channel (a channel whose watch is gone has none).
pub(crate) async fn watches(
    client: &Client,
    channels: &[&str],
) -> Result<HashMap<String, Watch>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT channel, tbl::text, key_columns, extra_columns, retain IS NOT NULL
               FROM pgwatch.watches WHERE channel = ANY($1::text[])",
            &[&channels],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| {
            let (keys, extra): (Vec<String>, Vec<String>) = (row.get(2), row.get(3));
            let watch = Watch {
                tbl: row.get(1),
                key_columns: keys.len(),
                columns: [keys, extra].concat(),
                retained: row.get(4),
            };
            (row.get(0), watch)
        })
        .collect())
}

/// `name` as an SQL identifier.
pub(crate) fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// LISTENs on every channel, in one round trip, in a session no timeout of the server's
/// settings ends while it waits for notifications or replays a long log.
pub(crate) async fn listen(client: &Client, channels: &[&str]) -> Result<(), tokio_postgres::Error> {
    let mut sql = String::from(
        "SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0;
         SELECT pg_catalog.set_config(name, '0', false) FROM pg_catalog.pg_settings WHERE name = 'idle_session_timeout';",
    );
    sql.extend(channels.iter().map(|c| format!("LISTEN {};", quote(c))));
    client.batch_execute(&sql).await
}

/// Delays between reconnection attempts: doubling from `min` to `max`, each drawn at random
/// between half and all of it, so that many clients do not come back at the same moment.
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
    state: u64,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let seed =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
        // A minimum of zero would make a failing server a hot loop.
        let min = min.max(Duration::from_millis(10));
        Backoff { min, max: max.max(min), attempt: 0, state: seed | 1 }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let full = self.min.saturating_mul(1 << self.attempt.min(16)).min(self.max);
        self.attempt += 1;
        // xorshift64: jitter needs no more than this.
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        full.mul_f64(0.5 + (self.state >> 11) as f64 / (1u64 << 53) as f64 / 2.0)
    }

    /// After a success: start again from `min`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_bound_with_jitter_and_starts_again_after_a_success() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let mut backoff = Backoff::new(min, max);
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        for (n, d) in delays.iter().enumerate() {
            let full = (min * (1 << n)).min(max);
            assert!(*d >= full / 2 && *d <= full, "attempt {n}: {d:?} outside {full:?}/2..{full:?}");
        }
        backoff.reset();
        assert!(backoff.next_delay() <= min);
    }

    #[test]
    fn channel_names_are_quoted_as_identifiers() {
        assert_eq!(quote("public.users"), "\"public.users\"");
        assert_eq!(quote("a\"b"), "\"a\"\"b\"");
    }
}
