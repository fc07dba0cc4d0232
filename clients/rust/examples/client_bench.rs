//! The client's benchmark (see bench/client).
//!
//! `client_bench record CONNINFO CHANNEL ROWS FILE` listens on CHANNEL and writes each payload,
//! one a line, to FILE until ROWS rows have arrived.
//!
//! `client_bench decode FILE KEY_COLUMNS SECONDS` parses the recorded payloads and applies them
//! to a mirror's table ([`Table`]), round after round for at least SECONDS, on one thread, and
//! prints `rows seconds rows_per_second`.
//!
//! `client_bench mirror CONNINFO CHANNEL` keeps a [`Mirror`] of CHANNEL until its stdin closes,
//! then prints `cpu_seconds wall_seconds events rows resets mirror_rows`.
//!
//! `client_bench count CONNINFO CHANNEL` is the baseline: a raw tokio-postgres listener that
//! only counts notifications, until its stdin closes, then prints `cpu_seconds wall_seconds
//! notifications`.

use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::poll_fn;
use pgwatch_client::{parse, Change, Event, Mirror, Payload, Subscriber, Table};
use tokio_postgres::AsyncMessage;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("record") if args.len() == 5 => record(&args[1], &args[2], args[3].parse().unwrap(), &args[4]).await,
        Some("decode") if args.len() == 4 => decode(&args[1], args[2].parse().unwrap(), args[3].parse().unwrap()),
        Some("mirror") if args.len() == 3 => mirror(&args[1], &args[2]).await,
        Some("count") if args.len() == 3 => count(&args[1], &args[2]).await,
        _ => {
            eprintln!("usage: client_bench record CONNINFO CHANNEL ROWS FILE | decode FILE KEY_COLUMNS SECONDS | mirror CONNINFO CHANNEL | count CONNINFO CHANNEL");
            std::process::exit(2);
        }
    }
}

/// A raw listening connection; its notifications' payloads go to `each` until it returns false.
async fn listen_raw(conninfo: &str, channel: &str, mut each: impl FnMut(&str) -> bool) {
    let (client, mut connection) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await.unwrap();
    let sql = format!("LISTEN \"{}\"", channel.replace('"', "\"\""));
    let mut listen = std::pin::pin!(client.batch_execute(&sql));
    let mut listening = false;
    loop {
        tokio::select! {
            done = &mut listen, if !listening => {
                done.unwrap();
                listening = true;
            }
            message = poll_fn(|cx| connection.poll_message(cx)) => match message {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if !each(n.payload()) {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                _ => return,
            },
        }
    }
}

async fn record(conninfo: &str, channel: &str, rows: u64, file: &str) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(file).unwrap());
    let mut got = 0;
    listen_raw(conninfo, channel, |payload| {
        if let Ok(Payload::Rows { rows, .. }) = parse(payload) {
            got += rows.len() as u64;
        }
        writeln!(out, "{payload}").unwrap();
        got < rows
    })
    .await;
    out.flush().unwrap();
}

fn decode(file: &str, key_columns: usize, seconds: f64) {
    let payloads: Vec<String> =
        std::io::BufReader::new(std::fs::File::open(file).unwrap()).lines().map(Result::unwrap).collect();
    let channel: Arc<str> = Arc::from("bench");
    let mut table = Table::new(key_columns);
    let (start, mut rows) = (Instant::now(), 0u64);
    while start.elapsed().as_secs_f64() < seconds {
        for text in &payloads {
            let event = match parse(text).expect("a recorded payload") {
                Payload::Rows { op, seq, rows, .. } => {
                    Event::Change(Change { channel: channel.clone(), seq, op, rows })
                }
                Payload::Truncate { seq, .. } => Event::Truncate { channel: channel.clone(), seq },
                _ => continue,
            };
            if let Event::Change(change) = &event {
                rows += change.rows.len() as u64;
            }
            table.apply(&event);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!("{rows} {elapsed:.3} {:.0}", rows as f64 / elapsed);
}

/// CPU seconds this process used so far (user and system), from /proc.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // Linux reports /proc times in USER_HZ, which it fixes at 100.
    ticks as f64 / 100.0
}

/// Resolves when stdin closes (read on a thread of its own).
fn stdin_closed() -> tokio::sync::oneshot::Receiver<()> {
    let (done, closed) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        let _ = done.send(());
    });
    closed
}

async fn mirror(conninfo: &str, channel: &str) {
    let closed = stdin_closed();
    let start = Instant::now();
    let subscriber = Subscriber::builder(conninfo).unwrap().channel(channel).connect().await.unwrap();
    let mut mirror = Mirror::new(subscriber, channel);
    let (mut events, mut rows, mut resets) = (0u64, 0u64, 0u64);
    let run = async {
        loop {
            match mirror.next().await.unwrap() {
                Event::Change(change) => rows += change.rows.len() as u64,
                Event::Reset(_) => resets += 1,
                Event::Truncate { .. } => {}
            }
            events += 1;
        }
    };
    tokio::select! {
        () = run => {}
        _ = closed => {}
    }
    println!(
        "{:.2} {:.2} {events} {rows} {resets} {}",
        cpu_seconds(),
        start.elapsed().as_secs_f64(),
        mirror.table().len()
    );
}

async fn count(conninfo: &str, channel: &str) {
    let closed = stdin_closed();
    let start = Instant::now();
    let mut notifications = 0u64;
    tokio::select! {
        () = listen_raw(conninfo, channel, |_| { notifications += 1; true }) => {}
        _ = closed => {}
    }
    println!("{:.2} {:.2} {notifications}", cpu_seconds(), start.elapsed().as_secs_f64());
}
