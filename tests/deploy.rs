//! The deployment files (`Dockerfile`, `deploy/**`) against the binary they
//! run and the `/metrics` contract:
//!
//! - every YAML document under `deploy/` and the Grafana dashboard parse;
//! - every raftgen command line they hold (the compose services, the
//!   StatefulSet's entrypoint and preStop scripts, run here with stand-ins for
//!   `raftgen` and `curl`, and the systemd unit with its example environment)
//!   uses only flags of `raftgen node --help` / `raftgen leave --help`, and the
//!   real binary accepts it: each node command line starts a node, moved onto
//!   loopback and a scratch directory but otherwise as written;
//!   the ports, addresses and paths agree with `--listen`, `--advertise`,
//!   `--join` and `--data`;
//! - every metric the alerts, the dashboard and the autoscaler name is in the
//!   contract below, and the contract is what a node really exports;
//! - `alerts.yml` has the five seed alerts with their thresholds (and, where
//!   promtool is installed, passes `promtool test rules`);
//! - the Dockerfile builds in two stages from a context that holds every
//!   workspace member and embedded file;
//! - docs/deploy.md names every file under deploy/.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value as Json;
use serde_norway::Value as Yaml;

const EXE: &str = env!("CARGO_BIN_EXE_raftgen");

/// The `/metrics` contract: every family a node exports (histograms also as
/// `_bucket`, `_sum` and `_count`). The alerts, the dashboard and the HPA use
/// only these; `metrics_contract_is_what_a_node_exports` checks a node
/// exports exactly these. Renaming a metric means renaming it here and in
/// deploy/ (this test names each place that still uses the old name).
const METRICS: &[&str] = &[
    "raftgen_jobs_submitted_total",
    "raftgen_jobs_succeeded_total",
    "raftgen_jobs_failed_total",
    "raftgen_jobs_cancelled_total",
    "raftgen_cache_hits_total",
    "raftgen_queue_depth",
    "raftgen_queue_depth_total",
    "raftgen_job_queue_wait_seconds",
    "raftgen_job_run_seconds",
    "raftgen_job_latency_seconds",
    "raftgen_executor_slots",
    "raftgen_executor_info",
    "raftgen_executor_busy_slots",
    "raftgen_images_generated_total",
    "raftgen_images_per_second",
    "raftgen_raft_term",
    "raftgen_raft_leader_id",
    "raftgen_raft_is_leader",
    "raftgen_raft_commit_index",
    "raftgen_raft_applied_index",
    "raftgen_raft_apply_lag",
    "raftgen_raft_membership_size",
    "raftgen_raft_voters",
    "raftgen_disk_bytes",
    "raftgen_model_load_seconds",
    "raftgen_build_info",
    "raftgen_peer_sent_bytes_total",
    "raftgen_snapshot_bytes",
    "raftgen_results_retained",
    "raftgen_results_retained_bytes",
    "raftgen_results_under_replicated",
    "raftgen_results_without_copy",
    "raftgen_result_store_bytes",
    "raftgen_result_store_images",
    "raftgen_result_cache_bytes",
    "raftgen_result_reads_total",
    "raftgen_result_transfer_bytes_total",
];

const HISTOGRAMS: &[&str] =
    &["raftgen_job_queue_wait_seconds", "raftgen_job_run_seconds", "raftgen_job_latency_seconds"];

/// Exported only by CUDA builds, which are not shipped yet: the rules and
/// panels over them must say so, and stay silent until then.
const CUDA_ONLY: &[&str] =
    &["raftgen_gpu_utilization_ratio", "raftgen_gpu_memory_used_bytes", "raftgen_gpu_memory_total_bytes"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// Every document of a YAML file.
fn yaml_docs(text: &str, what: &str) -> Vec<Yaml> {
    serde_norway::Deserializer::from_str(text)
        .map(|doc| Yaml::deserialize(doc).unwrap_or_else(|e| panic!("{what}: {e}")))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn yaml(rel: &str) -> Vec<Yaml> {
    yaml_docs(&read(rel), rel)
}

/// The document of `kind` named `name` among the files under deploy/k8s/.
fn k8s(kind: &str, name: &str) -> Yaml {
    let mut found = Vec::new();
    for file in files_under("deploy/k8s") {
        if !is_yaml(&file) {
            continue;
        }
        for doc in yaml(&file) {
            if s(&doc["kind"]) == kind && s(&doc["metadata"]["name"]) == name {
                found.push(doc);
            }
        }
    }
    assert_eq!(found.len(), 1, "expected one {kind} named {name} under deploy/k8s");
    found.remove(0)
}

/// A YAML scalar as text ("" for anything else).
fn s(v: &Yaml) -> String {
    match v {
        Yaml::String(t) => t.clone(),
        Yaml::Number(n) => n.to_string(),
        Yaml::Bool(b) => b.to_string(),
        _ => String::new(),
    }
}

fn seq(v: &Yaml) -> Vec<Yaml> {
    v.as_sequence().cloned().unwrap_or_default()
}

fn is_yaml(path: &str) -> bool {
    path.ends_with(".yml") || path.ends_with(".yaml")
}

/// Files under a directory of the repository, as paths relative to its root.
fn files_under(rel: &str) -> Vec<String> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        let mut entries: Vec<_> =
            std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).flatten().collect();
        entries.sort_by_key(|e| e.path());
        for e in entries {
            let p = e.path();
            if p.is_dir() {
                walk(&p, base, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().to_string_lossy().replace('\\', "/"));
            }
        }
    }
    let mut out = Vec::new();
    walk(&root().join(rel), &root(), &mut out);
    out
}

// ---------------------------------------------------------------------------
// The binary's flags

