//! A network the nemesis can cut: every node in its own network namespace,
//! each joined by a veth pair to one bridge in the runner's namespace, and the
//! cuts made as nftables rules on that bridge (`bridge` family, `forward`
//! hook), so node-to-node traffic is cut while the runner's clients still
//! reach every node (as clients in the same rack would).
//!
//! Needs root, iproute2 and nftables; [`Network::create`] says plainly why it
//! cannot where namespaces cannot be made, and the runner then skips the
//! partition faults. Packet loss is an nftables `numgen random` rule: this
//! kernel has no netem.

use std::collections::BTreeSet;
use std::process::Command;

use anyhow::{bail, Context};

/// Names and addresses of one run's network, unique per runner process.
pub struct Network {
    prefix: String,
    bridge: String,
    subnet: u8,
    nodes: Vec<u64>,
    /// Active rules: (from, to, loss percent; 100 = cut).
    rules: BTreeSet<(u64, u64, u8)>,
}

fn run(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl Network {
    /// Whether this machine can make the namespaces, and if not, why.
    pub fn unavailable_reason() -> Option<String> {
        if unsafe { libc::geteuid() } != 0 {
            return Some("not running as root".into());
        }
        for tool in ["ip", "nft"] {
            let found = Command::new(tool).arg("-V").output().is_ok();
            if !found {
                return Some(format!("`{tool}` is not installed (apt-get install iproute2 nftables)"));
            }
        }
        let probe = format!("rgprobe{}", std::process::id());
        match run(&["ip", "netns", "add", &probe]) {
            Ok(()) => {
                let _ = run(&["ip", "netns", "del", &probe]);
                None
            }
            Err(e) => Some(format!("cannot create a network namespace: {e}")),
        }
    }

    /// Creates a namespace per node id, the bridge, and an empty rule table.
    /// `subnet` picks 10.<subnet>.0.0/24 (so parallel runs do not collide).
    pub fn create(nodes: &[u64], subnet: u8) -> anyhow::Result<Network> {
        if let Some(why) = Network::unavailable_reason() {
            bail!("network namespaces unavailable: {why}");
        }
        let prefix = format!("rg{}", std::process::id() % 100_000);
        let bridge = format!("{prefix}br");
        let net = Network { prefix, bridge: bridge.clone(), subnet, nodes: nodes.to_vec(), rules: BTreeSet::new() };
        run(&["ip", "link", "add", &bridge, "type", "bridge"])?;
        run(&["ip", "link", "set", &bridge, "up"])?;
        run(&["ip", "addr", "add", &format!("{}/24", net.runner_ip()), "dev", &bridge])?;
        for &id in nodes {
            let ns = net.namespace(id);
            let veth = format!("{}v{id}", net.prefix);
            run(&["ip", "netns", "add", &ns])?;
            run(&["ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            run(&["ip", "link", "set", &veth, "master", &bridge, "up"])?;
            run(&["ip", "-n", &ns, "addr", "add", &format!("{}/24", net.ip(id)), "dev", "eth0"])?;
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        }
        net.apply()?;
        Ok(net)
    }

    pub fn namespace(&self, node: u64) -> String {
        format!("{}n{node}", self.prefix)
    }

    pub fn ip(&self, node: u64) -> String {
        format!("10.{}.0.{node}", self.subnet)
    }

    fn runner_ip(&self) -> String {
        format!("10.{}.0.254", self.subnet)
    }

    fn table(&self) -> String {
        format!("{}cuts", self.prefix)
    }

    /// Cuts traffic from `from` to `to` (one way).
    pub fn cut_oneway(&mut self, from: u64, to: u64) -> anyhow::Result<()> {
        self.rules.insert((from, to, 100));
        self.apply()
    }

    /// Cuts every link between the two groups, both ways.
    pub fn partition(&mut self, a: &[u64], b: &[u64]) -> anyhow::Result<()> {
        for &x in a {
            for &y in b {
                self.rules.insert((x, y, 100));
                self.rules.insert((y, x, 100));
            }
        }
        self.apply()
    }

    /// Drops `percent`% of the packets on every node-to-node link.
    pub fn lossy(&mut self, percent: u8) -> anyhow::Result<()> {
        for &x in &self.nodes {
            for &y in &self.nodes {
                if x != y {
                    self.rules.insert((x, y, percent.min(100)));
                }
            }
        }
        self.apply()
    }

    /// Removes every cut and every loss rule.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        self.rules.clear();
        self.apply()
    }

    /// Replaces the whole table in one `nft -f` transaction.
    fn apply(&self) -> anyhow::Result<()> {
        let mut script = format!("table bridge {t}\ndelete table bridge {t}\ntable bridge {t} {{\n", t = self.table());
        script += "  chain cuts {\n    type filter hook forward priority 0; policy accept;\n";
        for (from, to, percent) in &self.rules {
            let (a, b) = (self.ip(*from), self.ip(*to));
            if *percent >= 100 {
                script += &format!("    ip saddr {a} ip daddr {b} drop\n");
            } else {
                script += &format!("    ip saddr {a} ip daddr {b} numgen random mod 100 < {percent} drop\n");
            }
        }
        script += "  }\n}\n";
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("running nft")?;
        use std::io::Write;
        child.stdin.take().expect("piped").write_all(script.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("nft -f failed: {}\n{script}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = run(&["nft", "delete", "table", "bridge", &self.table()]);
        for &id in &self.nodes {
            let _ = run(&["ip", "netns", "del", &self.namespace(id)]);
        }
        let _ = run(&["ip", "link", "del", &self.bridge]);
    }
}
