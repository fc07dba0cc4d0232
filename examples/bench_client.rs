//! The benchmark's client (see bench/run).
//!
//! `bench_client listen CONNINFO STATS_FILE CHANNEL...` drains the channels for the whole run and
//! rewrites STATS_FILE every 100 ms with cumulative `channel notifications bytes rows` lines.
//!
//! `bench_client latency CONNINFO TABLE CHANNEL RATE SECONDS` inserts one row per transaction into
//! TABLE at RATE per second, notes when each commit returned and when its key was received on
//! CHANNEL, and prints `p50 p99 max received sent` (latencies in microseconds).
//!
//! `bench_client cpu POSTMASTER_PID LISTENER_PID CLK_TCK [CLIENTS_PID BACKENDS_FILE]` prints the
//! CPU time used so far, in microseconds: `server worker listener walwriter backends clients`.
//! Server is the postmaster, its live children and the children that exited (pgbench's backends
//! exit between samples); worker is pgwatch's delivery workers alone; listener is the benchmark's
//! listening client; walwriter the WAL writer; backends the server processes whose pids
//! BACKENDS_FILE lists (W5's listening backends) and clients the process CLIENTS_PID (W5's
//! listening clients), 0 without them.
//!
//! `bench_client listeners CONNINFO N CHANNEL BACKENDS_FILE` opens N connections that LISTEN on
//! CHANNEL and read and discard what arrives, as a cheap client would, writes their backends'
//! pids to BACKENDS_FILE once all listen, and runs until killed.
//!
//! `bench_client replay CONNINFO CHANNEL AFTER_SEQ` reads a retained channel's log from AFTER_SEQ
//! to its end with `pgwatch.replay`, 1,000 payloads a call, and prints `payloads rows bytes
//! seconds`.
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
        Some("cpu") if args.len() == 4 || args.len() == 6 => {
            cpu(&args[1], &args[2], args[3].parse().unwrap(), args.get(4).zip(args.get(5)))
        }
        Some("listeners") if args.len() == 5 => listeners(&args[1], args[2].parse().unwrap(), &args[3], &args[4]),
        Some("replay") if args.len() == 4 => replay(&args[1], &args[2], args[3].parse().unwrap()),
        Some("report") if args.len() == 5 => report(&args[1], &args[2], &args[3], &args[4]),
        _ => {
            eprintln!("usage: bench_client listen CONNINFO STATS_FILE CHANNEL... | latency CONNINFO TABLE CHANNEL RATE SECONDS | cpu POSTMASTER_PID LISTENER_PID CLK_TCK [CLIENTS_PID BACKENDS_FILE] | listeners CONNINFO N CHANNEL BACKENDS_FILE | replay CONNINFO CHANNEL AFTER_SEQ | report RAW_TSV MACHINE SECONDS ROUNDS");
            std::process::exit(2);
        }
    }
}

/// A process's parent and its CPU ticks (user + system, own and exited children's), from
/// /proc/PID/stat; the command name may hold spaces and parentheses, so fields count from its end.
fn ticks(pid: &str) -> Option<(String, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let num = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // After the name: state, ppid, ... utime (14th field of the line), stime, cutime, cstime.
    Some((fields.get(1)?.to_string(), num(11) + num(12), num(13) + num(14)))
}

fn cpu(postmaster: &str, listener: &str, clk_tck: u64, w5: Option<(&String, &String)>) {
    let (_, own, exited) = ticks(postmaster).expect("the postmaster's /proc entry");
    let backends: Vec<String> = w5
        .and_then(|(_, file)| std::fs::read_to_string(file).ok())
        .map(|text| text.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    let (mut server, mut worker, mut walwriter, mut listening) = (own + exited, 0, 0, 0);
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        let Some((parent, own, _)) = ticks(&pid) else { continue };
        if parent != postmaster {
            continue;
        }
        server += own;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("pgwatch delivery") {
            worker += own;
        } else if cmdline.contains("walwriter") {
            walwriter += own;
        } else if backends.contains(&pid) {
            listening += own;
        }
    }
    let listener = ticks(listener).map_or(0, |(_, own, _)| own);
    let clients = w5.and_then(|(pid, _)| ticks(pid)).map_or(0, |(_, own, _)| own);
    let us = |ticks: u64| ticks * 1_000_000 / clk_tck;
    println!("{} {} {} {} {} {}", us(server), us(worker), us(listener), us(walwriter), us(listening), us(clients));
}