fn help(sub: &str) -> String {
    let out = Command::new(EXE).args([sub, "--help"]).output().expect("running raftgen");
    assert!(out.status.success(), "raftgen {sub} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

/// The long flags a help text lists.
fn flags_of(help: &str) -> BTreeSet<String> {
    help.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.split('=').next().unwrap().to_string())
        .collect()
}

/// The default a help text gives `flag`.
fn help_default(help: &str, flag: &str) -> String {
    let at = help.find(&format!("{flag} ")).unwrap_or_else(|| panic!("{flag} is not in the help"));
    let rest = &help[at..];
    let d = rest.find("[default: ").unwrap_or_else(|| panic!("{flag} has no default"));
    rest[d + 10..].split(']').next().unwrap().to_string()
}

/// `--flag=value` written as two arguments, so every check sees one shape.
fn normalize(argv: &[String]) -> Vec<String> {
    argv.iter()
        .flat_map(|a| match a.split_once('=') {
            Some((flag, value)) if a.starts_with("--") => vec![flag.to_string(), value.to_string()],
            _ => vec![a.clone()],
        })
        .collect()
}

/// The value after `flag`, if present.
fn arg(argv: &[String], flag: &str) -> Option<String> {
    argv.iter()
        .position(|a| a == flag)
        .map(|i| argv.get(i + 1).unwrap_or_else(|| panic!("{flag} without a value")).clone())
}

fn assert_flags_exist(what: &str, sub: &str, argv: &[String], known: &BTreeSet<String>) {
    assert_eq!(argv.first().map(String::as_str), Some(sub), "{what}: not a `raftgen {sub}` command line: {argv:?}");
    for a in argv.iter().filter(|a| a.starts_with("--")) {
        assert!(known.contains(a), "{what}: `{a}` is not a flag of `raftgen {sub}` (see `raftgen {sub} --help`)");
    }
}

fn listen_port(what: &str, argv: &[String]) -> u16 {
    let listen = arg(argv, "--listen").unwrap_or_else(|| panic!("{what}: no --listen"));
    let addr: SocketAddr = listen.parse().unwrap_or_else(|e| panic!("{what}: --listen {listen}: {e}"));
    addr.port()
}

fn port_of(what: &str, host_port: &str) -> u16 {
    let p = host_port.trim_end_matches('/').rsplit(':').next().unwrap();
    p.parse().unwrap_or_else(|_| panic!("{what}: no port in {host_port}"))
}

// ---------------------------------------------------------------------------
// Running the binary

fn free_port() -> u16 {
    raftgen::cli::local::free_port().expect("a free port")
}

/// A minimal HTTP/1.0 client for loopback: (status, body).
fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// A node process, killed when dropped.
struct Node {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Starts `raftgen` with a node command line from a deployment file, moved
/// onto this machine: `--listen` on a free loopback port, `--data` and
/// `--models-dir` in a scratch directory, `--join` at a closed loopback port.
/// Every other argument goes as written. Returns once `/healthz` answers.
fn start_as_written(what: &str, argv: &[String]) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let closed = free_port();
    let mut args = Vec::new();
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        args.push(a.clone());
        // What is replaced must have been valid as written.
        let written = argv.iter().skip_while(|x| *x != a).nth(1).cloned().unwrap_or_default();
        match a.as_str() {
            "--listen" => {
                let parsed: Result<SocketAddr, _> = written.parse();
                assert!(parsed.is_ok(), "{what}: --listen {written}: not an IP:port");
            }
            "--join" => {
                let port = written.strip_prefix("http://").and_then(|r| r.rsplit_once(':')).map(|(_, p)| p);
                assert!(
                    port.and_then(|p| p.parse::<u16>().ok()).is_some(),
                    "{what}: --join {written}: not http://HOST:PORT"
                );
            }
            _ => {}
        }
        let replaced = match a.as_str() {
            "--listen" => Some(format!("127.0.0.1:{port}")),
            "--data" => Some(dir.path().join("data").display().to_string()),
            "--models-dir" => {
                let models = dir.path().join("models");
                std::fs::create_dir_all(&models).unwrap();
                Some(models.display().to_string())
            }
            "--join" => Some(format!("http://127.0.0.1:{closed}")),
            _ => None,
        };
        if let Some(value) = replaced {
            it.next().unwrap_or_else(|| panic!("{what}: {a} without a value"));
            args.push(value);
        }
    }
    let log = dir.path().join("node.log");
    let child = Command::new(EXE)
        .args(&args)
        .env("RAFTGEN_CLUSTER_SECRET", "deploy-test-secret")
        .env("RAFTGEN_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("starting raftgen");
    let mut node = Node { child, port, log, _dir: dir };
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(status) = node.child.try_wait().unwrap() {
            panic!("{what}: `raftgen {}` exited ({status}):\n{}", args.join(" "), node.log());
        }
        if matches!(http(port, "GET", "/healthz", None), Ok((200, _))) {
            return node;
        }
        assert!(Instant::now() < deadline, "{what}: no /healthz after 90 s:\n{}", node.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `raftgen leave` as written, but against a closed loopback port: the
/// arguments must parse (exit 1, "cannot reach"), not be refused (exit 2).
fn assert_leave_parses(what: &str, argv: &[String]) {
    let mut args = argv.to_vec();
    if let Some(i) = args.iter().position(|a| a == "--server") {
        args[i + 1] = format!("http://127.0.0.1:{}", free_port());
    }
    let out = Command::new(EXE).args(&args).env("RAFTGEN_CLUSTER_SECRET", "x").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{what}: `raftgen {}`: {stderr}", args.join(" "));
    assert!(stderr.contains("cannot reach"), "{what}: {stderr}");
}

// ---------------------------------------------------------------------------
// The command lines in the deployment files

/// A compose service that runs a node: its name, argv and definition.
fn compose_nodes() -> Vec<(String, Vec<String>, Yaml)> {
    let doc = yaml("deploy/docker-compose.yml").remove(0);
    let mut out = Vec::new();
    for (name, svc) in doc["services"].as_mapping().expect("services") {
        let argv: Vec<String> = seq(&svc["command"]).iter().map(s).collect();
        if argv.first().map(String::as_str) == Some("node") {
            out.push((s(name), normalize(&argv), svc.clone()));
        }
    }
    out
}

/// Stand-ins for the programs the StatefulSet's scripts call: `raftgen`
/// records its arguments; `curl` answers as `STUB_CURL` says; `sleep` returns.
struct Stubs {
    dir: tempfile::TempDir,
}

impl Stubs {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, body: &str| {
            use std::os::unix::fs::PermissionsExt;
            let p = dir.path().join(name);
            std::fs::write(&p, format!("#!/bin/sh\n{body}")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        write(
            "raftgen",
            r#"{ for a in "$@"; do printf '%s\n' "$a"; done; echo '<end>'; } >> "$STUB_DIR/raftgen.calls"
n=$(grep -c '<end>' "$STUB_DIR/raftgen.calls")
if [ "$n" -le "${STUB_RAFTGEN_FAILS:-0}" ]; then echo "error: ${STUB_RAFTGEN_ERROR:-409 Conflict: membership: in progress}" >&2; exit 1; fi
echo "node left the cluster (drained: true)"
"#,
        );
        write(
            "curl",
            r#"printf '%s\n' "$*" >> "$STUB_DIR/curl.calls"
case "$STUB_CURL" in
  fail) exit 7 ;;
  ok) exit 0 ;;
  scale:0) printf '{"kind":"Scale","apiVersion":"autoscaling/v1","metadata":{"name":"raftgen"},"spec":{},"status":{"replicas":3}}' ;;
  scale:*) printf '{"kind":"Scale","apiVersion":"autoscaling/v1","metadata":{"name":"raftgen"},"spec":{"replicas":%s},"status":{"replicas":3,"selector":"app.kubernetes.io/name=raftgen"}}' "${STUB_CURL#scale:}" ;;
esac
"#,
        );
        write("sleep", "exit 0\n");
        Stubs { dir }
    }

    /// Runs a shell script as pod `pod` would, with `env`, and clears the
    /// records after.
    fn run(&self, script: &str, pod: &str, env: &[(&str, &str)]) -> Ran {
        let d = self.dir.path();
        let path = format!("{}:{}", d.display(), std::env::var("PATH").unwrap_or_default());
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .env("PATH", path)
            .env("POD_NAME", pod)
            .env("POD_NAMESPACE", "prod")
            .env("STUB_DIR", d)
            .env("RAFTGEN_HOOK_LOG", d.join("hook.log"))
            .envs(env.iter().copied())
            .output()
            .expect("running sh");
        let calls = std::fs::read_to_string(d.join("raftgen.calls")).unwrap_or_default();
        let mut argvs = Vec::new();
        let mut cur = Vec::new();
        for line in calls.lines() {
            if line == "<end>" {
                argvs.push(std::mem::take(&mut cur));
            } else {
                cur.push(line.to_string());
            }
        }
        let curls =
            std::fs::read_to_string(d.join("curl.calls")).unwrap_or_default().lines().map(String::from).collect();
        for f in ["raftgen.calls", "curl.calls"] {
            let _ = std::fs::remove_file(d.join(f));
        }
        Ran {
            code: out.status.code().unwrap_or(-1),
            raftgen: argvs,
            curl: curls,
            output: format!(
                "{}{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(d.join("hook.log")).unwrap_or_default()
            ),
        }
    }
}

