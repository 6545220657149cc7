//! The load generator the benchmarks share: `clients` concurrent clients,
//! each on one keep-alive connection, sending its next write as soon as the
//! last one was answered, for a fixed time. Only acknowledged writes count;
//! their latencies are kept.
//!
//! It speaks three protocols, so raftgen and the systems it is compared with
//! get the same client: raftgen's `POST /v1/jobs`, etcd's HTTP gateway
//! (`POST /v3/kv/put`) and Redis's RESP (`RPUSH`). Plain hyper (no pool) and
//! a raw socket, so the client costs the shared cores little.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Bytes of payload in each write (raftgen's prompt, etcd's value, the
/// Redis list element).
pub const PAYLOAD_BYTES: usize = 200;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// raftgen: a job submission (202 once committed by a quorum and synced).
    Raftgen,
    /// etcd v3's JSON gateway: a put (200 once committed and synced).
    Etcd,
    /// Redis: RPUSH onto one list (an integer reply).
    Redis,
}

pub struct Phase {
    pub name: String,
    pub ok: usize,
    pub errors: usize,
    pub secs: f64,
    /// Sorted.
    pub latencies: Vec<Duration>,
}

impl Phase {
    pub fn per_sec(&self) -> f64 {
        self.ok as f64 / self.secs
    }
}

fn payload(c: usize, n: u64) -> String {
    let head = format!("bench {c} {n} ");
    format!("{head}{}", "x".repeat(PAYLOAD_BYTES.saturating_sub(head.len())))
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(v >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn http_request(proto: Proto, addr: &str, c: usize, n: u64) -> hyper::Request<Full<Bytes>> {
    let (path, body) = match proto {
        Proto::Raftgen => ("/v1/jobs", format!(r#"{{"prompt":"{}","width":64,"height":64,"steps":1}}"#, payload(c, n))),
        Proto::Etcd => (
            "/v3/kv/put",
            format!(
                r#"{{"key":"{}","value":"{}"}}"#,
                base64(format!("bench/{c}/{n}").as_bytes()),
                base64(payload(c, n).as_bytes())
            ),
        ),
        Proto::Redis => unreachable!("Redis speaks RESP"),
    };
    let mut req = hyper::Request::post(path).header("host", addr).header("content-type", "application/json");
    if proto == Proto::Raftgen {
        req = req.header("idempotency-key", format!("b-{c}-{n}"));
    }
    req.body(Full::new(Bytes::from(body))).expect("static request parts")
}

async fn http_client(proto: Proto, addr: String, c: usize, stop: Arc<AtomicBool>) -> (Vec<Duration>, usize) {
    let expect = if proto == Proto::Raftgen { 202 } else { 200 };
    let (mut lat, mut errors, mut n) = (Vec::new(), 0usize, 0u64);
    let mut sender: Option<http1::SendRequest<Full<Bytes>>> = None;
    while !stop.load(Ordering::Relaxed) {
        if sender.as_ref().is_none_or(|s| s.is_closed()) {
            let Ok(stream) = tokio::net::TcpStream::connect(&addr).await else {
                errors += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let Ok((s, conn)) = http1::handshake(TokioIo::new(stream)).await else {
                errors += 1;
                continue;
            };
            tokio::spawn(conn);
            sender = Some(s);
        }
        let s = sender.as_mut().expect("connected above");
        let req = http_request(proto, &addr, c, n);
        n += 1;
        let t = Instant::now();
        match s.send_request(req).await {
            Ok(resp) => {
                let ok = resp.status() == expect;
                let read = resp.into_body().collect().await.is_ok();
                if ok && read {
                    lat.push(t.elapsed());
                } else {
                    errors += 1;
                }
            }
            Err(_) => {
                errors += 1;
                sender = None;
            }
        }
    }
    (lat, errors)
}

async fn redis_client(addr: String, c: usize, stop: Arc<AtomicBool>) -> (Vec<Duration>, usize) {
    let (mut lat, mut errors, mut n) = (Vec::new(), 0usize, 0u64);
    let mut conn: Option<BufReader<tokio::net::TcpStream>> = None;
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        if conn.is_none() {
            let Ok(stream) = tokio::net::TcpStream::connect(&addr).await else {
                errors += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            conn = Some(BufReader::new(stream));
        }
        let s = conn.as_mut().expect("connected above");
        let value = payload(c, n);
        let cmd = format!("*3\r\n$5\r\nRPUSH\r\n$5\r\nbench\r\n${}\r\n{value}\r\n", value.len());
        n += 1;
        let t = Instant::now();
        line.clear();
        let answered = async {
            s.get_mut().write_all(cmd.as_bytes()).await?;
            s.read_line(&mut line).await
        }
        .await;
        match answered {
            Ok(_) if line.starts_with(':') => lat.push(t.elapsed()),
            Ok(_) => errors += 1,
            Err(_) => {
                errors += 1;
                conn = None;
            }
        }
    }
    (lat, errors)
}

/// `clients` concurrent clients, spread round-robin over `addrs` (host:port),
/// for `secs` seconds.
pub async fn run(proto: Proto, addrs: &[String], clients: usize, secs: f64, name: String) -> Phase {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let addr = addrs[c % addrs.len()].trim_start_matches("http://").to_string();
            let stop = stop.clone();
            match proto {
                Proto::Redis => tokio::spawn(redis_client(addr, c, stop)),
                _ => tokio::spawn(http_client(proto, addr, c, stop)),
            }
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut phase = Phase { name, ok: 0, errors: 0, secs: 0.0, latencies: Vec::new() };
    for t in tasks {
        let (lat, errors) = t.await.expect("client task");
        phase.errors += errors;
        phase.latencies.extend(lat);
    }
    phase.secs = started.elapsed().as_secs_f64();
    phase.ok = phase.latencies.len();
    phase.latencies.sort();
    phase
}