/// W5's listening connections: each reads and discards what arrives, on a thread of its own.
fn listeners(conninfo: &str, n: usize, channel: &str, backends_file: &str) {
    let (pids_tx, pids_rx) = mpsc::channel::<i32>();
    for _ in 0..n {
        let (conninfo, channel, pids_tx) = (conninfo.to_string(), channel.to_string(), pids_tx.clone());
        std::thread::spawn(move || {
            let mut client = listening(&conninfo, &[channel]);
            pids_tx.send(client.query_one("SELECT pg_backend_pid()", &[]).expect("pid").get(0)).expect("send");
            let mut notifications = client.notifications();
            let mut all = notifications.blocking_iter();
            while let Ok(Some(_)) = all.next() {}
        });
    }
    drop(pids_tx);
    let pids: Vec<String> = pids_rx.iter().take(n).map(|pid| pid.to_string()).collect();
    let partial = format!("{backends_file}.tmp");
    std::fs::write(&partial, pids.join("\n") + "\n").expect("write pids");
    std::fs::rename(&partial, backends_file).expect("write pids");
    loop {
        std::thread::park();
    }
}

fn replay(conninfo: &str, channel: &str, mut after: i64) {
    let mut client = Client::connect(conninfo, NoTls).expect("connect");
    let statement = client.prepare("SELECT seq, payload FROM pgwatch.replay($1, $2, 1000)").expect("prepare");
    let (mut payloads, mut rows, mut bytes) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    loop {
        let page = client.query(&statement, &[&channel, &after]).expect("replay");
        let Some(last) = page.last() else { break };
        after = last.get(0);
        for row in &page {
            let payload: &str = row.get(1);
            payloads += 1;
            bytes += payload.len() as u64;
            rows += row_count(payload);
        }
    }
    println!("{payloads} {rows} {bytes} {:.3}", start.elapsed().as_secs_f64());
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

/// CPU time of one run (see `cpu`), in microseconds, with what it bought.
#[derive(Clone, Copy)]
struct Cpu {
    round: u32,
    server_us: f64,
    worker_us: f64,
    txns: f64,
    notifications: f64,
    walwriter_us: f64,
    backends_us: f64,
    clients_us: f64,
}

impl Cpu {
    fn per_txn(&self) -> f64 {
        self.server_us / self.txns.max(1.0)
    }

    fn worker_per_notification(&self) -> f64 {
        self.worker_us / self.notifications.max(1.0)
    }
}

/// The median and the range, as "median (min–max)" would show them.
fn median_and_range(mut values: Vec<f64>) -> Option<(f64, f64, f64)> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 };
    Some((median, values[0], values[n - 1]))
}