/// What a script did: its exit status, the argument lists it gave `raftgen`,
/// the arguments of each `curl`, and what it printed or logged.
struct Ran {
    code: i32,
    raftgen: Vec<Vec<String>>,
    curl: Vec<String>,
    output: String,
}

fn statefulset_container() -> (Yaml, Yaml) {
    let sts = k8s("StatefulSet", "raftgen");
    let containers = seq(&sts["spec"]["template"]["spec"]["containers"]);
    let c = containers.iter().find(|c| s(&c["name"]) == "raftgen").expect("a container named raftgen").clone();
    (sts, c)
}

/// The StatefulSet's entrypoint script: `command: [/bin/sh, -c]`, `args: [script]`.
fn entrypoint_script(c: &Yaml) -> String {
    let command: Vec<String> = seq(&c["command"]).iter().map(s).collect();
    assert_eq!(command, ["/bin/sh", "-c"], "the container runs its args as a shell script");
    let args = seq(&c["args"]);
    assert_eq!(args.len(), 1, "one script in args");
    s(&args[0])
}

fn prestop_script(c: &Yaml) -> String {
    let command: Vec<String> = seq(&c["lifecycle"]["preStop"]["exec"]["command"]).iter().map(s).collect();
    assert_eq!(command.len(), 3, "preStop: [/bin/sh, -c, script]");
    assert_eq!(command[..2], ["/bin/sh", "-c"]);
    command[2].clone()
}

/// The node command lines a StatefulSet pod runs: (case, argv, curl calls).
fn statefulset_nodes() -> Vec<(String, Vec<String>, Vec<String>)> {
    let (_, c) = statefulset_container();
    let script = entrypoint_script(&c);
    let stubs = Stubs::new();
    let cases = [
        ("raftgen-0, first start, no cluster answers", "raftgen-0", "fail"),
        ("raftgen-0, empty volume, a cluster answers", "raftgen-0", "ok"),
        ("raftgen-2", "raftgen-2", "fail"),
    ];
    cases
        .iter()
        .map(|(what, pod, curl)| {
            let ran = stubs.run(&script, pod, &[("STUB_CURL", curl)]);
            assert_eq!(ran.code, 0, "{what}: the entrypoint failed: {}", ran.output);
            assert_eq!(ran.raftgen.len(), 1, "{what}: the entrypoint runs raftgen once: {:?}", ran.raftgen);
            (what.to_string(), normalize(&ran.raftgen[0]), ran.curl)
        })
        .collect()
}

