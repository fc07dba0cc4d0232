//! The benchmark's client (see bench/run).
//!
//! `bench_client listen CONNINFO STATS_FILE CHANNEL...` drains the channels for the whole run and
//! rewrites STATS_FILE every 100 ms with cumulative `channel notifications bytes rows` lines.
//!
//! `bench_client latency CONNINFO TABLE CHANNEL RATE SECONDS` inserts one row per transaction into
//! TABLE at RATE per second, notes when each commit returned and when its key was received on
//! CHANNEL, and prints `p50 p99 max received sent` (latencies in microseconds).
//!
//! `bench_client report RAW_TSV MACHINE SECONDS ROUNDS` turns the harness's raw results into the
//! markdown report, with the targets checked.

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("listen") if args.len() >= 4 => listen(&args[1], &args[2], &args[3..]),
        Some("latency") if args.len() == 6 => {
            latency(&args[1], &args[2], &args[3], args[4].parse().unwrap(), args[5].parse().unwrap())
        }
        Some("report") if args.len() == 5 => report(&args[1], &args[2], &args[3], &args[4]),
        _ => {
            eprintln!("usage: bench_client listen CONNINFO STATS_FILE CHANNEL... | latency CONNINFO TABLE CHANNEL RATE SECONDS | report RAW_TSV MACHINE SECONDS ROUNDS");
            std::process::exit(2);
        }
    }
}

fn listening(conninfo: &str, channels: &[String]) -> Client {
    let mut client = Client::connect(conninfo, NoTls).expect("connect");
    for channel in channels {
        client.batch_execute(&format!("LISTEN \"{channel}\"")).expect("listen");
    }
    client
}

/// The keys a payload names: pgwatch's `rows[].id` (in a compact payload the value at `id`'s
/// place in `cols`), EctoWatch-style `values.id`, tcn's `"id"='N'`.
fn keys(payload: &str) -> Vec<i64> {
    if let Some(tcn) = payload.split("\"id\"='").nth(1) {
        return tcn.split('\'').next().and_then(|id| id.parse().ok()).into_iter().collect();
    }
    let Ok(value) = serde_json::from_str::<serde_json::Value>(payload) else { return Vec::new() };
    if let Some(rows) = value["rows"].as_array() {
        let at = value["cols"].as_array().and_then(|cols| cols.iter().position(|c| c == "id"));
        return rows.iter().filter_map(|row| at.map_or(&row["id"], |at| &row[at]).as_i64()).collect();
    }
    value["values"]["id"].as_i64().into_iter().collect()
}

/// How many rows a payload names, without building it: the drain shares the machine's cores with
/// the writers and must cost every variant as little as it can.
fn row_count(payload: &str) -> u64 {
    #[derive(serde::Deserialize)]
    struct Rows {
        rows: Option<Vec<serde::de::IgnoredAny>>,
    }
    match serde_json::from_str::<Rows>(payload) {
        Ok(Rows { rows: Some(rows) }) => rows.len() as u64,
        // tcn's and the EctoWatch-style payloads name one row each.
        _ => 1,
    }
}

fn listen(conninfo: &str, stats_file: &str, channels: &[String]) {
    let mut client = listening(conninfo, channels);
    let mut totals: HashMap<String, (u64, u64, u64)> = channels.iter().map(|c| (c.clone(), (0, 0, 0))).collect();
    let mut last_write = Instant::now();
    loop {
        let mut notifications = client.notifications();
        let mut iter = notifications.timeout_iter(Duration::from_millis(100));
        while let Ok(Some(n)) = iter.next() {
            let entry = totals.entry(n.channel().to_string()).or_default();
            entry.0 += 1;
            entry.1 += n.payload().len() as u64;
            entry.2 += row_count(n.payload());
            if last_write.elapsed() > Duration::from_millis(100) {
                break;
            }
        }
        let text: String = totals
            .iter()
            .map(|(channel, (count, bytes, rows))| format!("{channel} {count} {bytes} {rows}\n"))
            .collect();
        let partial = format!("{stats_file}.tmp");
        std::fs::write(&partial, text).expect("write stats");
        std::fs::rename(&partial, stats_file).expect("write stats");
        last_write = Instant::now();
    }
}

