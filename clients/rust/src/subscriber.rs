//! The subscriber: start-up in the protocol's order, live payloads judged by their `seq`, gaps
//! filled by replay, reconnects with backoff, and resets wherever nothing else is exact.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Socket};

use crate::connection::{self, Backoff, Busy, Conn, Connector, Watch, PROTOCOL_VERSION};
use crate::event::{Change, Event, Reset, ResetReason};
use crate::inbox::Taken;
use crate::payload::{self, Payload};
use crate::scope::Scope;
use crate::sequence::{fingerprint, Track, Verdict};
use crate::Error;

/// How long a subscriber waits for a server that says it is not ready yet (55000: its feeds
/// are being reset after a restart) before it hands the error to the caller.
const NOT_READY_WAIT: Duration = Duration::from_secs(30);

/// Counters of what a subscriber did, since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Notifications received.
    pub received: u64,
    /// Payloads applied (handed out as events), live or replayed.
    pub applied: u64,
    /// Payloads read from the server's log.
    pub replayed: u64,
    /// Live payloads dropped because they were already applied.
    pub duplicates: u64,
    /// Notifications that were not payloads (ignored).
    pub ignored: u64,
    /// Live payloads the server's log showed to be forged (ignored).
    pub forged: u64,
    /// Resets handed out.
    pub resets: u64,
    /// Connections lost and made again.
    pub reconnects: u64,
    /// Times the consumer fell behind the buffer's bound.
    pub lagged: u64,
    /// Notifications dropped with the buffer (recovered by replay or a reset).
    pub dropped: u64,
}

/// How to build a [`Subscriber`].
pub struct Builder {
    config: tokio_postgres::Config,
    channels: Vec<(String, Option<Scope>)>,
    buffer: usize,
    dead_after: Duration,
    replay_page: i32,
    backoff: (Duration, Duration),
    connector: Connector,
}

impl Builder {
    /// Listens on `channel` (a watch's label or `schema.table`).
    pub fn channel(mut self, channel: impl Into<String>) -> Builder {
        self.channels.push((channel.into(), None));
        self
    }

    /// Listens on `channel`, handing out only the rows of `scope` (see [`Scope`]).
    pub fn scoped(mut self, channel: impl Into<String>, scope: Scope) -> Builder {
        self.channels.push((channel.into(), Some(scope)));
        self
    }

    /// The most notifications kept for a slow consumer (default 10,000). Past it they are
    /// dropped and recovered by replay from the last payload handed out, or by a reset.
    pub fn buffer(mut self, notifications: usize) -> Builder {
        self.buffer = notifications.max(1);
        self
    }

    /// How soon a dead connection is noticed (default 10 s): a `SELECT 1` is sent every half of
    /// it and must answer within the other half; TCP keepalives are set to match.
    pub fn dead_after(mut self, dead_after: Duration) -> Builder {
        self.dead_after = dead_after.max(Duration::from_millis(100));
        self
    }

    /// Payloads read per `pgwatch.replay()` call (default 1000, at most 10,000).
    pub fn replay_page(mut self, payloads: i32) -> Builder {
        self.replay_page = payloads.clamp(1, 10_000);
        self
    }

    /// The shortest and longest delay between reconnection attempts (default 50 ms and 5 s).
    pub fn backoff(mut self, min: Duration, max: Duration) -> Builder {
        self.backoff = (min, max);
        self
    }

    /// Connects with TLS (the default is `tokio_postgres::NoTls`).
    pub fn tls<T>(mut self, tls: T) -> Builder
    where
        T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
        T::Stream: Send + 'static,
        T::TlsConnect: Send,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
    {
        self.connector = connection::connector(tls);
        self
    }

