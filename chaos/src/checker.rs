//! The checker: reads a run's history and every replica's final state and
//! reports, in the categories Jepsen uses for queues, whether raftgen kept its
//! promise: an acknowledged job is never lost, never completed twice, and
//! nothing appears that no client asked for.
//!
//! It is a pure function of its inputs, so it is tested with planted
//! histories (`tests` below) and runs unchanged on process runs and on every
//! simulation seed.
//!
//! Categories:
//! - **lost**: a submission the cluster acknowledged whose job is absent from
//!   the final state (that is also the RPO: it must be 0);
//! - **duplicated**: one idempotency key that became two jobs (or was
//!   acknowledged with two ids), or a job completed more than once;
//! - **unexpected**: a job in the final state that no client submitted;
//! - **recovered**: a submission whose outcome the client never learned (a
//!   timeout) that nevertheless exists: allowed, counted;
//! - **two states**: a job whose history holds two different endings, or whose
//!   state is not the one its history ends in;
//! - **backwards**: a node that showed a job in a later state, then an earlier
//!   one (between two starts of that node);
//! - **double leaders**: two nodes leading in one term, or two nodes naming
//!   different leaders for one term;
//! - **diverged**: replicas that disagree after healing, and result images that
//!   differ between nodes;
//! - **image unreadable**: a kept result whose image a live node, after
//!   healing, could not serve, or served with other bytes than its sha256
//!   names (only where the run read the images: `FinalNode::images_read`).
//!
//! Per fault it measures unavailability (RTO): the time from the fault to the
//! completion of the first acknowledged submission invoked after it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::history::{FinalJob, FinalNode, Outcome, Record};

/// Most examples listed per category (the counts are always complete).
const MAX_EXAMPLES: usize = 20;

/// A category's count and a few examples.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub count: usize,
    pub examples: Vec<String>,
}

impl Finding {
    fn add(&mut self, example: String) {
        self.count += 1;
        if self.examples.len() < MAX_EXAMPLES {
            self.examples.push(example);
        }
    }
}

/// One fault and what it cost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultReport {
    pub id: u32,
    pub fault: String,
    pub nodes: Vec<u64>,
    pub at_ms: u64,
    pub healed_ms: Option<u64>,
    /// Fault to the first acknowledged submission invoked after it; `None`
    /// when no submission was acknowledged after it.
    pub rto_ms: Option<u64>,
    /// Lost acknowledged jobs whose acknowledgement came after this fault and
    /// before the next one.
    pub rpo_jobs: usize,
}

/// RTO percentiles over the faults of one kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultKindSummary {
    pub fault: String,
    pub count: usize,
    /// Faults after which no submission was acknowledged at all.
    pub unmeasured: usize,
    pub rto_p50_ms: Option<u64>,
    pub rto_p99_ms: Option<u64>,
    pub rto_max_ms: Option<u64>,
    pub rpo_jobs: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Distinct idempotency keys submitted, and how they ended.
    pub submitted: usize,
    pub acknowledged: usize,
    pub failed: usize,
    pub indeterminate: usize,
    /// Jobs in the final state, and how many of them succeeded.
    pub final_jobs: usize,
    pub succeeded: usize,
    pub cancelled: usize,
    pub job_failed: usize,
    pub lost: Finding,
    pub duplicated: Finding,
    pub unexpected: Finding,
    pub recovered: Finding,
    pub two_states: Finding,
    pub backwards: Finding,
    pub double_leaders: Finding,
    pub diverged: Finding,
    pub image_mismatch: Finding,
    #[serde(default)]
    pub image_unreadable: Finding,
    /// Jobs still queued or running at the end (the run did not let them
    /// finish): reported, not a violation.
    pub unfinished: usize,
    pub faults: Vec<FaultReport>,
    pub fault_kinds: Vec<FaultKindSummary>,
}

