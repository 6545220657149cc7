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