    /// Connects and starts listening. Fails if the server cannot be reached, does not speak
    /// this client's protocol, or has no watch sending on a channel; after this, lost
    /// connections are made again by [`Subscriber::next`].
    pub async fn connect(mut self) -> Result<Subscriber, Error> {
        if self.channels.is_empty() {
            return Err(Error::Config("subscribe to at least one channel".into()));
        }
        if let Some((twice, _)) = self
            .channels
            .iter()
            .enumerate()
            .find_map(|(at, (c, _))| self.channels[..at].iter().any(|(d, _)| d == c).then_some((c, ())))
        {
            return Err(Error::Config(format!("channel \"{twice}\" is listed twice: one subscriber per scope")));
        }
        let idle = Duration::from_secs((self.dead_after / 4).as_secs().max(1));
        // The kernel counts keepalive times in whole seconds.
        self.config
            .keepalives(true)
            .keepalives_idle(idle)
            .keepalives_interval((idle / 2).max(Duration::from_secs(1)))
            .keepalives_retries(2);
        if self.config.get_connect_timeout().is_none() {
            self.config.connect_timeout(self.dead_after);
        }
        // Unanswered data (a dead peer during a long query) ends the connection in time too; a
        // standby, where LISTEN fails, is skipped among several hosts.
        self.config.tcp_user_timeout(self.dead_after);
        self.config.target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
        let channels = self
            .channels
            .into_iter()
            .map(|(name, scope)| Channel {
                name: Arc::from(name),
                scope,
                track: Track::new(false, None),
                replaying: false,
                verify: None,
                reset: None,
            })
            .collect();
        let mut subscriber = Subscriber {
            config: self.config,
            connector: self.connector,
            buffer: self.buffer,
            dead_after: self.dead_after,
            replay_page: self.replay_page,
            backoff: Backoff::new(self.backoff.0, self.backoff.1),
            channels,
            conn: None,
            watches: HashMap::new(),
            pending: VecDeque::new(),
            stats: Stats::default(),
        };
        subscriber.start().await?;
        Ok(subscriber)
    }
}

/// One channel's state.
struct Channel {
    name: Arc<str>,
    scope: Option<Scope>,
    track: Track,
    /// Catching up from the server's log.
    replaying: bool,
    /// A live payload repeated this applied `seq` with another text: ask the log.
    verify: Option<i64>,
    /// A reset to hand out (after taking the position the refetch starts from).
    reset: Option<ResetReason>,
}

/// Why a step could not finish.
enum Trouble {
    /// The connection is gone (or the server did not get ready in time): connect again.
    Lost(String),
    /// Nothing this subscriber can recover from.
    Fatal(Error),
}

/// Whether an error ended the connection (a broken connection, the server shutting down or
/// starting up, the backend terminated): mended by connecting again. Others (a timeout, a
/// refusal, an error of the server's state) are the caller's: calling again retries them.
pub(crate) fn lost(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        None => true,
        Some(code) => {
            code.code().starts_with("08") || ["57P01", "57P02", "57P03", "57P04", "57P05"].contains(&code.code())
        }
    }
}

impl From<tokio_postgres::Error> for Trouble {
    fn from(e: tokio_postgres::Error) -> Trouble {
        if lost(&e) {
            Trouble::Lost(e.to_string())
        } else {
            Trouble::Fatal(Error::Postgres(e))
        }
    }
}

/// A subscription to one or more channels: hands out every change exactly once and in order,
/// or a [`Reset`] that says to refetch, never a silent hole.
///
/// ```no_run
/// # async fn example() -> Result<(), pgwatch_client::Error> {
/// use pgwatch_client::{Event, Subscriber};
///
/// let mut subscriber = Subscriber::builder("host=localhost user=app dbname=app")?
///     .channel("public.users")
///     .connect()
///     .await?;
/// loop {
///     match subscriber.next().await? {
///         Event::Reset(reset) => println!("refetch {} ({})", reset.channel, reset.reason),
///         Event::Truncate { channel, .. } => println!("{channel}: every row removed"),
///         Event::Change(change) => {
///             for row in &change.rows {
///                 println!("{} {:?} {:?}", change.channel, change.op, row.to_object());
///             }
///         }
///     }
/// }
/// # }
/// ```
pub struct Subscriber {
    config: tokio_postgres::Config,
    connector: Connector,
    buffer: usize,
    dead_after: Duration,
    replay_page: i32,
    backoff: Backoff,
    channels: Vec<Channel>,
    conn: Option<Conn>,
    watches: HashMap<String, Watch>,
    pending: VecDeque<Event>,
    stats: Stats,
}

