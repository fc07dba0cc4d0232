//! A live mirror of one watched table: prints each event as it arrives, shortened, and the
//! mirror after it; says when its connection was lost and what replay brought back.
//!
//!     cargo run -p pgwatch-client --example mirror -- "host=localhost user=postgres dbname=app" public.users

use std::time::{SystemTime, UNIX_EPOCH};

use pgwatch_client::{Event, Mirror, Row, Subscriber};

/// The longest line printed for rows.
const WIDTH: usize = 110;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), pgwatch_client::Error> {
    let mut args = std::env::args().skip(1);
    let (Some(conninfo), Some(channel)) = (args.next(), args.next()) else {
        eprintln!("usage: mirror CONNINFO CHANNEL");
        std::process::exit(2);
    };
    let subscriber = Subscriber::builder(&conninfo)?.channel(channel.as_str()).connect().await?;
    let (keys, _) = subscriber.columns(&channel).expect("a channel the subscriber listens on");
    let key_columns = keys.len();
    println!("{} mirroring {channel}", clock());
    let mut mirror = Mirror::new(subscriber, &channel);
    let mut seen = mirror.subscriber().stats();
    loop {
        let event = mirror.next().await?;
        let stats = mirror.subscriber().stats();
        if stats.reconnects > seen.reconnects {
            println!(
                "{} connection lost and made again; replayed {} payload(s) from the server's log, no refetch",
                clock(),
                stats.replayed - seen.replayed
            );
        }
        seen = stats;
        let what = match &event {
            Event::Reset(reset) => format!(
                "reset ({}): snapshot taken, from position {}",
                reset.reason,
                mirror.subscriber().last_seq(&channel).map_or("-".into(), |s| s.to_string())
            ),
            Event::Truncate { seq, .. } => format!("truncate seq {}", seq.map_or("-".into(), |s| s.to_string())),
            Event::Change(change) => format!(
                "{} seq {}: {}",
                change.op.as_str(),
                change.seq.map_or("-".into(), |s| s.to_string()),
                rows(change.rows.iter(), change.rows.len())
            ),
        };
        println!("{} {what}", clock());
        let mut all: Vec<&Row> = mirror.table().rows().values().collect();
        all.sort_by_key(|r| r.key(key_columns));
        println!("             mirror {}", rows(all.into_iter(), mirror.table().len()));
    }
}

/// Rows as `{id 1, role_id 3}`, cut to [`WIDTH`] with how many were left out.
fn rows<'a>(rows: impl Iterator<Item = &'a Row>, count: usize) -> String {
    let mut line = format!("{count} row(s)");
    for (shown, row) in rows.enumerate() {
        let text: Vec<String> = row.columns().map(|(c, v)| format!("{c} {v}")).collect();
        let next = format!(" {{{}}}", text.join(", "));
        if line.len() + next.len() > WIDTH {
            line += &format!(" … {} more", count - shown);
            break;
        }
        line += &next;
    }
    line
}

/// The UTC time of day with milliseconds.
fn clock() -> String {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    let (s, ms) = (ms / 1000, ms % 1000);
    format!("{:02}:{:02}:{:02}.{ms:03}", s / 3600 % 24, s / 60 % 60, s % 60)
}