/// The systemd unit's ExecStart, with each value of the example environment
/// file (`#NAME=value` lines give alternatives for an active NAME).
fn systemd_nodes() -> Vec<(String, Vec<String>)> {
    let unit = read("deploy/systemd/raftgen.service").replace("\\\n", " ");
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("ExecStart=");
    let mut env = BTreeMap::new();
    let mut alternatives: Vec<(String, String)> = Vec::new();
    for line in read("deploy/systemd/env.example").lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix('#') {
            if let Some((k, v)) = rest.split_once('=') {
                if !k.contains(' ') && k.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
                    alternatives.push((k.to_string(), v.to_string()));
                }
            }
        } else if let Some((k, v)) = line.split_once('=') {
            env.insert(k.to_string(), v.to_string());
        }
    }
    let mut envs = vec![("env.example".to_string(), env.clone())];
    for (k, v) in alternatives {
        assert!(env.contains_key(&k), "env.example: #{k}= is an alternative to no active {k}=");
        let mut alt = env.clone();
        alt.insert(k.clone(), v.clone());
        envs.push((format!("env.example with {k}={v}"), alt));
    }
    envs.into_iter()
        .map(|(what, env)| {
            // systemd: ${NAME} is one argument, $NAME splits at whitespace.
            let mut argv = Vec::new();
            for word in exec.split_whitespace() {
                if let Some(name) = word.strip_prefix("${").and_then(|w| w.strip_suffix('}')) {
                    argv.push(env.get(name).unwrap_or_else(|| panic!("{what}: {name} is not set")).clone());
                } else if let Some(name) = word.strip_prefix('$') {
                    let v = env.get(name).unwrap_or_else(|| panic!("{what}: {name} is not set"));
                    argv.extend(v.split_whitespace().map(String::from));
                } else {
                    argv.push(word.to_string());
                }
            }
            assert_eq!(argv[0], "/usr/local/bin/raftgen", "{what}: ExecStart runs /usr/local/bin/raftgen");
            (what, normalize(&argv[1..]))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Tests

#[test]
fn every_yaml_file_under_deploy_parses() {
    let files: Vec<String> = files_under("deploy").into_iter().filter(|f| is_yaml(f)).collect();
    assert!(files.len() >= 10, "{files:?}");
    for f in &files {
        let docs = yaml(f);
        assert!(!docs.is_empty(), "{f}: no document");
        for doc in &docs {
            assert!(doc.is_mapping(), "{f}: a document that is not a mapping");
            if f.starts_with("deploy/k8s/") {
                for key in ["apiVersion", "kind"] {
                    assert!(!s(&doc[key]).is_empty(), "{f}: a document without {key}");
                }
                assert!(!s(&doc["metadata"]["name"]).is_empty(), "{f}: a {} without a name", s(&doc["kind"]));
                // A ConfigMap's embedded YAML files parse too.
                if s(&doc["kind"]) == "ConfigMap" {
                    for (k, v) in doc["data"].as_mapping().into_iter().flatten() {
                        if is_yaml(&s(k)) {
                            assert!(!yaml_docs(&s(v), &format!("{f}: {}", s(k))).is_empty());
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn every_raftgen_command_line_uses_real_flags_and_starts_a_node() {
    let node_flags = flags_of(&help("node"));
    let leave_flags = flags_of(&help("leave"));
    assert!(node_flags.contains("--listen") && leave_flags.contains("--id"), "help parsing");
    // The secret's variable, set in every file, is the one the binary reads.
    for sub in ["node", "leave"] {
        assert!(help(sub).contains("[env: RAFTGEN_CLUSTER_SECRET]"), "raftgen {sub} reads RAFTGEN_CLUSTER_SECRET");
    }

    let mut nodes: Vec<(String, Vec<String>)> = Vec::new();
    for (name, argv, _) in compose_nodes() {
        nodes.push((format!("docker-compose.yml service {name}"), argv));
    }
    assert_eq!(nodes.len(), 3, "the compose file runs 3 nodes");
    for (what, argv, _) in statefulset_nodes() {
        nodes.push((format!("statefulset.yaml, {what}"), argv));
    }
    for (what, argv) in systemd_nodes() {
        nodes.push((format!("raftgen.service with {what}"), argv));
    }
    for (what, argv) in &nodes {
        assert_flags_exist(what, "node", argv, &node_flags);
        assert!(
            argv.contains(&"--init".to_string()) ^ arg(argv, "--join").is_some(),
            "{what}: exactly one of --init and --join: {argv:?}"
        );
        for required in ["--id", "--listen", "--advertise", "--data"] {
            assert!(arg(argv, required).is_some(), "{what}: no {required}");
        }
    }
    // The real binary accepts each command line: it starts a node.
    std::thread::scope(|scope| {
        for (what, argv) in &nodes {
            scope.spawn(move || drop(start_as_written(what, argv)));
        }
    });

    let (_, c) = statefulset_container();
    let leaves: Vec<Vec<String>> = {
        let ran = Stubs::new().run(&prestop_script(&c), "raftgen-2", &[("STUB_CURL", "scale:2")]);
        assert_eq!(ran.code, 0, "{}", ran.output);
        ran.raftgen
    };
    assert_eq!(leaves.len(), 1);
    for argv in &leaves {
        assert_flags_exist("statefulset.yaml preStop", "leave", argv, &leave_flags);
        assert_leave_parses("statefulset.yaml preStop", argv);
    }
    // The Dockerfile's default command runs.
    let cmd = dockerfile_json("CMD");
    let out = Command::new(EXE).args(&cmd).output().unwrap();
    assert!(out.status.success(), "the image's CMD {cmd:?} fails");
}

#[test]
fn compose_file_ports_addresses_and_volumes_agree() {
    let doc = yaml("deploy/docker-compose.yml").remove(0);
    let nodes = compose_nodes();
    let inits: Vec<&String> =
        nodes.iter().filter(|(_, a, _)| a.contains(&"--init".to_string())).map(|n| &n.0).collect();
    assert_eq!(inits.len(), 1, "one node starts the cluster: {inits:?}");
    let init = inits[0];
    let init_port = listen_port(init, &nodes.iter().find(|n| &n.0 == init).unwrap().1);
    let mut ids = BTreeSet::new();
    let mut published = BTreeSet::new();
    for (name, argv, svc) in &nodes {
        let port = listen_port(name, argv);
        assert!(ids.insert(arg(argv, "--id").unwrap()), "{name}: duplicate --id");
        assert_eq!(
            arg(argv, "--advertise").unwrap(),
            format!("{name}:{port}"),
            "{name}: peers reach it by service name"
        );
        if let Some(join) = arg(argv, "--join") {
            assert_eq!(join, format!("http://{init}:{init_port}"), "{name}: joins through the --init node");
        }
        let ports: Vec<String> = seq(&svc["ports"]).iter().map(s).collect();
        assert!(!ports.is_empty(), "{name}: no published port");
        for p in &ports {
            let (host, container) = p.rsplit_once(':').unwrap_or_else(|| panic!("{name}: port {p}: HOST:CONTAINER"));
            assert_eq!(container.parse::<u16>().ok(), Some(port), "{name}: publishes {p}, listens on {port}");
            assert!(published.insert(host.to_string()), "{name}: host port {host} published twice");
        }
        let check: Vec<String> = seq(&svc["healthcheck"]["test"]).iter().map(s).collect();
        assert!(
            check.iter().any(|a| a == &format!("http://127.0.0.1:{port}/readyz")),
            "{name}: the health check asks /readyz on port {port}: {check:?}"
        );
        let data = arg(argv, "--data").unwrap();
        let mounts: Vec<String> = seq(&svc["volumes"]).iter().map(s).collect();
        let volume = mounts
            .iter()
            .find_map(|m| m.strip_suffix(&format!(":{data}")))
            .unwrap_or_else(|| panic!("{name}: nothing mounted at --data {data}: {mounts:?}"));
        assert!(doc["volumes"].get(volume).is_some(), "{name}: {volume} is not a named volume");
        let secret = s(&svc["environment"]["RAFTGEN_CLUSTER_SECRET"]);
        assert!(secret.starts_with("${RAFTGEN_CLUSTER_SECRET"), "{name}: the secret comes from the environment");
        // After a full stop no node is ready until a majority runs.
        for (_, dep) in svc["depends_on"].as_mapping().into_iter().flatten() {
            assert_ne!(s(&dep["condition"]), "service_healthy", "{name}: waiting on a healthy node never starts");
        }
    }
    // Prometheus (monitoring profile) scrapes exactly these nodes, and loads
    // the alerts from where the compose file mounts them.
    let prom = yaml("deploy/prometheus/prometheus.yml").remove(0);
    let job = seq(&prom["scrape_configs"]).into_iter().find(|j| s(&j["job_name"]) == "raftgen").expect("raftgen job");
    let targets: BTreeSet<String> =
        seq(&job["static_configs"]).iter().flat_map(|c| seq(&c["targets"])).map(|t| s(&t)).collect();
    let advertised: BTreeSet<String> = nodes.iter().map(|(_, a, _)| arg(a, "--advertise").unwrap()).collect();
    assert_eq!(targets, advertised, "prometheus.yml scrapes the compose nodes");
    // SOURCE:TARGET[:MODE] of a service's bind mounts.
    let mounts = |svc: &str| -> BTreeMap<String, String> {
        seq(&doc["services"][svc]["volumes"])
            .iter()
            .map(|m| {
                let m = s(m);
                let parts: Vec<&str> = m.splitn(3, ':').collect();
                (parts[0].to_string(), parts[1].to_string())
            })
            .collect()
    };
    let prom_mounts = mounts("prometheus");
    let config_dir = Path::new(&prom_mounts["./prometheus/prometheus.yml"]).parent().unwrap().to_path_buf();
    for rule_file in seq(&prom["rule_files"]) {
        let rule_file = s(&rule_file);
        assert!(root().join("deploy/prometheus").join(&rule_file).is_file(), "rule file {rule_file}");
        let mounted = prom_mounts.get(&format!("./prometheus/{rule_file}"));
        assert_eq!(
            mounted.map(PathBuf::from),
            Some(config_dir.join(&rule_file)),
            "{rule_file} is mounted by the config"
        );
    }
    let grafana_mounts = mounts("grafana");
    let provider = yaml("deploy/grafana/provisioning/dashboards/raftgen.yml").remove(0);
    let dashboards_dir = s(&seq(&provider["providers"])[0]["options"]["path"]);
    let dashboard = &grafana_mounts["./grafana/raftgen-dashboard.json"];
    assert_eq!(
        Path::new(dashboard).parent().unwrap(),
        Path::new(&dashboards_dir),
        "the dashboard is where Grafana looks"
    );
    assert_eq!(grafana_mounts["./grafana/provisioning"], "/etc/grafana/provisioning");
}

#[test]
fn statefulset_ports_names_probes_and_scripts_agree() {
    let (sts, c) = statefulset_container();
    let name = s(&sts["metadata"]["name"]);
    let headless_name = s(&sts["spec"]["serviceName"]);
    let pod = &sts["spec"]["template"];
    let ports: BTreeMap<String, u16> =
        seq(&c["ports"]).iter().map(|p| (s(&p["name"]), s(&p["containerPort"]).parse().unwrap())).collect();
    let port_ref = |v: &Yaml| -> u16 {
        let t = s(v);
        t.parse().ok().or_else(|| ports.get(&t).copied()).unwrap_or_else(|| panic!("no container port {t}"))
    };

    // Kubernetes expands $(NAME) of the container's variables and $$ in args:
    // the script must mean the same before and after.
    let script = entrypoint_script(&c);
    assert!(!script.contains("$$"), "Kubernetes would turn $$ into $");
    for e in seq(&c["env"]) {
        assert!(!script.contains(&format!("$({})", s(&e["name"]))), "Kubernetes would expand $({})", s(&e["name"]));
    }

    let headless = k8s("Service", &headless_name);
    assert_eq!(s(&headless["spec"]["clusterIP"]), "None", "{headless_name} is headless");
    assert_eq!(headless["spec"]["publishNotReadyAddresses"].as_bool(), Some(true), "peers must resolve unready pods");
    let labels = &pod["metadata"]["labels"];
    for svc in [&headless, &k8s("Service", "raftgen-api")] {
        for (k, v) in svc["spec"]["selector"].as_mapping().unwrap() {
            assert_eq!(&labels[k.as_str().unwrap()], v, "Service {} selects the pods", s(&svc["metadata"]["name"]));
        }
    }

    for (what, argv, curls) in statefulset_nodes() {
        let pod_name = if what.starts_with("raftgen-0") { "raftgen-0" } else { "raftgen-2" };
        let ordinal: u64 = pod_name.rsplit('-').next().unwrap().parse().unwrap();
        let listen = listen_port(&what, &argv);
        assert_eq!(ports.get("http"), Some(&listen), "{what}: the container port is --listen's");
        assert_eq!(arg(&argv, "--id"), Some((ordinal + 1).to_string()), "{what}: --id is the ordinal + 1");
        assert_eq!(
            arg(&argv, "--advertise"),
            Some(format!("{pod_name}.{headless_name}.prod.svc:{listen}")),
            "{what}: advertises its stable DNS name"
        );
        // (A machine with a raftgen volume of its own at /var/lib/raftgen
        // looks like pod 0 with a full volume: --init either way.)
        let expect_init =
            what.contains("no cluster answers") || (ordinal == 0 && Path::new("/var/lib/raftgen/node-id").exists());
        assert_eq!(argv.contains(&"--init".to_string()), expect_init, "{what}: {argv:?}");
        if let Some(join) = arg(&argv, "--join") {
            let host = join.trim_start_matches("http://").split(':').next().unwrap().to_string();
            let svc_name = host.strip_suffix(".prod.svc").unwrap_or_else(|| panic!("{what}: join {join}"));
            let svc = k8s("Service", svc_name);
            let svc_port =
                seq(&svc["spec"]["ports"]).into_iter().find(|p| s(&p["port"]) == port_of(&what, &join).to_string());
            let svc_port = svc_port.unwrap_or_else(|| panic!("{what}: {svc_name} has no port of {join}"));
            assert_eq!(port_ref(&svc_port["targetPort"]), listen, "{what}: {svc_name} reaches --listen");
        }
        if ordinal == 0 {
            // Whether a cluster answers is asked of the API service's /readyz.
            assert!(curls.iter().any(|c| c.contains(&format!(":{listen}/readyz"))), "{what}: {curls:?}");
        }
        let data = arg(&argv, "--data").unwrap();
        let mounts: BTreeMap<String, String> =
            seq(&c["volumeMounts"]).iter().map(|m| (s(&m["mountPath"]), s(&m["name"]))).collect();
        let claims: Vec<String> =
            seq(&sts["spec"]["volumeClaimTemplates"]).iter().map(|v| s(&v["metadata"]["name"])).collect();
        let volume = mounts.get(&data).unwrap_or_else(|| panic!("{what}: nothing mounted at --data {data}"));
        assert!(claims.contains(volume), "{what}: --data {data} is on a persistent volume claim");
        let models = arg(&argv, "--models-dir").unwrap();
        assert!(mounts.contains_key(&models), "{what}: --models-dir {models} is mounted");
    }

    for p in seq(&headless["spec"]["ports"]) {
        assert_eq!(s(&p["port"]), ports["http"].to_string(), "peers dial the advertised port on the pod");
        assert_eq!(port_ref(&p["targetPort"]), ports["http"]);
    }
    // Probes: /healthz for liveness (and start-up), /readyz for readiness.
    for (probe, path) in [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(s(&c[probe]["httpGet"]["path"]), path, "{probe}");
        assert_eq!(port_ref(&c[probe]["httpGet"]["port"]), ports["http"], "{probe} port");
    }
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(s(&annotations["prometheus.io/port"]), ports["http"].to_string());
    assert_eq!(s(&annotations["prometheus.io/path"]), "/metrics");
    let monitor = k8s("PodMonitor", "raftgen");
    for ep in seq(&monitor["spec"]["podMetricsEndpoints"]) {
        assert!(ports.contains_key(&s(&ep["port"])), "the PodMonitor scrapes a named container port");
    }

    // The secret comes from a Secret, under the variable the binary reads.
    let secret_env =
        seq(&c["env"]).into_iter().find(|e| s(&e["name"]) == "RAFTGEN_CLUSTER_SECRET").expect("secret env");
    assert!(!s(&secret_env["valueFrom"]["secretKeyRef"]["name"]).is_empty(), "from a secretKeyRef");

    // A full stop must be able to come back: pods start in parallel.
    assert_eq!(s(&sts["spec"]["podManagementPolicy"]), "Parallel");
    // Room for the preStop drain.
    let drain_ms: u64 = help_default(&help("node"), "--drain-timeout-ms").parse().unwrap();
    let grace: u64 = s(&pod["spec"]["terminationGracePeriodSeconds"]).parse().unwrap();
    assert!(grace >= drain_ms / 1000 + 60, "terminationGracePeriodSeconds {grace} < drain timeout + 60 s");

    // The preStop hook leaves on a scale-down only, and may read the scale.
    let prestop = prestop_script(&c);
    assert!(prestop.contains(&format!("/statefulsets/{name}/scale")), "the hook reads this StatefulSet's scale");
    let sa = s(&pod["spec"]["serviceAccountName"]);
    let role_binding = k8s("RoleBinding", "raftgen-read-scale");
    assert!(seq(&role_binding["subjects"]).iter().any(|x| s(&x["name"]) == sa), "the pods' account is bound");
    let role = k8s("Role", &s(&role_binding["roleRef"]["name"]));
    assert!(
        seq(&role["rules"]).iter().any(|r| seq(&r["resources"]).iter().any(|x| s(x) == "statefulsets/scale")
            && seq(&r["verbs"]).iter().any(|x| s(x) == "get")
            && seq(&r["resourceNames"]).iter().any(|x| s(x) == name)),
        "the Role grants get on statefulsets/{name}/scale"
    );
    k8s("ServiceAccount", &sa);
    let stubs = Stubs::new();
    // (case, pod, environment, raftgen calls expected)
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], usize);
    let cases: [Case; 6] = [
        ("scale-down removes this pod", "raftgen-2", &[("STUB_CURL", "scale:2")], 1),
        ("a restart", "raftgen-2", &[("STUB_CURL", "scale:3")], 0),
        ("scaled to zero: a full stop", "raftgen-1", &[("STUB_CURL", "scale:0")], 0),
        ("the API is unreachable", "raftgen-2", &[("STUB_CURL", "fail")], 0),
        ("a leave that conflicts once", "raftgen-1", &[("STUB_CURL", "scale:1"), ("STUB_RAFTGEN_FAILS", "1")], 2),
        (
            "already removed",
            "raftgen-1",
            &[("STUB_CURL", "scale:1"), ("STUB_RAFTGEN_FAILS", "9"), ("STUB_RAFTGEN_ERROR", "404 Not Found: node")],
            1,
        ),
    ];
    for (what, pod_name, env, calls) in cases {
        let ran = stubs.run(&prestop, pod_name, env);
        assert_eq!(ran.code, 0, "preStop, {what}: exit status; {}", ran.output);
        assert_eq!(ran.raftgen.len(), calls, "preStop, {what}: raftgen calls {:?}; {}", ran.raftgen, ran.output);
        let id = (pod_name.rsplit('-').next().unwrap().parse::<u64>().unwrap() + 1).to_string();
        for argv in &ran.raftgen {
            assert_eq!(argv[..1], ["leave"], "preStop, {what}");
            assert_eq!(arg(argv, "--id"), Some(id.clone()), "preStop, {what}: leaves as its own id");
            assert_eq!(port_of(what, &arg(argv, "--server").unwrap()), ports["http"], "preStop, {what}: its own node");
        }
    }

    let pdb = k8s("PodDisruptionBudget", "raftgen");
    assert_eq!(s(&pdb["spec"]["maxUnavailable"]), "1");
    let hpa = k8s("HorizontalPodAutoscaler", "raftgen");
    assert_eq!(s(&hpa["apiVersion"]), "autoscaling/v2");
    assert_eq!(s(&hpa["spec"]["scaleTargetRef"]["kind"]), "StatefulSet");
    assert_eq!(s(&hpa["spec"]["scaleTargetRef"]["name"]), name);
    assert!(s(&hpa["spec"]["minReplicas"]).parse::<u32>().unwrap() >= 3, "a Raft cluster keeps 3 voters");
    let metric = &seq(&hpa["spec"]["metrics"])[0];
    assert_eq!(s(&metric["external"]["metric"]["name"]), "raftgen_queue_depth_total");
}

#[test]
fn systemd_unit_restarts_on_failure_and_agrees_with_its_environment() {
    let unit = read("deploy/systemd/raftgen.service");
    let settings: BTreeMap<&str, &str> = unit.lines().filter_map(|l| l.split_once('=')).collect();
    for (key, want) in [
        ("Restart", "on-failure"),
        ("User", "raftgen"),
        ("EnvironmentFile", "/etc/raftgen/env"),
        ("KillSignal", "SIGTERM"),
        ("StateDirectory", "raftgen"),
    ] {
        assert_eq!(settings.get(key).copied(), Some(want), "raftgen.service: {key}=");
    }
    for key in ["RestartSec", "TimeoutStopSec", "LimitNOFILE", "Group"] {
        assert!(settings.contains_key(key), "raftgen.service: no {key}=");
    }
    for (what, argv) in systemd_nodes() {
        let listen = listen_port(&what, &argv);
        assert_eq!(port_of(&what, &arg(&argv, "--advertise").unwrap()), listen, "{what}: advertised port");
        if let Some(join) = arg(&argv, "--join") {
            assert_eq!(port_of(&what, &join), listen, "{what}: the other nodes listen on the same port");
        }
        assert_eq!(arg(&argv, "--data").as_deref(), Some("/var/lib/raftgen"), "{what}: --data is the StateDirectory");
    }
}

/// The Dockerfile's instructions, continuation lines joined: (KEYWORD, rest).
fn dockerfile() -> Vec<(String, String)> {
    read("Dockerfile")
        .replace("\\\n", " ")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, rest) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
            (k.to_uppercase(), rest.trim().to_string())
        })
        .collect()
}

fn dockerfile_json(keyword: &str) -> Vec<String> {
    let (_, v) = dockerfile().into_iter().rev().find(|(k, _)| k == keyword).unwrap_or_else(|| panic!("no {keyword}"));
    serde_json::from_str(&v).unwrap_or_else(|e| panic!("{keyword} {v}: exec form expected: {e}"))
}

#[test]
fn dockerfile_builds_in_two_stages_from_a_complete_context() {
    let lines = dockerfile();
    let mut args = BTreeMap::new();
    let mut stages: Vec<(String, String)> = Vec::new(); // (image, name)
    let mut by_stage: Vec<Vec<(String, String)>> = Vec::new();
    for (k, v) in &lines {
        if k == "ARG" && stages.is_empty() {
            if let Some((name, default)) = v.split_once('=') {
                args.insert(format!("${{{name}}}"), default.to_string());
            }
        } else if k == "FROM" {
            let mut image = v.split_whitespace().next().unwrap().to_string();
            for (name, value) in &args {
                image = image.replace(name, value);
            }
            let words: Vec<&str> = v.split_whitespace().collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => name.to_string(),
                _ => String::new(),
            };
            stages.push((image, name));
            by_stage.push(Vec::new());
        } else if let Some(stage) = by_stage.last_mut() {
            stage.push((k.clone(), v.clone()));
        }
    }
    assert_eq!(stages.len(), 2, "two stages: {stages:?}");
    let (builder_image, builder) = &stages[0];
    assert_eq!(builder, "builder", "the first stage is `AS builder`");
    let version = builder_image
        .strip_prefix("rust:")
        .and_then(|v| v.strip_suffix("-bookworm"))
        .unwrap_or_else(|| panic!("builder from rust:<version>-bookworm, not {builder_image}"));
    let manifest = read("Cargo.toml");
    let msrv = manifest.lines().find_map(|l| l.strip_prefix("rust-version = ")).unwrap().trim_matches('"').to_string();
    let parse = |v: &str| -> Vec<u32> { v.split('.').map(|p| p.parse().unwrap()).collect() };
    assert!(parse(version) >= parse(&msrv), "builder rust {version} is older than rust-version {msrv}");
    let (runtime_image, runtime) = &stages[1];
    assert!(runtime_image.starts_with("debian:") && runtime_image.ends_with("-slim"), "runtime from {runtime_image}");
    assert_ne!(runtime, "builder");

    let build = &by_stage[0];
    assert!(
        build.iter().any(|(k, v)| k == "RUN" && v.contains("cargo build --release --locked -p raftgen")),
        "the builder runs cargo build --release --locked -p raftgen"
    );
    let run = &by_stage[1];
    assert!(
        run.iter()
            .any(|(k, v)| k == "COPY" && v.starts_with("--from=builder") && v.ends_with("/usr/local/bin/raftgen")),
        "the runtime stage copies the binary from the builder onto the PATH"
    );
    let user = run.iter().rev().find(|(k, _)| k == "USER").map(|(_, v)| v.clone()).expect("a USER");
    assert!(!["root", "0", "0:0"].contains(&user.as_str()), "runs as a non-root user, not {user}");
    assert_eq!(dockerfile_json("ENTRYPOINT"), ["raftgen"]);
    let expose: Vec<u16> = run.iter().filter(|(k, _)| k == "EXPOSE").map(|(_, v)| v.parse().unwrap()).collect();
    for (name, argv, _) in compose_nodes() {
        assert_eq!(expose, [listen_port(&name, &argv)], "EXPOSE is the nodes' --listen port");
        let data = arg(&argv, "--data").unwrap();
        assert!(run.iter().any(|(k, v)| k == "VOLUME" && v.contains(&format!("\"{data}\""))), "VOLUME {data}");
    }

    // The context: cargo refuses a workspace with a member or a declared
    // target missing, and the binary embeds files with include_bytes!.
    let copied: Vec<String> = build
        .iter()
        .filter(|(k, v)| k == "COPY" && !v.starts_with("--"))
        .flat_map(|(_, v)| {
            let words: Vec<String> = v.split_whitespace().map(String::from).collect();
            words[..words.len() - 1].to_vec()
        })
        .collect();
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_matches('/').to_string())
        .collect();
    assert!(ignored.contains(&"target".to_string()), ".dockerignore leaves out target/");
    let members = manifest.split("members = [").nth(1).unwrap().split(']').next().unwrap().to_string();
    let mut needed: Vec<String> = members.split(',').map(|m| m.trim().trim_matches('"').to_string()).collect();
    needed.retain(|m| !m.is_empty());
    needed.extend(["Cargo.toml", "Cargo.lock", "src"].map(String::from));
    if manifest.contains("[[bench]]") {
        needed.push("benches".into());
    }
    needed.extend(embedded_paths());
    let under = |path: &str, dir: &str| path == dir || path.starts_with(&format!("{dir}/"));
    for path in &needed {
        assert!(copied.iter().any(|c| under(path, c)), "Dockerfile: the builder does not COPY {path}");
        assert!(!ignored.iter().any(|i| under(path, i)), ".dockerignore leaves out {path}, which the build needs");
        assert!(root().join(path).exists(), "{path} does not exist");
    }
}

/// Directories the sources embed with `include_bytes!`/`include_str!`.
fn embedded_paths() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for file in files_under("src").into_iter().filter(|f| f.ends_with(".rs")) {
        let text = read(&file);
        for piece in text.split("CARGO_MANIFEST_DIR\"), \"/").skip(1) {
            let lit = piece.split('"').next().unwrap();
            out.insert(lit.trim_end_matches('/').to_string());
        }
        for mac in ["include_bytes!(\"", "include_str!(\""] {
            for piece in text.split(mac).skip(1) {
                let lit = piece.split('"').next().unwrap();
                let dir = Path::new(&file).parent().unwrap().join(lit);
                out.insert(dir.parent().unwrap().to_string_lossy().into_owned());
            }
        }
    }
    assert!(out.iter().any(|p| p.starts_with("models/")), "the built-in model is embedded: {out:?}");
    out
}

/// Metric names in a PromQL expression or a name pattern.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("raftgen_") {
        let start = i + at;
        let prev = if start > 0 { bytes[start - 1] as char } else { ' ' };
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map(|e| start + e)
            .unwrap_or(expr.len());
        if !(prev.is_ascii_alphanumeric() || prev == '_') {
            out.insert(expr[start..end].to_string());
        }
        i = end;
    }
    out
}

