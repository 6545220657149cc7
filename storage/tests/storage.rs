//! The sled storage: openraft's own conformance suite, plus durability across
//! a reopen of the same directory (vote, log, truncate/purge, snapshots).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use openraft::storage::{LogState, RaftLogReader, RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{
    BasicNode, CommittedLeaderId, Entry, EntryPayload, Membership, RaftSnapshotBuilder, StorageError, Vote,
};
use raftgen_raft::command::{ClusterConfig, Command, ModelInfo, NodeRegistration, Outcome};
use raftgen_raft::job::{JobId, JobRequest, JobState};
use raftgen_raft::state::JobStateMachine;
use raftgen_raft::{codec, LogId, NodeId, Request, Response, StoredMembership, TypeConfig};
use raftgen_storage::{open, LogStore, SmData, StateMachineStore};
use tempfile::TempDir;

// ---------------------------------------------------------------------------
// openraft's storage conformance suite
// ---------------------------------------------------------------------------

/// Each build is a fresh store in its own temporary directory (the guard).
struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<NodeId>> {
        let dir = TempDir::new().expect("temp dir");
        let (log, sm) = open(dir.path()).expect("open store");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    // The suite runs each case on its own runtime, so this is a plain #[test].
    Suite::test_all(Builder).expect("openraft storage suite");
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn request(i: u64) -> JobRequest {
    JobRequest {
        prompt: format!("prompt {i}"),
        negative_prompt: String::new(),
        width: 64,
        height: 64,
        steps: 10,
        guidance: 5.0,
        seed: None,
        model: "m".into(),
        priority: (i % 3) as i32,
        sampler: None,
        cache: true,
        webhook: None,
    }
}

/// A result's metadata (its bytes are off the log), held by node 1.
fn meta(job: u128) -> raftgen_raft::result::ResultMeta {
    raftgen_raft::result::ResultMeta {
        sha256: raftgen_raft::result::ResultHash::of(&job.to_le_bytes()),
        bytes: 100,
        width: 64,
        height: 64,
        location: raftgen_raft::result::Location::Nodes([1].into()),
    }
}

fn normal(term: u64, index: u64, cmd: Command) -> Entry<TypeConfig> {
    Entry { log_id: log_id(term, index), payload: EntryPayload::Normal(Request { at_ms: index * 10, cmd }) }
}

fn submit(term: u64, index: u64) -> Entry<TypeConfig> {
    normal(
        term,
        index,
        Command::Submit { id: JobId(index as u128), request: request(index), seed: Some(index), idempotency_key: None },
    )
}

fn membership(term: u64, index: u64, voters: &[NodeId]) -> Entry<TypeConfig> {
    let nodes: BTreeMap<NodeId, BasicNode> = voters.iter().map(|n| (*n, BasicNode::new(format!("n{n}")))).collect();
    let voters: BTreeSet<NodeId> = voters.iter().copied().collect();
    Entry { log_id: log_id(term, index), payload: EntryPayload::Membership(Membership::new(vec![voters], nodes)) }
}

fn blank(term: u64, index: u64) -> Entry<TypeConfig> {
    Entry { log_id: log_id(term, index), payload: EntryPayload::Blank }
}

/// A log with every kind of payload, indexes `from..=to`.
fn entries(from: u64, to: u64) -> Vec<Entry<TypeConfig>> {
    (from..=to)
        .map(|i| match i % 5 {
            0 => blank(1 + i / 10, i),
            1 => membership(1 + i / 10, i, &[1, 2, 3]),
            _ => submit(1 + i / 10, i),
        })
        .collect()
}

async fn read_all(log: &mut LogStore) -> Vec<Entry<TypeConfig>> {
    log.try_get_log_entries(0..u64::MAX).await.expect("read log")
}

/// Opens the directory, retrying briefly in case sled's background flusher of
/// a just-dropped instance still holds the lock.
fn reopen(dir: &Path) -> (LogStore, StateMachineStore) {
    let mut last = None;
    for _ in 0..50 {
        match open(dir) {
            Ok(stores) => return stores,
            Err(e) => {
                last = Some(e);
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
    panic!("reopen failed: {last:?}");
}

// ---------------------------------------------------------------------------
// Log store durability
// ---------------------------------------------------------------------------

#[tokio::test]
async fn vote_is_persisted_across_reopen() {
    let dir = TempDir::new().unwrap();
    {
        let (mut log, _sm) = open(dir.path()).unwrap();
        assert_eq!(log.read_vote().await.unwrap(), None);
        log.save_vote(&Vote::new(2, 1)).await.unwrap();
        // A later vote replaces the earlier one.
        let mut vote = Vote::new(3, 2);
        vote.commit();
        log.save_vote(&vote).await.unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    }
    let (mut log, _sm) = reopen(dir.path());
    let mut expected = Vote::new(3, 2);
    expected.commit();
    assert_eq!(log.read_vote().await.unwrap(), Some(expected));
    assert!(log.read_vote().await.unwrap().unwrap().is_committed());
}

#[tokio::test]
async fn entries_are_readable_after_reopen() {
    let dir = TempDir::new().unwrap();
    let written = entries(1, 30);
    {
        let (mut log, _sm) = open(dir.path()).unwrap();
        assert_eq!(log.get_log_state().await.unwrap(), LogState { last_purged_log_id: None, last_log_id: None });
        // Several batches, as openraft appends them.
        log.blocking_append(written[..1].to_vec()).await.unwrap();
        log.blocking_append(written[1..17].to_vec()).await.unwrap();
        log.blocking_append(written[17..].to_vec()).await.unwrap();
        log.save_committed(Some(written[29].log_id)).await.unwrap();
        // save_committed is made durable by the next flush.
        log.save_vote(&Vote::new(3, 1)).await.unwrap();
    }
    let (mut log, _sm) = reopen(dir.path());
    assert_eq!(read_all(&mut log).await, written);
    assert_eq!(
        log.get_log_state().await.unwrap(),
        LogState { last_purged_log_id: None, last_log_id: Some(written[29].log_id) }
    );
    assert_eq!(log.read_committed().await.unwrap(), Some(written[29].log_id));
    // Ranges of every bound kind.
    assert_eq!(log.try_get_log_entries(5..8).await.unwrap(), written[4..7].to_vec());
    assert_eq!(log.try_get_log_entries(5..=8).await.unwrap(), written[4..8].to_vec());
    assert_eq!(log.try_get_log_entries(28..).await.unwrap(), written[27..].to_vec());
    assert_eq!(log.try_get_log_entries(..3).await.unwrap(), written[..2].to_vec());
    assert!(log.try_get_log_entries(31..40).await.unwrap().is_empty());
    // The reader handle sees the same log.
    let mut reader = log.get_log_reader().await;
    assert_eq!(read_all(&mut reader).await, written);
}

#[tokio::test]
async fn appending_over_a_conflicting_suffix_replaces_it() {
    let dir = TempDir::new().unwrap();
    let (mut log, _sm) = open(dir.path()).unwrap();
    log.blocking_append(entries(1, 10)).await.unwrap();
    // A new leader truncates from 6 and writes its own entries.
    log.truncate(log_id(1, 6)).await.unwrap();
    let newer: Vec<_> = (6..=8).map(|i| submit(5, i)).collect();
    log.blocking_append(newer.clone()).await.unwrap();
    let all = read_all(&mut log).await;
    assert_eq!(all.len(), 8);
    assert_eq!(all[5..].to_vec(), newer);
    assert_eq!(log.get_log_state().await.unwrap().last_log_id, Some(log_id(5, 8)));
}

#[tokio::test]
async fn truncate_and_purge_are_persisted_across_reopen() {
    let dir = TempDir::new().unwrap();
    let written = entries(1, 20);
    {
        let (mut log, _sm) = open(dir.path()).unwrap();
        log.blocking_append(written.clone()).await.unwrap();
        log.truncate(written[14].log_id).await.unwrap(); // drops 15..=20
        log.purge(written[4].log_id).await.unwrap(); // drops ..=5
        assert_eq!(
            log.get_log_state().await.unwrap(),
            LogState { last_purged_log_id: Some(written[4].log_id), last_log_id: Some(written[13].log_id) }
        );
    }
    {
        let (mut log, _sm) = reopen(dir.path());
        assert_eq!(
            log.get_log_state().await.unwrap(),
            LogState { last_purged_log_id: Some(written[4].log_id), last_log_id: Some(written[13].log_id) }
        );
        assert_eq!(read_all(&mut log).await, written[5..14].to_vec());
        assert!(log.try_get_log_entries(1..=5).await.unwrap().is_empty());
        // Purge everything: the last log id is then the purged one.
        log.purge(written[13].log_id).await.unwrap();
    }
    {
        let (mut log, _sm) = reopen(dir.path());
        let state = log.get_log_state().await.unwrap();
        assert_eq!(
            state,
            LogState { last_purged_log_id: Some(written[13].log_id), last_log_id: Some(written[13].log_id) }
        );
        assert!(read_all(&mut log).await.is_empty());
        // A snapshot installed beyond the log purges past its end.
        let beyond = log_id(9, 50);
        log.purge(beyond).await.unwrap();
        assert_eq!(
            log.get_log_state().await.unwrap(),
            LogState { last_purged_log_id: Some(beyond), last_log_id: Some(beyond) }
        );
        // And the log continues after it.
        log.blocking_append([submit(9, 51)]).await.unwrap();
    }
    let (mut log, _sm) = reopen(dir.path());
    assert_eq!(
        log.get_log_state().await.unwrap(),
        LogState { last_purged_log_id: Some(log_id(9, 50)), last_log_id: Some(log_id(9, 51)) }
    );
    assert_eq!(read_all(&mut log).await, vec![submit(9, 51)]);
}

// ---------------------------------------------------------------------------
// State machine: apply, snapshots, reopen, install
// ---------------------------------------------------------------------------

/// What the jobs look like after applying `entries` to a plain state machine.
fn reference(entries: &[Entry<TypeConfig>]) -> JobStateMachine {
    let mut sm = JobStateMachine::default();
    for e in entries {
        if let EntryPayload::Normal(req) = &e.payload {
            sm.apply(e.log_id.index, req);
        }
    }
    sm
}

/// A log that exercises more than submissions: a node, an assignment, a result.
fn busy_log() -> Vec<Entry<TypeConfig>> {
    let info = NodeRegistration {
        slots: 2,
        models: vec![ModelInfo { name: "m".into(), ..Default::default() }],
        loaded_models: vec![],
        executor: "t".into(),
        refused_models: Vec::new(),
    };
    let assign = |index, job: u128| {
        let a = raftgen_raft::command::Assignment { job: JobId(job), node: 1, attempt: 1 };
        normal(1, index, Command::Assign { assignments: vec![a] })
    };
    vec![
        membership(1, 1, &[1]),
        blank(1, 2),
        normal(1, 3, Command::Configure(ClusterConfig { max_results: 10, ..Default::default() })),
        normal(1, 4, Command::RegisterNode { node: 1, info }),
        submit(1, 5),
        submit(1, 6),
        submit(1, 7),
        assign(8, 5),
        normal(1, 9, Command::Start { job: JobId(5), node: 1, attempt: 1 }),
        normal(
            1,
            10,
            Command::Complete {
                job: JobId(5),
                node: 1,
                attempt: 1,
                outcome: Outcome::Succeeded { result: meta(5), model_hash: "h".into(), notes: vec![] },
            },
        ),
        assign(11, 6),
        membership(2, 12, &[1, 2]),
        submit(2, 13),
        normal(2, 14, Command::Cancel { job: JobId(7) }),
        submit(2, 15),
        submit(2, 16),
    ]
}

fn sm_data(sm: &StateMachineStore) -> (Option<LogId>, StoredMembership, JobStateMachine) {
    let view = sm.view();
    let data = view.read();
    (data.last_applied, data.membership.clone(), data.jobs.clone())
}

#[tokio::test]
async fn apply_answers_each_entry_and_tracks_applied_state() {
    let dir = TempDir::new().unwrap();
    let (_log, mut sm) = open(dir.path()).unwrap();
    let log = busy_log();
    let view = sm.view();
    let mut applied = view.subscribe();
    assert_eq!(sm.applied_state().await.unwrap(), (None, StoredMembership::default()));

    let responses = sm.apply(log[..7].to_vec()).await.unwrap();
    assert_eq!(responses.len(), 7);
    assert_eq!(responses[0], Response::Ok, "membership");
    assert_eq!(responses[1], Response::Ok, "blank");
    assert!(matches!(&responses[4], Response::Submitted { created: true, job } if job.id == JobId(5)));
    assert!(applied.has_changed().unwrap());
    assert_eq!(*applied.borrow_and_update(), 7);
    assert!(view.bytes_since_snapshot() > 0);

    let responses = sm.apply(log[7..].to_vec()).await.unwrap();
    assert_eq!(responses.len(), log.len() - 7);
    assert_eq!(responses[0], Response::Applied { count: 1 });
    let (last, membership, jobs) = sm_data(&sm);
    assert_eq!(last, Some(log_id(2, 16)));
    assert_eq!(*applied.borrow(), 16);
    assert_eq!(membership.log_id(), &Some(log_id(2, 12)));
    assert_eq!(membership.membership().voter_ids().collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(jobs, reference(&log));
    assert_eq!(jobs.job(&JobId(5)).unwrap().state, JobState::Succeeded);
    assert_eq!(jobs.image(&JobId(5)).map(|i| i.0), Some(meta(5).sha256));
    assert_eq!(jobs.job(&JobId(7)).unwrap().state, JobState::Cancelled);
    assert_eq!(sm.applied_state().await.unwrap(), (last, membership));
}

#[tokio::test]
async fn snapshot_survives_reopen_and_the_log_replays_after_it() {
    let dir = TempDir::new().unwrap();
    let log_entries = busy_log();
    let cut = 11; // entries 1..=11 are in the snapshot
    let snapshot_meta;
    let snapshot_jobs;
    {
        let (mut log, mut sm) = open(dir.path()).unwrap();
        log.blocking_append(log_entries.clone()).await.unwrap();
        assert!(sm.get_current_snapshot().await.unwrap().is_none());
        sm.apply(log_entries[..cut].to_vec()).await.unwrap();
        let snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        assert_eq!(snap.meta.last_log_id, Some(log_id(1, 11)));
        assert_eq!(snap.meta.last_membership.log_id(), &Some(log_id(1, 1)));
        assert_eq!(sm.view().bytes_since_snapshot(), 0);
        // The snapshot bytes are the state itself.
        let data: SmData = codec::decode(snap.snapshot.get_ref()).unwrap();
        snapshot_jobs = sm_data(&sm).2;
        assert_eq!(data.jobs, snapshot_jobs);
        assert_eq!(data.last_applied, Some(log_id(1, 11)));
        snapshot_meta = snap.meta;
        // Applied after the snapshot: not in it, to be replayed from the log.
        sm.apply(log_entries[cut..].to_vec()).await.unwrap();
        assert_ne!(sm_data(&sm).2, snapshot_jobs);
        assert_eq!(sm.get_current_snapshot().await.unwrap().unwrap().meta, snapshot_meta);
    }
    let (mut log, mut sm) = reopen(dir.path());
    let (last, membership) = sm.applied_state().await.unwrap();
    assert_eq!(last, Some(log_id(1, 11)));
    assert_eq!(membership, snapshot_meta.last_membership);
    assert_eq!(sm_data(&sm).2, snapshot_jobs);
    assert_eq!(*sm.view().subscribe().borrow(), 11);
    let current = sm.get_current_snapshot().await.unwrap().expect("snapshot after reopen");
    assert_eq!(current.meta, snapshot_meta);
    // What openraft does on start: replay the log after the snapshot.
    let rest = log.try_get_log_entries(12..).await.unwrap();
    assert_eq!(rest, log_entries[cut..].to_vec());
    sm.apply(rest).await.unwrap();
    let (last, membership, jobs) = sm_data(&sm);
    assert_eq!(last, Some(log_id(2, 16)));
    assert_eq!(membership.log_id(), &Some(log_id(2, 12)));
    assert_eq!(jobs, reference(&log_entries));
    jobs.check_invariants().unwrap();
}

#[tokio::test]
async fn installed_snapshot_matches_the_source_and_persists() {
    let src_dir = TempDir::new().unwrap();
    let dst_dir = TempDir::new().unwrap();
    let log_entries = busy_log();
    let (_src_log, mut src) = open(src_dir.path()).unwrap();
    src.apply(log_entries.clone()).await.unwrap();
    let snap = src.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let expected = sm_data(&src);
    {
        let (_dst_log, mut dst) = open(dst_dir.path()).unwrap();
        // Some older state on the follower, to be replaced wholesale.
        dst.apply(vec![submit(1, 1), submit(1, 2)]).await.unwrap();
        let mut receiving = dst.begin_receiving_snapshot().await.unwrap();
        receiving.get_mut().extend_from_slice(snap.snapshot.get_ref());
        dst.install_snapshot(&snap.meta, receiving).await.unwrap();
        assert_eq!(sm_data(&dst), expected);
        assert_eq!(dst.applied_state().await.unwrap(), (expected.0, expected.1.clone()));
        assert_eq!(*dst.view().subscribe().borrow(), 16);
        assert_eq!(dst.get_current_snapshot().await.unwrap().unwrap().meta, snap.meta);
    }
    let (_dst_log, mut dst) = reopen(dst_dir.path());
    assert_eq!(sm_data(&dst), expected);
    let current = dst.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, snap.meta);
    assert_eq!(current.snapshot.get_ref(), snap.snapshot.get_ref());
}

#[tokio::test]
async fn a_corrupt_snapshot_is_refused_and_changes_nothing() {
    let dir = TempDir::new().unwrap();
    let (_log, mut sm) = open(dir.path()).unwrap();
    sm.apply(busy_log()).await.unwrap();
    let snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let before = sm_data(&sm);

    let mut truncated = snap.snapshot.get_ref().clone();
    truncated.truncate(truncated.len() / 2);
    for bytes in [truncated, b"not a snapshot".to_vec(), Vec::new()] {
        let mut receiving = sm.begin_receiving_snapshot().await.unwrap();
        *receiving.get_mut() = bytes;
        assert!(sm.install_snapshot(&snap.meta, receiving).await.is_err());
        assert_eq!(sm_data(&sm), before);
        assert_eq!(sm.get_current_snapshot().await.unwrap().unwrap().meta, snap.meta);
    }
}

#[tokio::test]
async fn snapshots_are_replaced_by_newer_ones() {
    let dir = TempDir::new().unwrap();
    let log_entries = busy_log();
    let first;
    let second;
    {
        let (_log, mut sm) = open(dir.path()).unwrap();
        sm.apply(log_entries[..5].to_vec()).await.unwrap();
        first = sm.get_snapshot_builder().await.build_snapshot().await.unwrap().meta;
        sm.apply(log_entries[5..].to_vec()).await.unwrap();
        second = sm.get_snapshot_builder().await.build_snapshot().await.unwrap().meta;
        assert_ne!(first.snapshot_id, second.snapshot_id);
    }
    let (_log, mut sm) = reopen(dir.path());
    assert_eq!(sm.get_current_snapshot().await.unwrap().unwrap().meta, second);
    assert_eq!(sm_data(&sm).2, reference(&log_entries));
}

// ---------------------------------------------------------------------------
// Crash windows and races
// ---------------------------------------------------------------------------

/// `purge` writes its marker before removing the entries; a crash in between
/// (simulated by writing the marker straight into sled) must still give a log
/// state with `last_purged_log_id <= last_log_id`, as openraft requires.
#[tokio::test]
async fn a_purge_marker_beyond_the_remaining_entries_is_the_last_log_id() {
    let dir = TempDir::new().unwrap();
    {
        let (mut log, _sm) = open(dir.path()).unwrap();
        log.blocking_append(entries(1, 14)).await.unwrap();
    }
    let beyond = log_id(9, 50);
    {
        // White-box: the layout of `log_store.rs` (tree `meta`, key `last_purged`).
        let db = sled::open(dir.path().join("sled")).unwrap();
        let meta = db.open_tree("meta").unwrap();
        meta.insert("last_purged", codec::encode(&beyond).unwrap()).unwrap();
        db.flush().unwrap();
    }
    let (mut log, _sm) = reopen(dir.path());
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state, LogState { last_purged_log_id: Some(beyond), last_log_id: Some(beyond) });
    // The log continues after the purge point, and the next purge clears the leftovers.
    log.blocking_append([submit(9, 51)]).await.unwrap();
    log.purge(log_id(9, 51)).await.unwrap();
    assert!(read_all(&mut log).await.is_empty());
}

/// openraft spawns snapshot building as its own task, so a build can race an
/// install. Whatever the interleaving, the snapshot kept on disk must be the
/// newer one: the log is purged up to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_build_racing_an_install_never_keeps_the_older_snapshot() {
    let dir = TempDir::new().unwrap();
    let src_dir = TempDir::new().unwrap();
    // The follower's state is large (many jobs with long prompts), so
    // building its snapshot takes a while.
    let mut log_entries = vec![normal(
        1,
        1,
        Command::RegisterNode {
            node: 1,
            info: NodeRegistration {
                slots: 1,
                models: vec![ModelInfo { name: "m".into(), ..Default::default() }],
                loaded_models: vec![],
                executor: "t".into(),
                refused_models: Vec::new(),
            },
        },
    )];
    let mut index = 1;
    for job in 0..2_000u128 {
        let mut next = |cmd| {
            index += 1;
            normal(1, index, cmd)
        };
        let request = JobRequest { prompt: format!("{job} {}", "long prompt ".repeat(160)), ..request(job as u64) };
        log_entries.push(next(Command::Submit { id: JobId(job), request, seed: Some(1), idempotency_key: None }));
        let a = raftgen_raft::command::Assignment { job: JobId(job), node: 1, attempt: 1 };
        log_entries.push(next(Command::Assign { assignments: vec![a] }));
        log_entries.push(next(Command::Complete {
            job: JobId(job),
            node: 1,
            attempt: 1,
            outcome: Outcome::Succeeded { result: meta(job), model_hash: "h".into(), notes: vec![] },
        }));
    }
    // The leader went further: it forgot every job, so its snapshot is small.
    let mut newer = log_entries.clone();
    let forget = ClusterConfig { max_finished_jobs: 0, ..Default::default() };
    newer.push(normal(1, index + 1, Command::Configure(forget)));

    let (_src_log, mut src) = open(src_dir.path()).unwrap();
    src.apply(newer.clone()).await.unwrap();
    let snap = src.get_snapshot_builder().await.build_snapshot().await.unwrap();

    for round in 0..3 {
        let round_dir = dir.path().join(round.to_string());
        {
            let (_log, mut sm) = open(&round_dir).unwrap();
            sm.apply(log_entries.clone()).await.unwrap();
            let mut builder = sm.get_snapshot_builder().await;
            let build = tokio::spawn(async move { builder.build_snapshot().await.map(|s| s.meta) });
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            let mut receiving = sm.begin_receiving_snapshot().await.unwrap();
            receiving.get_mut().extend_from_slice(snap.snapshot.get_ref());
            sm.install_snapshot(&snap.meta, receiving).await.unwrap();
            let built = build.await.unwrap().unwrap();
            assert!(built.last_log_id <= snap.meta.last_log_id);
            let current = sm.get_current_snapshot().await.unwrap().unwrap();
            assert_eq!(current.meta, snap.meta, "round {round}: an older built snapshot replaced the installed one");
            assert_eq!(sm_data(&sm).0, snap.meta.last_log_id);
        }
        let (_log, mut sm) = reopen(&round_dir);
        assert_eq!(sm.applied_state().await.unwrap().0, snap.meta.last_log_id, "round {round} after reopen");
    }
}