fn latency(conninfo: &str, table: &str, channel: &str, rate: f64, seconds: f64) {
    let mut listener = listening(conninfo, &[channel.to_string()]);
    let (received_tx, received_rx) = mpsc::channel::<(i64, Instant)>();
    let total = Duration::from_secs_f64(seconds);
    std::thread::spawn(move || {
        let mut notifications = listener.notifications();
        let mut iter = notifications.timeout_iter(total + Duration::from_secs(5));
        while let Ok(Some(n)) = iter.next() {
            let at = Instant::now();
            for key in keys(n.payload()) {
                if received_tx.send((key, at)).is_err() {
                    return;
                }
            }
        }
    });
    let mut writer = Client::connect(conninfo, NoTls).expect("connect");
    let insert =
        writer.prepare(&format!("INSERT INTO {table} (role_id, name) VALUES (1, 'latency') RETURNING id")).unwrap();
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut committed: HashMap<i64, Instant> = HashMap::new();
    let mut next = start;
    while start.elapsed() < total {
        let id: i64 = writer.query_one(&insert, &[]).unwrap().get(0);
        committed.insert(id, Instant::now());
        next += interval;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let mut latencies: Vec<u128> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while latencies.len() < committed.len() {
        let Ok((key, at)) = received_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else { break };
        if let Some(sent) = committed.get(&key) {
            latencies.push(at.saturating_duration_since(*sent).as_micros());
        }
    }
    latencies.sort_unstable();
    let pick = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{} {} {} {} {}",
        pick(0.50),
        pick(0.99),
        latencies.last().copied().unwrap_or(0),
        latencies.len(),
        committed.len()
    );
}