/// Where a metric name stands in the contract, or why it does not.
fn check_metric(name: &str) -> Result<(), String> {
    if METRICS.contains(&name) || CUDA_ONLY.contains(&name) {
        return Ok(());
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if HISTOGRAMS.contains(&base) {
                return Ok(());
            }
        }
    }
    Err(format!("{name} is not a metric raftgen exports (tests/deploy.rs METRICS)"))
}

fn alert_rules() -> Vec<Yaml> {
    let doc = yaml("deploy/prometheus/alerts.yml").remove(0);
    seq(&doc["groups"]).iter().flat_map(|g| seq(&g["rules"])).collect()
}

#[test]
fn alerts_dashboard_and_autoscaler_use_only_exported_metrics() {
    let mut uses: Vec<(String, String)> = Vec::new(); // (where, metric)
    for rule in alert_rules() {
        let alert = s(&rule["alert"]);
        let expr = s(&rule["expr"]);
        let names = metric_names(&expr);
        assert!(!names.is_empty() || expr.starts_with("up{"), "alert {alert}: no raftgen metric in `{expr}`");
        if names.iter().any(|n| CUDA_ONLY.contains(&n.as_str())) {
            assert!(
                s(&rule["annotations"]["description"]).contains("CUDA builds"),
                "alert {alert} reads a CUDA-only metric: its description must say so"
            );
        }
        uses.extend(names.into_iter().map(|n| (format!("alerts.yml {alert}"), n)));
    }
    let dash: Json = serde_json::from_str(&read("deploy/grafana/raftgen-dashboard.json")).expect("dashboard JSON");
    for panel in dash["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap_or("?");
        for t in panel["targets"].as_array().into_iter().flatten() {
            let names = metric_names(t["expr"].as_str().unwrap_or(""));
            if names.iter().any(|n| CUDA_ONLY.contains(&n.as_str())) {
                assert!(title.contains("CUDA"), "panel {title} reads a CUDA-only metric: its title must say so");
            }
            uses.extend(names.into_iter().map(|n| (format!("dashboard panel {title}"), n)));
        }
    }
    for var in dash["templating"]["list"].as_array().unwrap() {
        let q = var["definition"].as_str().unwrap_or("");
        uses.extend(metric_names(q).into_iter().map(|n| (format!("dashboard variable {}", var["name"]), n)));
    }
    let hpa = k8s("HorizontalPodAutoscaler", "raftgen");
    for m in seq(&hpa["spec"]["metrics"]) {
        uses.extend(metric_names(&s(&m["external"]["metric"]["name"])).into_iter().map(|n| ("hpa.yaml".into(), n)));
    }
    let adapter = k8s("ConfigMap", "prometheus-adapter");
    let config = yaml_docs(&s(&adapter["data"]["config.yaml"]), "adapter config.yaml").remove(0);
    let served: Vec<String> = seq(&config["externalRules"]).iter().map(|r| s(&r["name"]["as"])).collect();
    for m in seq(&hpa["spec"]["metrics"]) {
        let name = s(&m["external"]["metric"]["name"]);
        assert!(served.contains(&name), "the HPA's metric {name} is served by the adapter rules ({served:?})");
    }
    for r in seq(&config["externalRules"]) {
        for key in [&r["seriesQuery"], &r["name"]["matches"], &r["name"]["as"], &r["metricsQuery"]] {
            uses.extend(metric_names(&s(key)).into_iter().map(|n| ("prometheus-adapter.yaml".into(), n)));
        }
    }
    let errors: Vec<String> =
        uses.iter().filter_map(|(place, name)| check_metric(name).err().map(|e| format!("{place}: {e}"))).collect();
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    let used: BTreeSet<&str> = uses.iter().map(|(_, n)| n.as_str()).collect();
    for required in [
        "raftgen_queue_depth_total",
        "raftgen_images_per_second",
        "raftgen_job_latency_seconds_bucket",
        "raftgen_jobs_succeeded_total",
        "raftgen_executor_busy_slots",
        "raftgen_raft_term",
        "raftgen_raft_leader_id",
        "raftgen_raft_apply_lag",
        "raftgen_disk_bytes",
    ] {
        assert!(used.contains(required), "nothing shows {required}");
    }
}