impl Report {
    /// Every category with its name, and whether any count in it breaks a
    /// guarantee (`recovered` is allowed and only counted).
    fn categories(&self) -> [(&'static str, &Finding, bool); 10] {
        [
            ("lost", &self.lost, true),
            ("duplicated", &self.duplicated, true),
            ("unexpected", &self.unexpected, true),
            ("recovered", &self.recovered, false),
            ("two states", &self.two_states, true),
            ("backwards", &self.backwards, true),
            ("double leaders", &self.double_leaders, true),
            ("diverged", &self.diverged, true),
            ("image mismatch", &self.image_mismatch, true),
            ("image unreadable", &self.image_unreadable, true),
        ]
    }

    /// Every violated guarantee, one line each; empty means the run passed.
    pub fn violations(&self) -> Vec<String> {
        self.categories()
            .into_iter()
            .filter(|(_, f, violation)| *violation && f.count > 0)
            .map(|(name, f, _)| format!("{name}: {} ({})", f.count, f.examples.join("; ")))
            .collect()
    }

    pub fn is_ok(&self) -> bool {
        self.violations().is_empty()
    }

    /// A readable summary: totals, findings, and RTO per fault kind.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        s += &format!(
            "submissions: {} ({} acknowledged, {} failed, {} indeterminate)\n",
            self.submitted, self.acknowledged, self.failed, self.indeterminate
        );
        s += &format!(
            "final jobs: {} ({} succeeded, {} failed, {} cancelled, {} unfinished)\n",
            self.final_jobs, self.succeeded, self.job_failed, self.cancelled, self.unfinished
        );
        for (name, f, _) in self.categories() {
            s += &format!("{name:>15}: {}\n", f.count);
        }
        if !self.fault_kinds.is_empty() {
            s += "faults (RTO = fault to next acknowledged submission):\n";
            let ms = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{v} ms"));
            for k in &self.fault_kinds {
                s += &format!(
                    "  {:<18} x{:<4} RTO p50 {:>8}  p99 {:>8}  max {:>8}  RPO {} job(s){}\n",
                    k.fault,
                    k.count,
                    ms(k.rto_p50_ms),
                    ms(k.rto_p99_ms),
                    ms(k.rto_max_ms),
                    k.rpo_jobs,
                    if k.unmeasured > 0 { format!(" ({} unmeasured)", k.unmeasured) } else { String::new() }
                );
            }
        }
        let v = self.violations();
        if v.is_empty() {
            s += "verdict: OK, no violation\n";
        } else {
            s += &format!("verdict: {} VIOLATION(S)\n", v.len());
            for line in v {
                s += &format!("  {line}\n");
            }
        }
        s
    }
}

/// Where a state sits in a job's life, for "backwards": (attempt, rank).
/// The attempt number grows at each assignment; a job whose attempt `a` ended
/// without ending the job (a retryable failure, a lost or stopping node) is
/// queued again still showing attempt `a`, after `a`'s assigned and running
/// and before attempt `a + 1`. So the pair only grows.
fn rank(state: &str, attempt: u32) -> u8 {
    match state {
        "queued" if attempt == 0 => 0,
        "assigned" => 1,
        "running" => 2,
        "queued" => 3,
        _ => TERMINAL, // succeeded, failed, cancelled
    }
}

const TERMINAL: u8 = 4;

/// The state an event ends a job in, if it ends one. A job answered from the
/// result cache (`cache_hit`) succeeds without running; an attempt that failed
/// worth retrying (`attempt_failed`) ends nothing.
fn ending(e: &str) -> Option<&'static str> {
    match e {
        "succeeded" | "cache_hit" => Some("succeeded"),
        "failed" => Some("failed"),
        "cancelled" => Some("cancelled"),
        _ => None,
    }
}

fn is_terminal_state(s: &str) -> bool {
    matches!(s, "succeeded" | "failed" | "cancelled")
}