impl Subscriber {
    /// A builder from a libpq-style connection string (`host=... user=... dbname=...`) or URL.
    pub fn builder(connection: &str) -> Result<Builder, Error> {
        Ok(Builder {
            config: connection.parse().map_err(Error::Postgres)?,
            channels: Vec::new(),
            buffer: 10_000,
            dead_after: Duration::from_secs(10),
            replay_page: 1000,
            backoff: (Duration::from_millis(50), Duration::from_secs(5)),
            connector: connection::connector(NoTls),
        })
    }

    /// What it did so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Notifications received and not yet handed out, and those dropped past the buffer's bound
    /// that the next call of [`next`](Subscriber::next) will recover: how far behind the
    /// consumer is.
    pub fn backlog(&self) -> (usize, u64) {
        self.conn.as_ref().map_or((0, 0), |c| c.inbox.backlog())
    }

    /// The listening connection's client, while connected: for a short query, say. Its health
    /// check takes a query of yours that runs longer than half of `dead_after` for a dead
    /// connection: run long ones (a big snapshot) on a connection of their own.
    pub fn client(&self) -> Option<&Arc<Client>> {
        self.conn.as_ref().map(|c| &c.client)
    }

    /// The key columns and the other columns a channel's watch sends, as last read.
    pub fn columns(&self, channel: &str) -> Option<(&[String], &[String])> {
        self.watches.get(channel).map(|w| w.columns.split_at(w.key_columns))
    }

    /// The scope a channel was subscribed with, if any.
    pub fn scope(&self, channel: &str) -> Option<&Scope> {
        self.channels.iter().find(|c| &*c.name == channel).and_then(|c| c.scope.as_ref())
    }

    /// The watched table of a channel (a quoted name), as last read.
    pub fn table(&self, channel: &str) -> Option<&str> {
        self.watches.get(channel).map(|w| w.tbl.as_str())
    }

    /// The last `seq` handed out on a channel (on a retained channel after a reset: the position
    /// the refetch starts from).
    pub fn last_seq(&self, channel: &str) -> Option<i64> {
        self.channels.iter().find(|c| &*c.name == channel).and_then(|c| c.track.last)
    }

    /// Asks for a [`Reset`] of `channel` (reason [`ResetReason::Start`]) at the next call of
    /// [`next`](Subscriber::next): for a consumer whose refetch failed.
    pub fn request_reset(&mut self, channel: &str) {
        for c in self.channels.iter_mut().filter(|c| &*c.name == channel) {
            c.reset = Some(ResetReason::Start);
        }
    }