#[test]
fn alerts_hold_the_seed_thresholds() {
    let rules = alert_rules();
    let by_name: BTreeMap<String, &Yaml> = rules.iter().map(|r| (s(&r["alert"]), r)).collect();
    assert_eq!(by_name.len(), rules.len(), "alert names are unique");
    // (alert, what its expression must contain, comparison, threshold, `for`)
    type Seed<'a> = (&'a str, &'a [&'a str], &'a str, f64, Option<&'a str>);
    let seeds: [Seed; 5] = [
        ("RaftgenGpuUtilizationHigh", &["raftgen_gpu_utilization_ratio"], ">", 0.85, Some("5m")),
        ("RaftgenGpuMemoryHigh", &["raftgen_gpu_memory_used_bytes / raftgen_gpu_memory_total_bytes"], ">", 0.90, None),
        (
            "RaftgenJobLatencyP99High",
            &["histogram_quantile(0.99,", "rate(raftgen_job_latency_seconds_bucket["],
            ">",
            3.0,
            None,
        ),
        ("RaftgenBacklogHigh", &["raftgen_queue_depth_total"], ">", 200.0, None),
        ("RaftgenJobSuccessRateLow", &["raftgen_jobs_succeeded_total", "raftgen_jobs_failed_total"], "<", 0.95, None),
    ];
    for (name, parts, op, threshold, for_) in seeds {
        let rule = by_name.get(name).unwrap_or_else(|| panic!("alerts.yml: no alert {name}"));
        let expr = s(&rule["expr"]).split_whitespace().collect::<Vec<_>>().join(" ");
        for p in parts {
            assert!(expr.contains(p), "{name}: `{expr}` does not contain `{p}`");
        }
        let (lhs, value) = expr.rsplit_once(' ').unwrap();
        assert!(lhs.ends_with(&format!(" {op}")), "{name}: `{expr}` does not end in `{op} {threshold}`");
        assert_eq!(value.parse::<f64>().ok(), Some(threshold), "{name}: threshold in `{expr}`");
        if let Some(f) = for_ {
            assert_eq!(s(&rule["for"]), f, "{name}: for");
        }
    }
    for rule in &rules {
        let name = s(&rule["alert"]);
        let f = s(&rule["for"]);
        let minutes = f.strip_suffix('m').and_then(|m| m.parse::<u32>().ok());
        assert!(minutes.is_some_and(|m| m >= 1), "{name}: for: {f:?} (minutes, at least 1)");
        assert!(["warning", "critical"].contains(&s(&rule["labels"]["severity"]).as_str()), "{name}: severity");
        assert!(!s(&rule["annotations"]["summary"]).is_empty(), "{name}: summary");
    }

    // promtool, where installed, checks the rules and runs their unit tests
    // (deploy/prometheus/alerts.test.yml).
    match Command::new("promtool").arg("--version").output() {
        Ok(o) if o.status.success() => {
            let dir = root().join("deploy/prometheus");
            for args in [
                &["check", "rules", "alerts.yml"][..],
                &["check", "config", "prometheus.yml"],
                &["test", "rules", "alerts.test.yml"],
            ] {
                let out = Command::new("promtool").args(args).current_dir(&dir).output().unwrap();
                assert!(
                    out.status.success(),
                    "promtool {}:\n{}{}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        _ => eprintln!("promtool is not installed: alerts.test.yml not run (apt-get install prometheus has it)"),
    }
}

#[test]
fn dashboard_is_valid_grafana_json_with_a_datasource_variable() {
    let dash: Json = serde_json::from_str(&read("deploy/grafana/raftgen-dashboard.json")).expect("dashboard JSON");
    assert!(dash["uid"].is_string() && dash["title"].is_string() && dash["schemaVersion"].is_u64());
    let vars = dash["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter().any(|v| v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"),
        "a Prometheus data source variable named `datasource`"
    );
    let mut ids = BTreeSet::new();
    let mut cells: BTreeMap<(u64, u64), String> = BTreeMap::new();
    for p in dash["panels"].as_array().unwrap() {
        let title = p["title"].as_str().unwrap().to_string();
        assert!(ids.insert(p["id"].as_u64().unwrap()), "{title}: duplicate panel id");
        let g = &p["gridPos"];
        let (x, y, w, h) =
            (g["x"].as_u64().unwrap(), g["y"].as_u64().unwrap(), g["w"].as_u64().unwrap(), g["h"].as_u64().unwrap());
        assert!(x + w <= 24 && w > 0 && h > 0, "{title}: outside the 24-column grid");
        for cx in x..x + w {
            for cy in y..y + h {
                if let Some(other) = cells.insert((cx, cy), title.clone()) {
                    panic!("panels {other} and {title} overlap");
                }
            }
        }
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}: uses the datasource variable");
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}: a target uses the datasource variable");
            let expr = t["expr"].as_str().unwrap_or("");
            assert!(!expr.is_empty(), "{title}: a target without expr");
            assert_eq!(expr.matches('(').count(), expr.matches(')').count(), "{title}: unbalanced `{expr}`");
        }
    }
}