pub fn check(history: &[Record], finals: &[FinalNode]) -> Report {
    let mut r = Report::default();

    // --- Submissions, by idempotency key.
    let mut acked: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new(); // key -> ids acknowledged
    let mut ack_at: BTreeMap<&str, u64> = BTreeMap::new(); // id -> first ack time
    let mut invoked: BTreeSet<&str> = BTreeSet::new();
    let mut unknown: BTreeSet<&str> = BTreeSet::new(); // keys whose every try ended unknown
    let mut outcome_of: BTreeMap<&str, u8> = BTreeMap::new(); // 2 ok, 1 info, 0 fail (best seen)
    for rec in history {
        if let Record::Submit { key, outcome, job, complete_ms, .. } = rec {
            invoked.insert(key);
            let rank = match outcome {
                Outcome::Ok => 2,
                Outcome::Info { .. } => 1,
                Outcome::Fail { .. } => 0,
            };
            let best = outcome_of.entry(key).or_insert(rank);
            *best = (*best).max(rank);
            if let (Outcome::Ok, Some(id)) = (outcome, job) {
                acked.entry(key).or_default().insert(id);
                let t = ack_at.entry(id).or_insert(*complete_ms);
                *t = (*t).min(*complete_ms);
            }
        }
    }
    for (key, best) in &outcome_of {
        match best {
            2 => r.acknowledged += 1,
            1 => {
                r.indeterminate += 1;
                unknown.insert(key);
            }
            _ => r.failed += 1,
        }
    }
    r.submitted = outcome_of.len();
    for (key, ids) in &acked {
        if ids.len() > 1 {
            r.duplicated.add(format!("key {key} acknowledged as {} jobs: {ids:?}", ids.len()));
        }
    }

    // --- The final state, judged on every replica.
    let reference = finals.iter().max_by_key(|n| (n.last_applied, std::cmp::Reverse(n.node)));
    let mut lost_ids: BTreeSet<&str> = BTreeSet::new();
    if let Some(reference) = reference {
        let jobs: BTreeMap<&str, &FinalJob> = reference.jobs.iter().map(|j| (j.id.as_str(), j)).collect();
        r.final_jobs = jobs.len();
        let mut by_key: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for job in jobs.values() {
            match job.state.as_str() {
                "succeeded" => r.succeeded += 1,
                "failed" => r.job_failed += 1,
                "cancelled" => r.cancelled += 1,
                _ => r.unfinished += 1,
            }
            match &job.idempotency_key {
                Some(k) if invoked.contains(k.as_str()) => {
                    by_key.entry(k.as_str()).or_default().push(job.id.as_str());
                    if unknown.contains(k.as_str()) {
                        r.recovered.add(format!("key {k} (client saw no answer) is job {}", job.id));
                    }
                }
                Some(k) => r.unexpected.add(format!("job {} has key {k}, which no client submitted", job.id)),
                None => r.unexpected.add(format!("job {} has no idempotency key", job.id)),
            }
            let completions = job.events.iter().filter(|e| ending(e) == Some("succeeded")).count();
            if completions > 1 {
                r.duplicated.add(format!("job {} succeeded {completions} times", job.id));
            }
            let endings: BTreeSet<&str> = job.events.iter().filter_map(|e| ending(e)).collect();
            let last_ending = job.events.iter().rev().find_map(|e| ending(e));
            if endings.len() > 1 {
                r.two_states.add(format!("job {} ended as {endings:?}", job.id));
            } else if is_terminal_state(&job.state) != last_ending.is_some()
                || last_ending.is_some_and(|e| e != job.state)
            {
                r.two_states.add(format!("job {} is {} but its history ends {:?}", job.id, job.state, last_ending));
            }
        }
        for (key, ids) in &by_key {
            if ids.len() > 1 {
                r.duplicated.add(format!("key {key} became {} jobs: {ids:?}", ids.len()));
            }
        }
        for (key, ids) in &acked {
            for id in ids {
                if !jobs.contains_key(id) {
                    r.lost.add(format!("key {key}: acknowledged job {id} is absent"));
                    lost_ids.insert(id);
                }
            }
        }

        // Every kept image must be readable, byte-identical, from every node.
        for node in finals.iter().filter(|n| n.images_read) {
            for j in &node.jobs {
                let Some(want) = &j.image_sha256 else { continue };
                if j.image_read.as_ref() != Some(want) {
                    r.image_unreadable.add(format!(
                        "job {}: node {} read {} for image {want:.12}",
                        j.id,
                        node.node,
                        j.image_read.as_deref().unwrap_or("nothing")
                    ));
                }
            }
        }

        // Every replica must hold the same jobs in the same states and images.
        for other in finals.iter().filter(|n| n.node != reference.node) {
            if other.last_applied != reference.last_applied {
                r.diverged.add(format!(
                    "node {} applied {} entries, node {} applied {}",
                    other.node, other.last_applied, reference.node, reference.last_applied
                ));
            }
            let theirs: BTreeMap<&str, &FinalJob> = other.jobs.iter().map(|j| (j.id.as_str(), j)).collect();
            for (id, mine) in &jobs {
                match theirs.get(id) {
                    None => {
                        r.diverged.add(format!("job {id} is on node {} but not node {}", reference.node, other.node))
                    }
                    Some(t) => {
                        if let (Some(a), Some(b)) = (&mine.image_sha256, &t.image_sha256) {
                            if a != b {
                                r.image_mismatch.add(format!(
                                    "job {id}: image {a:.12} on node {}, {b:.12} on node {}",
                                    reference.node, other.node
                                ));
                            }
                        }
                        let strip = |j: &FinalJob| (j.state.clone(), j.attempt, j.node, j.events.clone());
                        if strip(mine) != strip(t) {
                            r.diverged.add(format!(
                                "job {id}: node {} has {} attempt {}, node {} has {} attempt {}",
                                reference.node, mine.state, mine.attempt, other.node, t.state, t.attempt
                            ));
                        }
                    }
                }
            }
            for id in theirs.keys().filter(|id| !jobs.contains_key(*id)) {
                r.diverged.add(format!("job {id} is on node {} but not node {}", other.node, reference.node));
            }
        }
    } else {
        for (key, ids) in &acked {
            for id in ids {
                r.lost.add(format!("key {key}: acknowledged job {id}, and no replica's final state was read"));
                lost_ids.insert(id);
            }
        }
    }

    // --- Reads: per node, a job's (attempt, state) never goes back, between
    // two starts of that node.
    let mut seen: BTreeMap<(u64, &str), (u32, u8, &str)> = BTreeMap::new();
    let mut sorted: Vec<&Record> = history.iter().collect();
    sorted.sort_by_key(|r| r.at_ms());
    for rec in &sorted {
        match rec {
            Record::NodeStart { node, .. } => seen.retain(|(n, _), _| n != node),
            Record::Poll { job, node, state: Some(state), attempt: Some(attempt), .. } => {
                let now = (*attempt, rank(state, *attempt), state.as_str());
                if let Some(before) = seen.get(&(*node, job.as_str())) {
                    let went_back = (now.0, now.1) < (before.0, before.1)
                        || (before.1 == TERMINAL && now.1 == TERMINAL && before.2 != now.2);
                    if went_back {
                        r.backwards.add(format!(
                            "node {node} showed job {job} as {} (attempt {}), then {} (attempt {})",
                            before.2, before.0, now.2, now.0
                        ));
                    }
                }
                seen.insert((*node, job.as_str()), now);
            }
            _ => {}
        }
    }

    // --- Leadership: one leader per term.
    let mut leaders: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new(); // term -> nodes leading
    let mut named: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new(); // term -> leaders named
    for rec in history {
        if let Record::Leadership { node, term, leader: Some(leader), .. } = rec {
            named.entry(*term).or_default().insert(*leader);
            if leader == node {
                leaders.entry(*term).or_default().insert(*node);
            }
        }
    }
    for (term, nodes) in &leaders {
        if nodes.len() > 1 {
            r.double_leaders.add(format!("term {term}: nodes {nodes:?} each claimed to lead"));
        }
    }
    for (term, names) in &named {
        if names.len() > 1 && leaders.get(term).is_none_or(|l| l.len() <= 1) {
            r.double_leaders.add(format!("term {term}: nodes named different leaders {names:?}"));
        }
    }

    // --- Faults: RTO and RPO.
    let mut starts: Vec<(u64, u32, &str, &Vec<u64>)> = Vec::new();
    let mut ends: BTreeMap<u32, u64> = BTreeMap::new();
    for rec in history {
        match rec {
            Record::FaultStart { at_ms, id, fault, nodes } => starts.push((*at_ms, *id, fault, nodes)),
            Record::FaultEnd { at_ms, id } => {
                ends.insert(*id, *at_ms);
            }
            _ => {}
        }
    }
    starts.sort();
    // Acknowledged submissions as (invoke, complete), sorted by invocation.
    let mut acks: Vec<(u64, u64)> = history
        .iter()
        .filter_map(|rec| match rec {
            Record::Submit { invoke_ms, complete_ms, outcome: Outcome::Ok, .. } => Some((*invoke_ms, *complete_ms)),
            _ => None,
        })
        .collect();
    acks.sort();
    for (i, (at, id, fault, nodes)) in starts.iter().enumerate() {
        let from = acks.partition_point(|(inv, _)| inv < at);
        let rto = acks[from..].iter().map(|(_, done)| done - at).min();
        let next = starts.get(i + 1).map_or(u64::MAX, |s| s.0);
        let rpo = lost_ids.iter().filter(|id| ack_at.get(*id).is_some_and(|t| t >= at && *t < next)).count();
        r.faults.push(FaultReport {
            id: *id,
            fault: fault.to_string(),
            nodes: (*nodes).clone(),
            at_ms: *at,
            healed_ms: ends.get(id).copied(),
            rto_ms: rto,
            rpo_jobs: rpo,
        });
    }
    let mut kinds: BTreeMap<&str, Vec<&FaultReport>> = BTreeMap::new();
    for f in &r.faults {
        kinds.entry(f.fault.as_str()).or_default().push(f);
    }
    for (fault, list) in kinds {
        let mut rtos: Vec<u64> = list.iter().filter_map(|f| f.rto_ms).collect();
        rtos.sort_unstable();
        let pct = |p: f64| -> Option<u64> {
            if rtos.is_empty() {
                return None;
            }
            let idx = ((p * rtos.len() as f64).ceil() as usize).clamp(1, rtos.len()) - 1;
            Some(rtos[idx])
        };
        r.fault_kinds.push(FaultKindSummary {
            fault: fault.to_string(),
            count: list.len(),
            unmeasured: list.len() - rtos.len(),
            rto_p50_ms: pct(0.50),
            rto_p99_ms: pct(0.99),
            rto_max_ms: rtos.last().copied(),
            rpo_jobs: list.iter().map(|f| f.rpo_jobs).sum(),
        });
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submit(key: &str, at: u64, outcome: Outcome, job: Option<&str>) -> Record {
        Record::Submit {
            client: 1,
            key: key.into(),
            nodes: vec![1],
            invoke_ms: at,
            complete_ms: at + 5,
            outcome,
            job: job.map(Into::into),
        }
    }

    fn ok(key: &str, at: u64, job: &str) -> Record {
        submit(key, at, Outcome::Ok, Some(job))
    }

    fn done(id: &str, key: &str) -> FinalJob {
        FinalJob {
            id: id.into(),
            idempotency_key: Some(key.into()),
            state: "succeeded".into(),
            attempt: 1,
            node: Some(2),
            events: ["submitted", "assigned", "started", "succeeded"].map(String::from).to_vec(),
            image_sha256: Some(format!("sha-of-{id}")),
            image_read: Some(format!("sha-of-{id}")),
        }
    }

    fn replicas(jobs: Vec<FinalJob>) -> Vec<FinalNode> {
        (1..=3).map(|node| FinalNode { node, last_applied: 40, jobs: jobs.clone(), images_read: true }).collect()
    }

    fn leadership(node: u64, term: u64, leader: u64) -> Record {
        Record::Leadership { at_ms: 10, node, term, leader: Some(leader) }
    }

    /// A clean run: three acknowledged jobs, all done on every replica, one
    /// leader per term. The baseline the planted faults are compared with.
    fn clean() -> (Vec<Record>, Vec<FinalNode>) {
        let history = vec![
            leadership(1, 1, 1),
            leadership(2, 1, 1),
            ok("k1", 10, "j1"),
            Record::FaultStart { at_ms: 20, id: 1, fault: "kill-leader".into(), nodes: vec![1] },
            ok("k2", 30, "j2"),
            leadership(2, 2, 2),
            leadership(3, 2, 2),
            ok("k3", 40, "j3"),
        ];
        (history, replicas(vec![done("j1", "k1"), done("j2", "k2"), done("j3", "k3")]))
    }

    #[test]
    fn a_clean_history_passes_and_measures_rto() {
        let (h, f) = clean();
        let r = check(&h, &f);
        assert!(r.is_ok(), "{}", r.summary());
        assert_eq!((r.submitted, r.acknowledged, r.final_jobs, r.succeeded), (3, 3, 3, 3));
        assert_eq!(r.faults.len(), 1);
        assert_eq!(r.faults[0].rto_ms, Some(15), "fault at 20, first ack invoked after it completes at 35");
        assert_eq!(r.fault_kinds[0].rto_max_ms, Some(15));
    }

    #[test]
    fn flags_a_planted_lost_job() {
        let (h, mut f) = clean();
        for n in &mut f {
            n.jobs.retain(|j| j.id != "j2");
        }
        let r = check(&h, &f);
        assert_eq!(r.lost.count, 1, "{}", r.summary());
        assert!(r.lost.examples[0].contains("j2"));
        assert_eq!(r.faults[0].rpo_jobs, 1, "j2 was acknowledged after the fault");
        assert!(!r.is_ok());
    }

    #[test]
    fn flags_a_planted_duplicate() {
        // Two jobs for one idempotency key.
        let (h, _) = clean();
        let f = replicas(vec![done("j1", "k1"), done("j2", "k2"), done("j3", "k3"), done("j4", "k3")]);
        let r = check(&h, &f);
        assert_eq!(r.duplicated.count, 1, "{}", r.summary());
        assert!(!r.is_ok());

        // One job completed twice.
        let mut twice = done("j3", "k3");
        twice.events.extend(["started", "succeeded"].map(String::from));
        let f = replicas(vec![done("j1", "k1"), done("j2", "k2"), twice]);
        let r = check(&h, &f);
        assert_eq!(r.duplicated.count, 1, "{}", r.summary());

        // One key acknowledged with two different ids.
        let mut h2 = h.clone();
        h2.push(ok("k3", 50, "j9"));
        let r = check(&h2, &replicas(vec![done("j1", "k1"), done("j2", "k2"), done("j3", "k3"), done("j9", "k9")]));
        assert!(r.duplicated.count >= 1, "{}", r.summary());
        assert_eq!(r.unexpected.count, 1, "k9 was never submitted");
    }

    #[test]
    fn flags_a_planted_double_leader_term() {
        let (mut h, f) = clean();
        h.push(leadership(3, 2, 3)); // node 3 also claims term 2
        let r = check(&h, &f);
        assert_eq!(r.double_leaders.count, 1, "{}", r.summary());
        assert!(!r.is_ok());

        // Followers naming different leaders for one term is the same fault seen from outside.
        let (mut h, f) = clean();
        h.push(Record::Leadership { at_ms: 11, node: 3, term: 1, leader: Some(2) });
        assert_eq!(check(&h, &f).double_leaders.count, 1);
    }

    #[test]
    fn flags_unexpected_two_states_backwards_and_divergence() {
        let (mut h, mut f) = clean();
        // A job nobody submitted.
        f[0].jobs.push(done("j7", "never-sent"));
        // Node 2 and 3 lack it: divergence as well.
        let r = check(&h, &f);
        assert_eq!(r.unexpected.count, 1);
        assert!(r.diverged.count >= 2, "{}", r.summary());

        // A job that both succeeded and was cancelled.
        let (_, mut f) = clean();
        for n in &mut f {
            n.jobs[0].events.push("cancelled".into());
        }
        assert_eq!(check(&h, &f).two_states.count, 1);

        // A node showing a job succeeded, then running.
        let poll = |at: u64, state: &str| Record::Poll {
            client: 1,
            job: "j1".into(),
            node: 2,
            invoke_ms: at,
            complete_ms: at,
            state: Some(state.into()),
            attempt: Some(1),
        };
        h.push(poll(50, "succeeded"));
        h.push(poll(60, "running"));
        let (_, f) = clean();
        assert_eq!(check(&h, &f).backwards.count, 1);
        // ... which is not a violation across a restart of that node.
        h.insert(h.len() - 1, Record::NodeStart { at_ms: 55, node: 2 });
        assert_eq!(check(&h, &f).backwards.count, 0);

        // Re-queue with a higher attempt is progress, not going back.
        let (mut h, f) = clean();
        h.push(poll(50, "running"));
        h.push(Record::Poll {
            client: 1,
            job: "j1".into(),
            node: 2,
            invoke_ms: 70,
            complete_ms: 70,
            state: Some("queued".into()),
            attempt: Some(2),
        });
        assert_eq!(check(&h, &f).backwards.count, 0);

        // An attempt that failed retryably queues the job again still showing
        // that attempt (seeds 910353 and others of `chaos sim` caught it):
        // progress; running it again under the same attempt is not; nor is a
        // fresh-queue read after it.
        let at = |at: u64, state: &str, attempt: u32| Record::Poll {
            client: 1,
            job: "j1".into(),
            node: 2,
            invoke_ms: at,
            complete_ms: at,
            state: Some(state.into()),
            attempt: Some(attempt),
        };
        let (mut h, f) = clean();
        h.extend([at(50, "running", 1), at(60, "queued", 1), at(70, "assigned", 2), at(80, "succeeded", 2)]);
        assert_eq!(check(&h, &f).backwards.count, 0);
        let (mut h, f) = clean();
        h.extend([at(50, "queued", 1), at(60, "cancelled", 1)]);
        assert_eq!(check(&h, &f).backwards.count, 0);
        let (mut h, f) = clean();
        h.extend([at(50, "queued", 1), at(60, "running", 1)]);
        assert_eq!(check(&h, &f).backwards.count, 1);
        let (mut h, f) = clean();
        h.extend([at(50, "assigned", 1), at(60, "queued", 0)]);
        assert_eq!(check(&h, &f).backwards.count, 1);

        // An image that differs between replicas.
        let (h, mut f) = clean();
        f[2].jobs[1].image_sha256 = Some("other".into());
        assert_eq!(check(&h, &f).image_mismatch.count, 1);
    }

    #[test]
    fn a_kept_image_that_a_node_cannot_serve_is_a_violation() {
        // One node could not read it (its holders lost it), another read
        // other bytes than the sha256 names.
        let (h, mut f) = clean();
        f[0].jobs[0].image_read = Some("error: HTTP 503".into());
        f[1].jobs[2].image_read = Some("sha-of-something-else".into());
        let r = check(&h, &f);
        assert_eq!(r.image_unreadable.count, 2, "{}", r.summary());
        assert!(!r.is_ok());
        assert!(r.violations().iter().any(|v| v.starts_with("image unreadable: 2")));
        // A node that did not read images is not judged on them; an evicted
        // result (no sha256 kept) is not read.
        f[0].images_read = false;
        f[1].jobs[2].image_sha256 = None;
        f[2].jobs[2].image_sha256 = None;
        f[1].jobs[2].image_read = None;
        assert_eq!(check(&h, &f).image_unreadable.count, 0);
    }

    #[test]
    fn retried_attempts_and_cache_hits_are_clean_endings() {
        let (h, mut f) = clean();
        for n in &mut f {
            n.jobs[0].events =
                ["submitted", "assigned", "started", "attempt_failed", "assigned", "started", "succeeded"]
                    .map(String::from)
                    .to_vec();
            n.jobs[1].events = ["submitted", "cache_hit"].map(String::from).to_vec();
        }
        let r = check(&h, &f);
        assert!(r.is_ok(), "{}", r.summary());

        // A cache hit that also ran is a job completed twice.
        for n in &mut f {
            n.jobs[1].events.extend(["assigned", "started", "succeeded"].map(String::from));
        }
        assert_eq!(check(&h, &f).duplicated.count, 1);
    }

    #[test]
    fn an_unanswered_submission_that_exists_is_recovered_not_unexpected() {
        let (mut h, _) = clean();
        h.push(submit("k4", 60, Outcome::Info { error: "timeout".into() }, None));
        let f = replicas(vec![done("j1", "k1"), done("j2", "k2"), done("j3", "k3"), done("j4", "k4")]);
        let r = check(&h, &f);
        assert!(r.is_ok(), "{}", r.summary());
        assert_eq!((r.recovered.count, r.indeterminate), (1, 1));
    }
}