/// Per round, `f` of a variant's run over `f` of another's in the same round.
fn per_round_ratios(a: &[Cpu], b: &[Cpu], f: impl Fn(&Cpu) -> f64) -> Vec<f64> {
    a.iter().filter_map(|x| b.iter().find(|y| y.round == x.round).map(|y| f(x) / f(y))).collect()
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
    let mut cpus: HashMap<(String, u32, String), Vec<Cpu>> = HashMap::new();
    let mut feed: Vec<Vec<String>> = Vec::new();
    // An interleaved run's rows are written together, none's first.
    let mut interleaved_runs = 0;
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        if f[0] == "latency" {
            latencies.push(f[1..].iter().map(|s| s.to_string()).collect());
            continue;
        }
        if f[0] == "cpu" {
            let num = |i: usize| f[i].parse::<f64>().unwrap_or(0.0);
            cpus.entry((f[1].to_string(), f[2].parse().unwrap(), f[3].to_string())).or_default().push(Cpu {
                round: f[4].parse().unwrap(),
                server_us: num(5),
                worker_us: num(6),
                txns: num(8),
                notifications: num(9),
                walwriter_us: f.get(10).map_or(0.0, |_| num(10)),
                backends_us: f.get(11).map_or(0.0, |_| num(11)),
                clients_us: f.get(12).map_or(0.0, |_| num(12)),
            });
            continue;
        }
        if ["logbytes", "replay", "logsize", "logsize_tps"].contains(&f[0]) {
            feed.push(f.iter().map(|s| s.to_string()).collect());
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
    const VARIANTS: [&str; 8] = [
        "none",
        "ectowatch",
        "tcn",
        "pgwatch-inline",
        "pgwatch-worker",
        "pgwatch-patient",
        "pgwatch-retain",
        "pgwatch-compact",
    ];
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
    if !cpus.is_empty() {
        println!("Server CPU is the CPU time of every server process (writers' backends, the listener's backend, pgwatch's worker, WAL writer and the rest) over a run and its 1.5 s drain, per committed transaction: the median over the rounds, and × none as the median of each round's ratio.");
    }
    println!();
    println!("| workload | clients | variant | TPS | rows/s | × none | server CPU µs/txn | CPU × none | overhead µs/row | notifications/row | bytes/row | bytes/notification |");
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let get = |w: &str, c: u32, v: &str| runs.get(&(w.to_string(), c, v.to_string()));
    let cpu_of = |w: &str, c: u32, v: &str| cpus.get(&(w.to_string(), c, v.to_string()));
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
        let (cpu, cpu_ratio) = match (cpu_of(workload, *clients, variant), cpu_of(workload, *clients, "none")) {
            (Some(c), Some(none)) => (
                median_and_range(c.iter().map(Cpu::per_txn).collect()).map_or(String::new(), |m| format!("{:.1}", m.0)),
                median_and_range(per_round_ratios(c, none, Cpu::per_txn))
                    .map_or(String::new(), |m| format!("{:.2}", m.0)),
            ),
            _ => (String::new(), String::new()),
        };
        println!(
            "| {workload} | {clients} | {variant} | {tps:.0} | {:.0} | {ratio:.2} | {cpu} | {cpu_ratio} | {overhead} | {per_row} | {bytes_per_row} | {per_notification} |",
            tps * rows_per_txn(workload)
        );
    }
    let w5: Vec<&(String, u32, String)> = order.iter().filter(|(w, _, _)| w.starts_with("W5")).collect();
    if !w5.is_empty() {
        println!("\n## W5: where the server's CPU goes with listeners\n");
        println!("W5-N is W1 with N more connections listening on the variant's channel (none: on a channel nobody notifies), each reading and discarding what arrives. Per committed transaction, medians over the rounds: writers is every other server process (the writers' backends, the benchmark listener's backend, the rest).\n");
        println!("| workload | clients | variant | TPS | × none | × tcn | server CPU µs/txn | CPU × none | writers | listening backends | worker | WAL writer | listening clients | notifications/row |");
        println!("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (workload, clients, variant) in w5 {
            let Some(c) = cpu_of(workload, *clients, variant) else { continue };
            let m = &runs[&(workload.clone(), *clients, variant.clone())];
            let tps = mean(&m.tps);
            let vs = |other: &str| {
                get(workload, *clients, other).map_or(String::new(), |o| format!("{:.2}", tps / mean(&o.tps)))
            };
            let med = |f: &dyn Fn(&Cpu) -> f64| {
                median_and_range(c.iter().map(|x| f(x) / x.txns.max(1.0)).collect()).map_or(0.0, |m| m.0)
            };
            let writers = med(&|x| x.server_us - x.worker_us - x.walwriter_us - x.backends_us);
            let ratio = cpu_of(workload, *clients, "none")
                .and_then(|none| median_and_range(per_round_ratios(c, none, Cpu::per_txn)))
                .map_or(String::new(), |m| format!("{:.2}", m.0));
            let per_row =
                if variant == "none" { String::new() } else { format!("{:.4}", m.notifications / m.rows.max(1.0)) };
            println!(
                "| {workload} | {clients} | {variant} | {tps:.0} | {} | {} | {:.1} | {ratio} | {writers:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {per_row} |",
                vs("none"),
                vs("tcn"),
                med(&|x| x.server_us),
                med(&|x| x.backends_us),
                med(&|x| x.worker_us),
                med(&|x| x.walwriter_us),
                med(&|x| x.clients_us)
            );
        }
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
        // A run of some variants only (bench/run --variants) may have no ectowatch.
        let vs_ecto = get("W1", 32, "ectowatch").map_or(String::new(), |_| {
            format!(" and {:.1} × ectowatch (target ≥ 5: {})", vs_ecto, check(vs_ecto >= 5.0))
        });
        println!(
            "- W1, 32 clients: pgwatch-worker = {vs_none:.2} × none (target ≥ 0.90: {}; per round {}){vs_ecto}",
            check(vs_none >= 0.9),
            rounds.join(", ")
        );
    }
    let range = |(median, min, max): (f64, f64, f64)| format!("{median:.2} (rounds {min:.2}–{max:.2})");
    if let (Some(retain), Some(none)) = (get("W1", 32, "pgwatch-retain"), get("W1", 32, "none")) {
        let vs_none = mean(&retain.tps) / mean(&none.tps);
        let rounds: Vec<String> = retain.tps.iter().zip(&none.tps).map(|(r, n)| format!("{:.2}", r / n)).collect();
        println!(
            "- W1, 32 clients: pgwatch-retain = {vs_none:.2} × none (target ≥ 0.90: {}; per round {})",
            check(vs_none >= 0.9),
            rounds.join(", ")
        );
    }
    if let (Some(retain), Some(worker)) = (cpu_of("W1", 32, "pgwatch-retain"), cpu_of("W1", 32, "pgwatch-worker")) {
        if let Some(m) = median_and_range(per_round_ratios(retain, worker, Cpu::per_txn)) {
            println!("- W1, 32 clients: pgwatch-retain's server CPU per transaction = {} × pgwatch-worker's (target ≤ 1.05: {})", range(m), check(m.0 <= 1.05));
        }
        let extra: Vec<f64> = retain
            .iter()
            .filter_map(|r| {
                worker
                    .iter()
                    .find(|w| w.round == r.round)
                    .map(|w| r.worker_per_notification() - w.worker_per_notification())
            })
            .collect();
        if let (Some(m), Some(r), Some(w)) = (
            median_and_range(extra),
            median_and_range(retain.iter().map(Cpu::worker_per_notification).collect()),
            median_and_range(worker.iter().map(Cpu::worker_per_notification).collect()),
        ) {
            println!("- W1, 32 clients: the worker's CPU per notification (one batch sends one per channel): pgwatch-retain {:.0} µs, pgwatch-worker {:.0} µs; extra per batch for the log {} µs", r.0, w.0, range(m));
        }
    }
    // Server CPU per transaction against none's, and TPS against tcn's (the targets).
    let cpu_vs_none = |w: &str, c: u32, v: &str| {
        median_and_range(per_round_ratios(cpu_of(w, c, v)?, cpu_of(w, c, "none")?, Cpu::per_txn))
    };
    // pgwatch-patient is pgwatch-worker with `pgwatch.busy_batch_delay = 50ms`, what a deployment
    // with many listeners can choose; the targets are pgwatch-worker's, at the defaults.
    for variant in ["pgwatch-worker", "pgwatch-patient"] {
        for (workload, clients, cpu_target, tcn_target) in [("W5-20", 8, 1.25, 5.0), ("W5-100", 8, 1.40, 10.0)] {
            if let Some(m) = cpu_vs_none(workload, clients, variant) {
                let vs_tcn = get(workload, clients, "tcn").map_or("no tcn run".to_string(), |tcn| {
                    let vs_tcn = tps_of(workload, clients, variant) / mean(&tcn.tps);
                    format!("{vs_tcn:.1} × tcn's (target ≥ {tcn_target}: {})", check(vs_tcn >= tcn_target))
                });
                println!(
                    "- {workload}, {clients} clients: {variant}'s server CPU per transaction = {} × none's (target ≤ {cpu_target:.2}: {}), TPS {vs_tcn}, {:.2} × none's",
                    range(m),
                    check(m.0 <= cpu_target),
                    tps_of(workload, clients, variant) / tps_of(workload, clients, "none")
                );
            }
        }
    }
    for (clients, target) in [(32, 1.10), (1, 1.25)] {
        if let Some(m) = cpu_vs_none("W1", clients, "pgwatch-worker") {
            println!("- W1, {clients} client(s): pgwatch-worker's server CPU per transaction = {} × none's (target ≤ {target:.2}: {})", range(m), check(m.0 <= target));
        }
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
    if feed.is_empty() {
        return;
    }
    println!("\n## Resumable feed (pgwatch-retain)\n");
    let num = |s: &str| s.parse::<f64>().unwrap_or(0.0);
    let mb = |bytes: f64| bytes / 1_048_576.0;
    for f in &feed {
        match f[0].as_str() {
            "logbytes" => {
                let (payloads, bytes, disk, rows) = (num(&f[1]), num(&f[2]), num(&f[3]), num(&f[4]));
                println!(
                    "- Log after the W1 runs (retain 1 hour, nothing pruned): {payloads:.0} payloads for {rows:.0} rows; {:.1} payload bytes per row, {:.1} bytes per row on disk (heap, TOAST and index), {:.1} MiB",
                    bytes / rows.max(1.0),
                    disk / rows.max(1.0),
                    mb(disk)
                );
            }
            "replay" => {
                let (payloads, rows, bytes, secs) = (num(&f[1]), num(&f[2]), num(&f[3]), num(&f[4]));
                println!(
                    "- Replay of a {rows:.0}-row backlog (100-row transactions at 8 clients, folded by the worker): {payloads:.0} payloads, {:.1} MiB in {secs:.2} s by one client, 1,000 payloads a call: {:.0} payloads/s, {:.0} rows/s",
                    mb(bytes),
                    payloads / secs.max(1e-9),
                    rows / secs.max(1e-9)
                );
            }
            _ => {}
        }
    }
    let sizes: Vec<&Vec<String>> = feed.iter().filter(|f| f[0] == "logsize").collect();
    if let Some(last) = sizes.last() {
        let tps = feed.iter().find(|f| f[0] == "logsize_tps").map_or(0.0, |f| num(&f[1]));
        let max = sizes.iter().map(|f| num(&f[2])).fold(0.0, f64::max);
        println!(
            "- Log on disk while W1 ran at 32 clients ({tps:.0} TPS) for {} s with retain 1 minute: {:.1} MiB at the end, at most {:.1} MiB; every 30 s: {}; prunes skipped {}, cut short {}",
            last[1],
            mb(num(&last[2])),
            mb(max),
            sizes.iter().map(|f| format!("{:.0}", mb(num(&f[2])))).collect::<Vec<_>>().join(", "),
            last[5],
            last.get(6).map_or("0", |s| s.as_str())
        );
    }
}