#[test]
fn metrics_contract_is_what_a_node_exports() {
    // The compose file's first node: a one-node cluster of its own here.
    let (name, argv, _) = compose_nodes().into_iter().find(|(_, a, _)| a.contains(&"--init".to_string())).unwrap();
    let node = start_as_written(&name, &argv);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(http(node.port, "GET", "/readyz", None), Ok((200, _))) {
        assert!(Instant::now() < deadline, "no leader after 60 s:\n{}", node.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // One job, so that the per-model families and the histograms have samples
    // (submitted once the node has registered its models with the cluster).
    let body = loop {
        let (status, body) =
            http(node.port, "POST", "/v1/jobs", Some(r#"{"prompt":"deploy test","width":64,"height":64,"steps":1}"#))
                .unwrap();
        if status == 202 {
            break body;
        }
        assert!(status == 503 && body.contains("serves") && Instant::now() < deadline, "{status} {body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let id = serde_json::from_str::<Json>(&body).unwrap()["id"].as_str().unwrap().to_string();
    loop {
        let (_, body) = http(node.port, "GET", &format!("/v1/jobs/{id}"), None).unwrap();
        let job: Json = serde_json::from_str(&body).unwrap_or(Json::Null);
        match job["state"].as_str() {
            Some("succeeded") => break,
            Some("failed" | "cancelled") => panic!("the test job ended {}: {body}", job["state"]),
            _ => {}
        }
        assert!(Instant::now() < deadline, "the job is still {} after 60 s", job["state"]);
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, text) = http(node.port, "GET", "/metrics", None).unwrap();
    assert_eq!(status, 200, "GET /metrics without credentials");
    let exported: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect();
    let contract: BTreeSet<String> = METRICS.iter().map(|m| m.to_string()).collect();
    let missing: Vec<&String> = contract.difference(&exported).collect();
    let unknown: Vec<&String> = exported.difference(&contract).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "the /metrics contract changed: not exported {missing:?}, not in the contract {unknown:?}; update METRICS \
         and deploy/ together"
    );
    for h in HISTOGRAMS {
        assert!(text.contains(&format!("# TYPE {h} histogram")), "{h} is a histogram");
    }
}

#[test]
fn deploy_doc_names_every_deployment_file() {
    let doc = read("docs/deploy.md");
    for f in files_under("deploy").into_iter().chain(["Dockerfile".to_string()]) {
        assert!(doc.contains(&f), "docs/deploy.md does not mention {f}");
    }
    for endpoint in ["/metrics", "/healthz", "/readyz"] {
        assert!(doc.contains(endpoint), "docs/deploy.md does not mention {endpoint}");
    }
    assert!(read("README.md").contains("docs/deploy.md"), "README links docs/deploy.md");
}