/// One workload, client count and variant, summed over the rounds.
#[derive(Default)]
struct Measured {
    tps: Vec<f64>,
    latency_ms: Vec<f64>,
    /// Latency over that of none in the same (interleaved) run, one per such run, with the run's
    /// number (counted over the file), so that variants can be compared run by run.
    gap_ms: Vec<(usize, f64)>,
    rows: f64,
    notifications: f64,
    bytes: f64,
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// Mean latency over none's: paired within interleaved runs where the results carry none's
/// latency of the same run, otherwise the difference of the means over the rounds.
fn overhead_ms(m: &Measured, none: &Measured) -> f64 {
    if m.gap_ms.len() == m.latency_ms.len() {
        mean(&m.gap_ms.iter().map(|&(_, gap)| gap).collect::<Vec<_>>())
    } else {
        mean(&m.latency_ms) - mean(&none.latency_ms)
    }
}

fn report(raw: &str, machine: &str, seconds: &str, rounds: &str) {
    let text = std::fs::read_to_string(raw).expect("raw results");
    let mut order: Vec<(String, u32, String)> = Vec::new();
    let mut runs: HashMap<(String, u32, String), Measured> = HashMap::new();
    let mut latencies: Vec<Vec<String>> = Vec::new();
    // An interleaved run's rows are written together, none's first.
    let mut interleaved_runs = 0;
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        if f[0] == "latency" {
            latencies.push(f[1..].iter().map(|s| s.to_string()).collect());
            continue;
        }
        let key = (f[0].to_string(), f[1].parse().unwrap(), f[2].to_string());
        if !runs.contains_key(&key) {
            order.push(key.clone());
        }
        let m = runs.entry(key).or_default();
        let num = |i: usize| f[i].parse::<f64>().unwrap_or(0.0);
        m.tps.push(num(4));
        m.latency_ms.push(num(5));
        m.rows += num(6) * num(7);
        m.notifications += num(8);
        m.bytes += num(9);
        if let Some(none_latency) = f.get(11).and_then(|s| s.parse::<f64>().ok()) {
            if f[2] == "none" {
                interleaved_runs += 1;
            }
            m.gap_ms.push((interleaved_runs, num(5) - none_latency));
        }
    }
    // Listed per workload and client count in the order they first ran, variants in a fixed
    // order whatever order they ran in.
    const VARIANTS: [&str; 6] = ["none", "ectowatch", "tcn", "pgwatch-inline", "pgwatch-worker", "pgwatch-compact"];
    let groups: Vec<(String, u32)> = order.iter().fold(Vec::new(), |mut groups, (w, c, _)| {
        if !groups.iter().any(|(gw, gc)| gw == w && gc == c) {
            groups.push((w.clone(), *c));
        }
        groups
    });
    order.sort_by_key(|(w, c, v)| {
        (
            groups.iter().position(|(gw, gc)| gw == w && gc == c),
            VARIANTS.iter().position(|known| known == v).unwrap_or(VARIANTS.len()),
        )
    });
    let rows_per_txn = |workload: &str| match workload {
        "W3" => 100.0,
        "W4" => 10000.0,
        _ => 1.0,
    };
    println!("# pgwatch benchmark\n");
    let interleaved = runs.values().any(|m| !m.gap_ms.is_empty());
    println!("Machine: {machine}. pgbench `-M prepared`, {seconds} s per run (W4: 5 statements), {rounds} rounds with the variants alternating (reversed every other round), each run from a checkpoint, autovacuum off; means over the rounds.");
    if interleaved {
        println!("W3 runs the variants interleaved, each transaction one of them at random, in two pgbench runs of {} s per round, one per delivery setting (inline: none, ectowatch, tcn, pgwatch-inline; worker: none, tcn, pgwatch-worker, pgwatch-compact); its overhead is against none of the same run and its TPS is 1 / latency.", seconds.parse::<u32>().unwrap_or(0) * 3);
    }
    println!();
    println!("| workload | clients | variant | TPS | rows/s | × none | overhead µs/row | notifications/row | bytes/row | bytes/notification |");
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    let get = |w: &str, c: u32, v: &str| runs.get(&(w.to_string(), c, v.to_string()));
    for (workload, clients, variant) in &order {
        let m = &runs[&(workload.clone(), *clients, variant.clone())];
        let none = get(workload, *clients, "none").expect("a none run");
        let tps = mean(&m.tps);
        let ratio = tps / mean(&none.tps);
        let overhead = if *clients == 1 {
            format!("{:.2}", overhead_ms(m, none) * 1000.0 / rows_per_txn(workload))
        } else {
            "".into()
        };
        let (per_row, bytes_per_row, per_notification) = if variant == "none" {
            ("".into(), "".into(), "".into())
        } else {
            (
                format!("{:.4}", m.notifications / m.rows.max(1.0)),
                format!("{:.1}", m.bytes / m.rows.max(1.0)),
                format!("{:.0}", m.bytes / m.notifications.max(1.0)),
            )
        };
        println!(
            "| {workload} | {clients} | {variant} | {tps:.0} | {:.0} | {ratio:.2} | {overhead} | {per_row} | {bytes_per_row} | {per_notification} |",
            tps * rows_per_txn(workload)
        );
    }
    let ms = |us: &str| us.parse::<f64>().unwrap_or(0.0) / 1000.0;
    if let Some(first) = latencies.first() {
        println!(
            "\n## Delivery latency, commit → listener, at {} transactions/s (half of `none`'s W1 rate at 1 client)\n",
            first[1]
        );
        println!("| variant | p50 ms | p99 ms | max ms | received / sent |");
        println!("|---|---:|---:|---:|---:|");
        for l in &latencies {
            println!("| {} | {:.2} | {:.2} | {:.2} | {} / {} |", l[0], ms(&l[2]), ms(&l[3]), ms(&l[4]), l[5], l[6]);
        }
    }
    println!("\n## Targets\n");
    let check = |ok: bool| if ok { "met" } else { "**missed**" };
    let tps_of = |w: &str, c: u32, v: &str| get(w, c, v).map_or(0.0, |m| mean(&m.tps));
    if get("W1", 32, "none").is_some() {
        let worker_w1 = tps_of("W1", 32, "pgwatch-worker");
        let vs_none = worker_w1 / tps_of("W1", 32, "none");
        let vs_ecto = worker_w1 / tps_of("W1", 32, "ectowatch");
        // Rounds run minutes apart on shared machines: each round's own ratio shows the spread.
        let rounds: Vec<String> = get("W1", 32, "pgwatch-worker")
            .zip(get("W1", 32, "none"))
            .map(|(worker, none)| worker.tps.iter().zip(&none.tps).map(|(w, n)| format!("{:.2}", w / n)).collect())
            .unwrap_or_default();
        println!("- W1, 32 clients: pgwatch-worker = {vs_none:.2} × none (target ≥ 0.90: {}; per round {}) and {vs_ecto:.1} × ectowatch (target ≥ 5: {})", check(vs_none >= 0.9), rounds.join(", "), check(vs_ecto >= 5.0));
    }
    let overhead = |v: &str| Some(overhead_ms(get("W3", 1, v)?, get("W3", 1, "none")?) * 10.0);
    // tcn's µs per row in the interleaved runs a variant's `gaps` come from (each run has its own
    // load: the inline run carries ectowatch's listener), and its single runs; pooled without
    // such runs.
    let tcn_beside = |gaps: &[(usize, f64)]| -> Option<(f64, Vec<f64>)> {
        let beside: Vec<f64> = get("W3", 1, "tcn")?
            .gap_ms
            .iter()
            .filter(|(run, _)| gaps.iter().any(|(same, _)| same == run))
            .map(|&(_, gap)| gap * 10.0)
            .collect();
        if beside.is_empty() {
            Some((overhead("tcn")?, Vec::new()))
        } else {
            Some((mean(&beside), beside))
        }
    };
    let per_run = |gaps: Vec<f64>| -> String {
        if gaps.is_empty() {
            String::new()
        } else {
            format!(" (per run {})", gaps.iter().map(|gap| format!("{gap:.2}")).collect::<Vec<_>>().join(", "))
        }
    };
    for v in ["pgwatch-inline", "pgwatch-worker", "pgwatch-compact"] {
        let Some(m) = get("W3", 1, v) else { continue };
        let (Some(o), Some((tcn, tcn_runs))) = (overhead(v), tcn_beside(&m.gap_ms)) else { continue };
        let runs = m.gap_ms.iter().map(|&(_, gap)| gap * 10.0).collect();
        println!(
            "- W3, 1 client: {v} {o:.2} µs/row{}, tcn in the same runs {tcn:.2} µs/row{} (target ≤ tcn and ≤ 0.5: {})",
            per_run(runs),
            per_run(tcn_runs),
            check(o <= tcn && o <= 0.5)
        );
    }
    for (v, target) in [("pgwatch-worker", 5.0), ("pgwatch-inline", 2.0)] {
        if let Some(l) = latencies.iter().find(|l| l[0] == v) {
            let p99 = ms(&l[3]);
            println!("- delivery latency {v}: p99 {p99:.2} ms (target ≤ {target} ms: {})", check(p99 <= target));
        }
    }
    for v in ["pgwatch-inline", "pgwatch-worker", "pgwatch-compact"] {
        if let Some(m) = get("W4", 1, v) {
            let per_notification = m.bytes / m.notifications.max(1.0);
            let per_row = m.bytes / m.rows.max(1.0);
            println!(
                "- W4 {v}: {per_notification:.0} payload bytes per notification (target ≥ 7000: {}), {per_row:.1} bytes per row (target ≤ 16: {})",
                check(per_notification >= 7000.0),
                check(per_row <= 16.0)
            );
        }
    }
}
