//! A minimal pgwatch subscriber: LISTENs on the given channels and prints each notification as it
//! arrives.
//!
//!     cargo run --example listen -- "host=localhost port=5432 user=postgres dbname=app" public.users

use std::time::{SystemTime, UNIX_EPOCH};

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};

fn main() -> Result<(), postgres::Error> {
    let mut args = std::env::args().skip(1);
    let conninfo = args.next().expect("usage: listen CONNINFO CHANNEL...");
    let mut client = Client::connect(&conninfo, NoTls)?;
    for channel in args {
        client.batch_execute(&format!("LISTEN \"{}\"", channel.replace('"', "\"\"")))?;
        println!("listening on {channel}");
    }
    let mut notifications = client.notifications();
    let mut received = notifications.blocking_iter();
    while let Some(n) = received.next()? {
        println!("{} {} {}", clock(), n.channel(), n.payload());
    }
    Ok(())
}

/// The UTC time of day with milliseconds.
fn clock() -> String {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    let (s, ms) = (ms / 1000, ms % 1000);
    format!("{:02}:{:02}:{:02}.{ms:03}", s / 3600 % 24, s / 60 % 60, s % 60)
}