    /// The next event. Waits for one; reconnects (forever, with backoff) when the connection is
    /// lost. Fails only on what retrying cannot mend (a watch dropped, a server that speaks
    /// another protocol, an SQL error).
    ///
    /// Cancel-safe: dropped before it returns (in `tokio::select!` or a timeout), it loses
    /// nothing; the next call goes on where it stopped. Every decision is recorded before the
    /// query that carries it out, which is made again if it did not finish.
    pub async fn next(&mut self) -> Result<Event, Error> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                self.stats.applied += u64::from(!matches!(event, Event::Reset(_)));
                // Only a connection that served something counts as mended.
                self.backoff.reset();
                return Ok(event);
            }
            match self.step().await {
                Ok(()) => {}
                Err(Trouble::Fatal(e)) => return Err(e),
                Err(Trouble::Lost(_)) => self.reconnect().await?,
            }
        }
    }

    /// The first connection: errors are the caller's.
    async fn start(&mut self) -> Result<(), Error> {
        let conn =
            Conn::open(&self.connector, &self.config, self.buffer, self.dead_after).await.map_err(Error::Postgres)?;
        match self.prepare(conn, true).await {
            Ok(()) => Ok(()),
            Err(Trouble::Fatal(e)) => Err(e),
            Err(Trouble::Lost(why)) => Err(Error::Config(format!("the connection was lost while starting: {why}"))),
        }
    }

    /// Connects again until it succeeds, then resumes every channel.
    async fn reconnect(&mut self) -> Result<(), Error> {
        self.conn = None;
        loop {
            tokio::time::sleep(self.backoff.next_delay()).await;
            let conn = match Conn::open(&self.connector, &self.config, self.buffer, self.dead_after).await {
                Ok(conn) => conn,
                Err(e) if lost(&e) => continue,
                // A wrong password, a database gone: the caller's to see.
                Err(e) => return Err(Error::Postgres(e)),
            };
            match self.prepare(conn, false).await {
                Ok(()) => {
                    self.stats.reconnects += 1;
                    return Ok(());
                }
                Err(Trouble::Fatal(e)) => return Err(e),
                Err(Trouble::Lost(_)) => {}
            }
        }
    }

    /// How long a query of the subscriber's may take: it waits up to [`NOT_READY_WAIT`] for a
    /// server after a restart, and a page of replay may be large.
    fn query_limit(&self) -> Duration {
        (NOT_READY_WAIT + self.dead_after).max(self.dead_after * 3)
    }

    /// The connection's client, marked busy (the health check waits) while the guard lives.
    fn client_now(&self) -> Result<(Arc<Client>, Busy), Trouble> {
        self.conn.as_ref().map(|c| (c.client.clone(), c.busy())).ok_or_else(|| Trouble::Lost("not connected".into()))
    }

    /// The listening connection marked busy while the guard lives: for a long query of the
    /// consumer's on it (a snapshot), which the health check must not take for a dead peer.
    pub(crate) fn busy(&self) -> Option<Busy> {
        self.conn.as_ref().map(Conn::busy)
    }

    /// Start-up in the protocol's order on a new connection: version, watches, LISTEN; then it
    /// becomes the subscriber's, and each channel is due a refetch (`first`, or a channel
    /// without a log) or a replay from its last `seq`.
    async fn prepare(&mut self, conn: Conn, first: bool) -> Result<(), Trouble> {
        let version = connection::protocol(&conn.client).await?;
        if version != PROTOCOL_VERSION {
            return Err(Trouble::Fatal(Error::Protocol(format!(
                "the server speaks pgwatch protocol {version}, this client {PROTOCOL_VERSION}"
            ))));
        }
        let names: Vec<&str> = self.channels.iter().map(|c| &*c.name).collect();
        let watches = connection::watches(&conn.client, &names).await?;
        if let Some(missing) = names.iter().find(|n| !watches.contains_key(**n)) {
            return Err(Trouble::Fatal(Error::Protocol(format!("no watch sends on channel \"{missing}\""))));
        }
        connection::listen(&conn.client, &names).await?;
        self.conn = Some(conn);
        self.watches = watches;
        for channel in &mut self.channels {
            let retained = self.watches[&*channel.name].retained;
            if !first && retained && channel.track.retained && channel.track.last.is_some() {
                channel.replaying = true;
            } else if channel.reset.is_none() {
                channel.reset = Some(if first { ResetReason::Start } else { ResetReason::Reconnected });
            }
        }
        Ok(())
    }

    /// One step: a reset, a check or a page of replay that is due, or a notification (waiting
    /// for one).
    async fn step(&mut self) -> Result<(), Trouble> {
        if self.conn.is_none() {
            return Err(Trouble::Lost("not connected".into()));
        }
        if let Some(at) = self.channels.iter().position(|c| c.reset.is_some()) {
            return self.refetch(at).await;
        }
        if let Some(at) = self.channels.iter().position(|c| c.verify.is_some()) {
            return self.verify(at).await;
        }
        if let Some(at) = self.channels.iter().position(|c| c.replaying) {
            return self.replay_page(at).await;
        }
        let inbox = self.conn.as_ref().expect("connected").inbox.clone();
        match inbox.take() {
            Taken::Item((channel, text)) => {
                self.stats.received += 1;
                self.live(&channel, &text);
                Ok(())
            }
            Taken::Lagged(dropped) => {
                self.stats.lagged += 1;
                self.stats.dropped += dropped;
                for channel in &mut self.channels {
                    if channel.track.retained {
                        channel.replaying = true;
                    } else {
                        channel.reset.get_or_insert(ResetReason::Lagged { dropped });
                    }
                }
                Ok(())
            }
            Taken::Closed(why) => Err(Trouble::Lost(why)),
            Taken::Empty => {
                inbox.ready.notified().await;
                Ok(())
            }
        }
    }

    /// A notification as it came from the channel: judged, and handed out or turned into what
    /// is due (a replay, a check, a reset), without waiting for anything.
    fn live(&mut self, channel: &str, text: &str) {
        let Some(at) = self.channels.iter().position(|c| &*c.name == channel) else { return };
        let Ok(payload) = payload::parse(text) else {
            self.stats.ignored += 1;
            return;
        };
        let print = fingerprint(text);
        let channel = &mut self.channels[at];
        match channel.track.judge(payload.seq(), print, payload.demands_refetch()) {
            Verdict::Apply => self.apply(at, payload, print),
            Verdict::Skip => self.stats.duplicates += 1,
            Verdict::Replay => channel.replaying = true,
            Verdict::Verify(seq) => channel.verify = Some(seq),
            Verdict::Reset(reason) => {
                channel.reset.get_or_insert(reason);
            }
        }
    }

    /// Hands out a payload judged in sequence (or read from the log): its change, or a reset
    /// due.
    fn apply(&mut self, at: usize, payload: Payload, print: u64) {
        let channel = &mut self.channels[at];
        channel.track.applied(payload.seq(), print);
        let name = channel.name.clone();
        let reason = match payload {
            Payload::Rows { rows, .. } if rows.iter().any(|r| r.is_partial()) => ResetReason::PartialRows,
            Payload::Rows { op, seq, rows, .. } => {
                let change = Change { channel: name, seq, op, rows };
                let change = match &channel.scope {
                    Some(scope) => scope.filter(&change),
                    None => Some(change),
                };
                self.pending.extend(change.map(Event::Change));
                return;
            }
            Payload::Truncate { seq, .. } => {
                self.pending.push_back(Event::Truncate { channel: name, seq });
                return;
            }
            Payload::Overflow { .. } => ResetReason::Overflow,
            Payload::Resync { .. } => ResetReason::Resync,
            Payload::Reset { reason, .. } => ResetReason::Marker(reason),
        };
        channel.reset.get_or_insert(reason);
    }

    /// Reads the next page of the server's log, from the last payload it vouched for: those
    /// applied since from the channel alone are compared with it, the rest handed out.
    async fn replay_page(&mut self, at: usize) -> Result<(), Trouble> {
        let (client, _busy) = self.client_now()?;
        let track = &self.channels[at].track;
        let (name, after, last) =
            (self.channels[at].name.clone(), track.replay_from().unwrap_or(0), track.last.unwrap_or(0));
        let sql = "SELECT seq, payload FROM pgwatch.replay($1::text, $2::bigint, $3::int)";
        let rows = match ready(&client, sql, &[&&*name, &after, &self.replay_page], self.query_limit()).await? {
            Ok(rows) => rows,
            Err(e) if refused(&e) => {
                self.channels[at].reset.get_or_insert(ResetReason::GapNotReplayable);
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        // From here on nothing waits: the page is handed out whole, or what it makes due is.
        self.channels[at].replaying = rows.len() == self.replay_page as usize;
        for row in rows {
            let (seq, text): (i64, &str) = (row.get(0), row.get(1));
            let print = fingerprint(text);
            if seq > last {
                self.stats.replayed += 1;
                match payload::parse(text) {
                    Ok(payload) if payload.seq() == Some(seq) => self.apply(at, payload, print),
                    _ => {
                        self.channels[at].reset.get_or_insert(ResetReason::Unreadable);
                    }
                }
            }
            if !self.channels[at].track.logged(seq, print) {
                // What was applied with this seq is not what the server sent.
                self.channels[at].reset.get_or_insert(ResetReason::Mismatch);
            }
            if self.channels[at].reset.is_some() {
                // A refetch starts from the position: the rest of the page is not needed.
                break;
            }
        }
        Ok(())
    }

    /// A live payload repeated an applied `seq` with another text: the log says which was real.
    async fn verify(&mut self, at: usize) -> Result<(), Trouble> {
        let (client, _busy) = self.client_now()?;
        let (name, seq) = (self.channels[at].name.clone(), self.channels[at].verify.expect("due"));
        let sql = "SELECT payload FROM pgwatch.replay($1::text, $2::bigint, 1) WHERE seq = $3";
        let logged = ready(&client, sql, &[&&*name, &(seq - 1), &seq], self.query_limit()).await?;
        let applied = self.channels[at].track.remembered(seq);
        let channel = &mut self.channels[at];
        channel.verify = None;
        match logged {
            Ok(rows) if rows.len() == 1 && Some(fingerprint(rows[0].get(0))) == applied => self.stats.forged += 1,
            Err(e) if lost(&e) => {
                channel.verify = Some(seq);
                return Err(e.into());
            }
            // Not what the server logged, or the log cannot tell any more: refetch.
            _ => {
                channel.reset.get_or_insert(ResetReason::Mismatch);
            }
        }
        Ok(())
    }

    /// Hands out the reset due on a channel after taking the position the refetch starts from
    /// (a retained channel's; none on the others, which drop what they hold for the channel:
    /// the refetch covers it).
    async fn refetch(&mut self, at: usize) -> Result<(), Trouble> {
        let (client, _busy) = self.client_now()?;
        let name = self.channels[at].name.clone();
        // The watch as it is now: the refetch takes its columns, and it may have gained or lost
        // retention.
        let Some(watch) = connection::watches(&client, &[&name]).await?.remove(&*name) else {
            return Err(Trouble::Fatal(Error::Protocol(format!("no watch sends on channel \"{name}\" any more"))));
        };
        let retained = watch.retained;
        self.watches.insert(name.to_string(), watch);
        let mut position = None;
        if retained {
            match ready(&client, "SELECT pgwatch.position($1::text)", &[&&*name], self.query_limit()).await? {
                Ok(rows) => position = Some(rows[0].get::<_, i64>(0)),
                // Not retained any more, or not for this role: gaps become resets.
                Err(e) if refused(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let channel = &mut self.channels[at];
        let reason = channel.reset.take().expect("due");
        channel.track.restart(position.is_some(), position);
        channel.replaying = false;
        channel.verify = None;
        if position.is_none() {
            self.conn.as_ref().expect("connected").inbox.forget(&name);
        }
        self.stats.resets += 1;
        self.pending.push_back(Event::Reset(Reset { channel: name, reason }));
        Ok(())
    }
}

/// Whether the server refused to replay: the log does not hold what was asked (72000), or not
/// for this role (42501).
fn refused(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::SNAPSHOT_TOO_OLD) || e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE)
}

/// Runs a query, again while the server answers 55000 (not ready after a restart), for up to
/// [`NOT_READY_WAIT`] (then the 55000 is the caller's); a query that has no answer within `limit`
/// counts as a lost connection (a backend that stopped answering: the kernel still acknowledges
/// its packets, so neither keepalives nor the TCP user timeout notice).
async fn ready(
    client: &Client,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    limit: Duration,
) -> Result<Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>, Trouble> {
    tokio::time::timeout(limit, ready_once(client, sql, params))
        .await
        .map_err(|_| Trouble::Lost(format!("no answer to a query of the subscriber's within {limit:?}")))
}

async fn ready_once(
    client: &Client,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let deadline = Instant::now() + NOT_READY_WAIT;
    loop {
        match client.query(sql, params).await {
            Err(e) if e.code() == Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}
