//! End-to-end tests of `parley drill`: the real binary starts a three-node cluster (on the
//! embedded store, and on Postgres with a database restart among the faults), runs simulated
//! clients while it kills nodes and freezes one, and its JSON report must
//! show that every invariant held (nothing acked lost, duplicated, reordered or undelivered, no
//! stale-epoch write, one owner per shard) and that the faults really happened.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use parley_tests::node::run_json_report;
use parley_tests::postgres::TestPostgres;
use parley_tests::{free_port, TempDir};

/// The whole drill: three node startups, 20 s of sending, a fault cycle that may straddle the end,
/// the grace period, the checks and the drain. Several times what it needs on an idle machine, so
/// that only a hung drill trips it.
const DRILL_TIMEOUT: Duration = Duration::from_secs(300);

/// Report keys that must be 0 when the cluster kept its promises.
const ZERO_KEYS: &[&str] = &[
    "acked_lost",
    "duplicates",
    "order_violations",
    "stale_epoch_writes",
    "undelivered",
    "unverified_conversations",
    "lease_mismatches",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_keeps_every_invariant_through_kills_and_a_freeze() {
    let dir = TempDir::new("parley-drill");
    let storage = "[storage]\nkind = \"embedded\"\ndir = \"data\"\n";
    // 20 clients for 20 s; a fault every 5 s where every third is a freeze: kill, kill, freeze.
    let report = run_drill(dir.path(), storage, &["--freeze-every", "3"], None).await;
    let mut problems = invariant_problems(&report);
    let kills = report["kills"].as_u64().unwrap_or(0);
    if kills < 2 {
        problems.push(format!("kills = {kills}, expected at least 2"));
    }
    if report["freezes"].as_u64() != Some(1) {
        problems.push(format!("freezes = {}, expected 1", report["freezes"]));
    }
    finish(dir.path(), &report, problems);
}

/// The same drill on Postgres, where every second fault restarts the database server (a private
/// one: the shared server of the test run must not go down under other tests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_on_postgres_survives_a_database_restart() {
    let dir = TempDir::new("parley-drill-pg");
    let mut pg = TestPostgres::start_private().await.expect("private postgres");
    let restart = pg.restart_command().expect("a private server can be restarted");
    let storage = format!("[storage]\nkind = \"postgres\"\npostgres_url = \"{}\"\n", pg.url());
    // Faults every 5 s: kill, Postgres restart, kill.
    let extra = ["--postgres-every", "2", "--postgres-restart-cmd", restart.as_str()];
    let report = run_drill(dir.path(), &storage, &extra, Some(&mut pg)).await;
    let mut problems = invariant_problems(&report);
    if report["kills"].as_u64().unwrap_or(0) < 1 {
        problems.push(format!("kills = {}, expected at least 1", report["kills"]));
    }
    if report["postgres_restarts"].as_u64().unwrap_or(0) < 1 {
        problems.push(format!("postgres_restarts = {}, expected at least 1", report["postgres_restarts"]));
    }
    finish(dir.path(), &report, problems);
}

/// Run `parley drill` on a three-node cluster with `storage` (a TOML `[storage]` table): 20
/// clients for 20 s, a fault every 5 s, plus `extra` arguments. While it runs, `pg` (if given) is
/// revived whenever the drill's restart command stops it. Returns the JSON report.
async fn run_drill(dir: &Path, storage: &str, extra: &[&str], pg: Option<&mut TestPostgres>) -> serde_json::Value {
    let config = dir.join("cluster.toml");
    std::fs::write(&config, three_node_config(storage)).expect("write config");
    let logs = dir.join("logs");
    let mut cmd = Command::new(parley_tests::node::parley_bin().expect("parley binary"));
    cmd.arg("drill").arg("--config").arg(&config).arg("--log-dir").arg(&logs);
    cmd.args(["--clients", "20", "--duration-secs", "20", "--kill-every-secs", "5", "--json"]);
    cmd.args(extra);
    let (status, mut report) = match run_json_report(cmd, dir, "drill", DRILL_TIMEOUT, pg).await {
        Ok(done) => done,
        Err(why) => fail(dir, &why),
    };
    report["exit_success"] = serde_json::Value::Bool(status.success());
    report
}

/// Every invariant the drill checks, plus evidence that it really ran and really faulted.
fn invariant_problems(report: &serde_json::Value) -> Vec<String> {
    let mut problems = Vec::new();
    for key in ZERO_KEYS {
        if report[*key].as_u64() != Some(0) {
            problems.push(format!("{key} = {}", report[*key]));
        }
    }
    if report["max_owners_per_shard"].as_u64().is_none_or(|n| n > 1) {
        problems.push(format!("max_owners_per_shard = {}", report["max_owners_per_shard"]));
    }
    let kills = report["kills"].as_u64().unwrap_or(0);
    let failovers = report["failover_ms"].as_array().map_or(0, Vec::len) as u64;
    if failovers != kills {
        problems.push(format!("{failovers} failover measurements for {kills} kills"));
    }
    if report["acked"].as_u64().unwrap_or(0) == 0 {
        problems.push("no message was acked".to_string());
    }
    if report["exit_success"] != serde_json::Value::Bool(true) {
        problems.push("the drill exited with a failure".to_string());
    }
    problems
}

fn finish(dir: &Path, report: &serde_json::Value, problems: Vec<String>) {
    if !problems.is_empty() {
        fail(dir, &format!("{}\nreport: {report}", problems.join("\n")));
    }
    eprintln!("drill report: {report}");
}

/// Three nodes on free loopback ports, the given storage, and few
/// shards (startup is faster; the behaviour does not depend on the count).
fn three_node_config(storage: &str) -> String {
    let mut toml = format!("[cluster]\nshard_count = 8\nlease_ttl_ms = 3000\nrenew_interval_ms = 1000\n\n{storage}");
    for i in 1..=3 {
        toml.push_str(&format!(
            "\n[[node]]\nname = \"n{i}\"\nhttp = \"127.0.0.1:{}\"\ncluster = \"127.0.0.1:{}\"\n",
            free_port(),
            free_port()
        ));
    }
    toml
}

/// Fail with the drill's stderr and the tail of every node log, which is where the evidence is.
fn fail(dir: &Path, why: &str) -> ! {
    let mut text = format!(
        "{why}\n\n--- drill stderr ---\n{}",
        std::fs::read_to_string(dir.join("drill.err")).unwrap_or_default()
    );
    let mut logs: Vec<_> =
        std::fs::read_dir(dir.join("logs")).into_iter().flatten().flatten().map(|e| e.path()).collect();
    logs.sort();
    for log in logs {
        let content = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = content.lines().collect();
        text.push_str(&format!("\n--- {} (last 40 lines) ---\n", log.display()));
        text.push_str(&lines[lines.len().saturating_sub(40)..].join("\n"));
    }
    panic!("{text}");
}
