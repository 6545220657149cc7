//! The CLI's error contract: one line on stderr and a non-zero exit.

use std::process::Command;

mod common;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(common::EXE).args(args).output().expect("running raftgen");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_arguments_and_unreachable_servers_give_one_line_and_a_non_zero_exit() {
    let port = raftgen::cli::local::free_port().unwrap().to_string();
    let server = format!("http://127.0.0.1:{port}");
    let cases: [(&[&str], &str); 5] = [
        (&["submit"], "<PROMPT>"),
        (&["node", "--id", "x", "--listen", "127.0.0.1:1", "--data", "d"], "--id"),
        (&["frobnicate"], "frobnicate"),
        (&["status", "--server", &server], "cannot reach"),
        (&["jobs", "--server", &server, "--output", "yaml"], "yaml"),
    ];
    for (args, needle) in cases {
        let (code, stderr) = run(args);
        assert_ne!(code, 0, "{args:?} exited 0");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: ") && stderr.contains(needle), "{args:?}: {stderr}");
    }
    let (code, _) = run(&["--help"]);
    assert_eq!(code, 0);
}

/// What a newcomer types works: `--server host:port` (no scheme) and
/// `RAFTGEN_SERVER` reach the node; every flag of `node` and `submit` has
/// help; `image` fetches a finished job's PNG again; a node's log file
/// carries no colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_five_minutes_server_forms_help_and_plain_logs() {
    let dir = common::scratch();
    let cluster = common::start(&dir.path, 1, &["--executor", "test-pattern"]);
    cluster.wait_ready(1, 1, 1, std::time::Duration::from_secs(60)).await.unwrap();
    let bare = cluster.url(1).trim_start_matches("http://").to_string();
    let (code, stderr) = run(&["status", "--server", &bare]);
    assert_eq!(code, 0, "status --server {bare}: {stderr}");
    let out = Command::new(common::EXE).args(["status"]).env("RAFTGEN_SERVER", &bare).output().unwrap();
    assert!(out.status.success(), "RAFTGEN_SERVER={bare}: {}", String::from_utf8_lossy(&out.stderr));
    // The text status names the models the cluster serves, with their size.
    let text = String::from_utf8_lossy(&out.stdout);
    let models = text.lines().find(|l| l.starts_with("models: ")).unwrap_or_else(|| panic!("no models line:\n{text}"));
    assert!(models.contains(" px, ") && !models.contains("none yet"), "{text}");

    // A finished job's image, fetched again later by id, is the same file.
    let first = dir.path.join("first.png");
    let out = Command::new(common::EXE)
        .args(["submit", "a red circle", "--wait", "--output", "json", "--server", &bare, "--out"])
        .arg(&first)
        .output()
        .unwrap();
    assert!(out.status.success(), "submit --wait: {}", String::from_utf8_lossy(&out.stderr));
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = done["job"]["id"].as_str().unwrap();
    let again = dir.path.join("again.png");
    let out = Command::new(common::EXE).args(["image", id, "--server", &bare, "--out"]).arg(&again).output().unwrap();
    assert!(out.status.success(), "image: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&first).unwrap(), std::fs::read(&again).unwrap(), "image {id} differs from submit's");
    let unknown = "0".repeat(32);
    let (code, stderr) = run(&["image", &unknown, "--server", &bare]);
    assert_ne!(code, 0);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("404") && stderr.contains(&unknown), "{stderr}");

    for cmd in ["node", "submit"] {
        let out = Command::new(common::EXE).args([cmd, "--help"]).output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout).into_owned();
        // Long help puts a flag's description on the next line, indented;
        // a flag without one is followed by another flag, or only by
        // `[default: ..]` / `[env: ..]`.
        let lines: Vec<&str> = help.lines().collect();
        let bare_flags: Vec<&str> = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.trim_start().starts_with("--"))
            .filter(|(i, _)| {
                let next = lines.get(i + 1).copied().unwrap_or("");
                !(next.starts_with("          ") && !next.trim().is_empty() && !next.trim().starts_with('['))
            })
            .map(|(_, l)| l.trim())
            .collect();
        assert!(bare_flags.is_empty(), "raftgen {cmd} --help: flags without help: {bare_flags:?}");
    }

    let log = std::fs::read_to_string(dir.path.join("n1.log")).unwrap();
    assert!(!log.is_empty() && !log.contains('\u{1b}'), "colour codes in the node's log file");
}

/// `raftgen demo` on a port already taken says which at once (it used to
/// wait 60 s for a cluster that could never start) and leaves the data dir
/// of whatever holds the port alone.
#[test]
fn demo_on_a_taken_port_says_which_at_once() {
    let dir = common::scratch();
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let base = (port - 1).to_string();
    let data = dir.path.join("demo-data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("keep"), b"x").unwrap();
    let started = std::time::Instant::now();
    let (code, stderr) = run(&[
        "demo",
        "--nodes",
        "1",
        "--base-port",
        &base,
        "--dir",
        data.to_str().unwrap(),
        "--out",
        dir.path.join("out").to_str().unwrap(),
    ]);
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains(&format!("port {port}")) && stderr.contains("--base-port"), "{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "took {:?}", started.elapsed());
    assert!(data.join("keep").exists(), "the demo wiped a data dir while its port was taken");
}

/// A node whose port is taken says so and leaves no data dir behind.
#[test]
fn a_node_on_a_taken_port_leaves_no_data_dir() {
    let dir = common::scratch();
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = holder.local_addr().unwrap().to_string();
    let data = dir.path.join("data");
    let (code, stderr) = run(&[
        "node",
        "--id",
        "1",
        "--init",
        "--listen",
        &listen,
        "--data",
        data.to_str().unwrap(),
        "--executor",
        "none",
    ]);
    assert_ne!(code, 0, "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error: ")).collect();
    assert!(errors.len() == 1 && errors[0].contains(&listen), "{stderr}");
    assert!(!data.exists(), "a data dir was left behind");
}
