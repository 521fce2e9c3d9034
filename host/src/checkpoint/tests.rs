use super::*;

fn store(location: &str, retain: usize) -> CheckpointStore {
    CheckpointStore::open(&Checkpointing { location: location.into(), options: BTreeMap::new(), retain }).unwrap()
}

fn identity(name: &str) -> PluginIdentity {
    PluginIdentity { name: name.into(), version: "1.0.0".into(), content_hash: "ab".repeat(32), state_version: 2 }
}

fn planned(id: u64) -> PlannedBatch {
    PlannedBatch::new(
        id,
        1_000 + id as i64,
        vec![TaskPlan { task: 0, ranges: vec![SavedRange { topic: "t".into(), partition: 0, from: id as i64 * 10, until: id as i64 * 10 + 10 }], watermark_ms: Some(5) }],
    )
}

fn checkpoint(id: u64) -> Checkpoint {
    Checkpoint {
        batch_id: id,
        created_ms: 7,
        tasks: vec![TaskState {
            task: 0,
            positions: vec![Position { topic: "t".into(), partition: 0, next: id as i64 * 10 + 10 }],
            plugins: vec![SavedPlugin { identity: identity("filter"), state: None }, SavedPlugin { identity: identity("agg"), state: Some(vec![id as u8; 100]) }],
            watermark_ms: Some(id as i64),
            // Kept by a repartition task; written and read back with the rest.
            upstream: vec![UpstreamMark { topic: "src".into(), partition: 2, batch_id: id, seq: 5 }],
        }],
        rate_controller: None,
    }
}

fn metadata() -> Metadata {
    Metadata { format_version: FORMAT_VERSION, pipeline: "p".into(), topics: vec!["t".into()], first_batch_id: 0, assignment: Assignment::All }
}

/// Run batches `0..n` through the store the way the pipeline loop does.
fn run(store: &CheckpointStore, n: u64) {
    store.create(&metadata()).unwrap();
    for id in 0..n {
        store.plan(&planned(id)).unwrap();
        store.commit(&checkpoint(id)).unwrap();
    }
}

#[test]
fn the_writer_commits_checkpoints_in_order_while_the_caller_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let s = std::sync::Arc::new(store(dir.path().to_str().unwrap(), 3));
    s.create(&metadata()).unwrap();
    let mut writer = CheckpointWriter::start(s.clone());
    for id in 0..5 {
        s.plan(&planned(id)).unwrap();
        writer.commit(checkpoint(id)).unwrap();
    }
    writer.flush().unwrap();
    let r = s.recover().unwrap();
    assert_eq!(r.checkpoint, Some(checkpoint(4)));
    assert!(r.replay.is_empty() && r.warnings.is_empty());
    assert_eq!(s.ids(CHECKPOINTS).unwrap(), vec![2, 3, 4], "retention pruned on the writer's thread");
}

#[test]
fn a_checkpoint_the_writer_cannot_write_fails_the_next_commit_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let s = std::sync::Arc::new(store(dir.path().to_str().unwrap(), 10));
    s.create(&metadata()).unwrap();
    // A file where the checkpoints directory belongs: no checkpoint can be written.
    std::fs::write(dir.path().join(CHECKPOINTS), b"in the way").unwrap();
    let mut writer = CheckpointWriter::start(s.clone());
    s.plan(&planned(0)).unwrap();
    writer.commit(checkpoint(0)).unwrap();
    let e = writer.commit(checkpoint(1)).unwrap_err().to_string();
    assert!(e.contains("cannot write checkpoints/"), "{e}");
    assert!(writer.flush().is_ok() && writer.commit(checkpoint(2)).is_err(), "the writer takes no checkpoint after a failed one");
    let r = s.recover().unwrap();
    assert_eq!((r.checkpoint, r.replay), (None, vec![planned(0)]), "the batch whose checkpoint failed is replayed");
}

#[test]
fn seal_detects_every_truncation_and_every_flipped_byte() {
    let sealed = encode_checkpoint(&checkpoint(3));
    assert_eq!(decode_checkpoint(&sealed).unwrap(), checkpoint(3));
    for cut in 0..sealed.len() {
        assert!(decode_checkpoint(&sealed[..cut]).is_err(), "a cut at {cut} went unnoticed");
    }
    for at in 0..sealed.len() {
        let mut bad = sealed.clone();
        bad[at] ^= 0x20;
        assert!(decode_checkpoint(&bad).is_err(), "a flipped byte at {at} went unnoticed");
    }
}

#[test]
fn a_new_location_recovers_nothing_and_a_committed_run_resumes_after_its_last_batch() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path().to_str().unwrap(), 10);
    let r = s.recover().unwrap();
    assert!(r.metadata.is_none() && r.checkpoint.is_none() && r.replay.is_empty());
    assert_eq!(r.next_batch_id(), None);
    run(&s, 3);
    let r = s.recover().unwrap();
    assert_eq!(r.checkpoint, Some(checkpoint(2)));
    assert!(r.replay.is_empty() && r.warnings.is_empty());
    assert_eq!(r.next_batch_id(), Some(3));
}

#[test]
fn a_planned_batch_without_a_commit_is_replayed_with_its_recorded_plan() {
    let s = store("memory://", 10);
    run(&s, 2);
    s.plan(&planned(2)).unwrap();
    let r = s.recover().unwrap();
    assert_eq!(r.checkpoint.unwrap().batch_id, 1);
    assert_eq!(r.replay, vec![planned(2)]);
    // A checkpoint written without its commit entry does not count either.
    s.location.put(&name(CHECKPOINTS, 2), encode_checkpoint(&checkpoint(2))).unwrap();
    let r = s.recover().unwrap();
    assert_eq!((r.checkpoint.unwrap().batch_id, r.replay.len()), (1, 1));
}

#[test]
fn a_corrupt_newest_checkpoint_falls_back_to_the_one_before_and_says_which_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path().to_str().unwrap(), 10);
    run(&s, 4);
    let file = dir.path().join(name(CHECKPOINTS, 3));
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let r = s.recover().unwrap();
    assert_eq!(r.checkpoint.unwrap().batch_id, 2);
    assert_eq!(r.replay, vec![planned(3)], "the batch of the damaged checkpoint is replayed");
    assert_eq!(r.warnings.len(), 1);
    let w = &r.warnings[0];
    assert!(w.contains("checkpoint of batch 3") && w.contains("truncated") && w.contains("resuming from the checkpoint of batch 2"), "{w}");
    // The replayed batch's checkpoint replaces the damaged one and its commit entry.
    s.commit(&checkpoint(3)).unwrap();
    assert_eq!(s.recover().unwrap().checkpoint, Some(checkpoint(3)));
}

#[test]
fn retention_keeps_the_newest_checkpoints_and_the_log_they_need() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path().to_str().unwrap(), 3);
    run(&s, 8);
    assert_eq!(s.ids(CHECKPOINTS).unwrap(), vec![5, 6, 7]);
    assert_eq!(s.ids(COMMITS).unwrap(), vec![5, 6, 7]);
    assert_eq!(s.ids(OFFSETS).unwrap(), vec![5, 6, 7]);
    // With every kept checkpoint damaged, the state cannot be rebuilt: a clear error.
    for id in 5..8 {
        std::fs::write(dir.path().join(name(CHECKPOINTS, id)), b"garbage").unwrap();
    }
    let error = s.recover().unwrap_err().to_string();
    assert!(error.contains("no usable checkpoint is left") && error.contains("checkpoint of batch 7 is unusable"), "{error}");
}

#[test]
fn an_unreadable_plan_of_an_uncommitted_batch_is_planned_again_but_a_needed_one_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path().to_str().unwrap(), 10);
    run(&s, 2);
    std::fs::write(dir.path().join(name(OFFSETS, 2)), b"half").unwrap();
    let r = s.recover().unwrap();
    assert!(r.replay.is_empty());
    assert!(r.warnings[0].contains("batch 2") && r.warnings[0].contains("planned again"), "{:?}", r.warnings);
    assert_eq!(r.next_batch_id(), Some(2));
    s.plan(&planned(2)).unwrap();
    assert_eq!(s.recover().unwrap().replay, vec![planned(2)], "the damaged entry of a batch that never committed is replaced");
    std::fs::write(dir.path().join(name(OFFSETS, 2)), b"half").unwrap();
    std::fs::write(dir.path().join(name(CHECKPOINTS, 1)), b"bad").unwrap();
    std::fs::write(dir.path().join(name(OFFSETS, 1)), b"bad").unwrap();
    let error = s.recover().unwrap_err().to_string();
    assert!(error.contains("offset log entry of batch 1 is unusable"), "{error}");
}

#[test]
fn a_location_without_metadata_but_with_batches_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path().to_str().unwrap(), 10);
    run(&s, 1);
    std::fs::remove_file(dir.path().join(METADATA)).unwrap();
    let error = s.recover().unwrap_err().to_string();
    assert!(error.contains("`metadata` is missing"), "{error}");
}

/// A task location of a consumer-group run, claimed by a new owner.
fn owner(root: &str) -> CheckpointStore {
    let mut task = store(root, 10).task("t", 0);
    task.claim("p", &["t".into()]).unwrap();
    task
}

fn is_fenced(result: Result<(), CheckpointError>) -> bool {
    matches!(result, Err(CheckpointError::Fenced { .. }))
}

#[test]
fn two_runs_on_one_location_outside_a_group_are_refused_at_the_first_batch_both_write() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (store(dir.path().to_str().unwrap(), 10), store(dir.path().to_str().unwrap(), 10));
    run(&first, 2);
    let mut other = planned(2);
    first.plan(&planned(2)).unwrap();
    first.plan(&planned(2)).unwrap(); // the same plan again (a retried call) is no conflict
    other.processing_time_ms += 1;
    let error = second.plan(&other).unwrap_err().to_string();
    assert!(error.contains("another run uses this checkpoint location"), "{error}");
    first.commit(&checkpoint(2)).unwrap();
    let mut late = checkpoint(2);
    late.created_ms += 1;
    let error = second.commit(&late).unwrap_err().to_string();
    assert!(error.contains("committed by another run"), "{error}");
    assert_eq!(first.recover().unwrap().checkpoint, Some(checkpoint(2)), "the first run's checkpoint stands");
}

#[test]
fn a_new_owner_fences_the_old_one_at_its_next_plan_commit_or_pruning() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap();
    let old = owner(root);
    assert_eq!((old.epoch(), old.recover().unwrap().next_batch_id()), (1, Some(1)), "the claim takes entry 0");
    for id in 1..=3 {
        old.plan(&planned(id)).unwrap();
        old.commit(&checkpoint(id)).unwrap();
    }
    old.plan(&planned(4)).unwrap(); // in flight when the new owner claims
    let new = owner(root);
    assert_eq!(new.epoch(), 2);
    let r = new.recover().unwrap();
    assert_eq!(
        (r.checkpoint.as_ref().map(|c| c.batch_id), r.replay.clone(), r.next_batch_id()),
        (Some(3), vec![PlannedBatch { epoch: 1, ..planned(4) }], Some(6)),
        "claims are not replayed"
    );
    // The old owner may still finish the batch it planned (the same result the new owner
    // replays), but learns at once that it is fenced, and it pruned nothing.
    assert!(is_fenced(old.commit(&checkpoint(4))));
    assert!(is_fenced(old.plan(&planned(5))), "its next plan meets the claim");
    assert!(is_fenced(old.prune()));
    // The new owner replays batch 4: the old owner's commit of it stands.
    new.commit(&checkpoint(4)).unwrap();
    assert_eq!(new.commit_entry(4).unwrap().epoch, 1);
    new.plan(&planned(6)).unwrap();
    new.commit(&checkpoint(6)).unwrap();
    let r = new.recover().unwrap();
    assert_eq!((r.next_batch_id(), r.checkpoint, r.replay), (Some(7), Some(checkpoint(6)), vec![]));

    // The other order: the new owner commits the replayed batch first; the old owner's
    // commit is then fenced, and its checkpoint object is not the committed one.
    let other = tempfile::tempdir().unwrap();
    let root = other.path().to_str().unwrap();
    let old = owner(root);
    old.plan(&planned(1)).unwrap();
    let new = owner(root);
    assert_eq!(new.recover().unwrap().replay, vec![PlannedBatch { epoch: 1, ..planned(1) }]);
    new.commit(&checkpoint(1)).unwrap();
    let mut theirs = checkpoint(1);
    theirs.created_ms = 99;
    assert!(is_fenced(old.commit(&theirs)));
    assert_eq!(new.recover().unwrap().checkpoint, Some(checkpoint(1)), "the new owner's checkpoint is the committed one");
}

#[test]
fn an_old_owner_is_fenced_at_the_entry_of_a_claim_the_new_owner_pruned_since() {
    // Found by the crash simulation with several processes: the new owner claims at 4,
    // commits 5 and 6 with one checkpoint kept, which prunes the claim; the old owner's
    // create of entry 4 then succeeds, and must still fence it.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap();
    let old = owner(root);
    for id in 1..=3 {
        old.plan(&planned(id)).unwrap();
        old.commit(&checkpoint(id)).unwrap();
    }
    let mut new = store(root, 1).task("t", 0);
    assert_eq!(new.claim("p", &["t".into()]).unwrap(), 4);
    for id in 5..=6 {
        new.plan(&planned(id)).unwrap();
        new.commit(&checkpoint(id)).unwrap();
    }
    assert!(new.location.get(&name(OFFSETS, 4)).unwrap().is_none(), "retention pruned the claim");
    assert!(is_fenced(old.plan(&planned(4))), "the old owner's plan of the pruned claim's entry is fenced");
    let r = new.recover().unwrap();
    assert_eq!((r.next_batch_id(), r.checkpoint, r.replay), (Some(7), Some(checkpoint(6)), vec![]), "the old owner's entry below the new owner's checkpoint changes nothing");
}

#[test]
fn an_owner_whose_claim_a_newer_one_followed_during_its_recovery_is_fenced_at_its_first_plan() {
    // Found by the crash simulation with several processes: A claims at 1, B claims at 2
    // before A recovers; A's recovery takes B's claim into account and plans 3 next, an
    // entry no one holds yet. A must not create it: B plans 3 too.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap();
    let a = owner(root);
    let b = owner(root);
    assert_eq!((a.epoch(), b.epoch()), (1, 2));
    let next = a.recover().unwrap().next_batch_id().unwrap();
    assert_eq!(next, 2);
    assert!(is_fenced(a.plan(&planned(next))), "the entry before is a newer owner's claim");
    assert!(a.location.get(&name(OFFSETS, next)).unwrap().is_none(), "nothing created");
    b.plan(&planned(2)).unwrap();
}

#[test]
fn racing_claims_all_get_their_own_entry_and_epoch_and_the_newest_fences_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap().to_string();
    let claims: Vec<(u64, u64)> = std::thread::scope(|s| {
        let racers: Vec<_> = (0..6)
            .map(|_| {
                let root = root.clone();
                s.spawn(move || {
                    let mut task = store(&root, 10).task("t", 3);
                    let id = task.claim("p", &["t".into()]).unwrap();
                    (id, task.epoch())
                })
            })
            .collect();
        racers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let mut ids: Vec<u64> = claims.iter().map(|c| c.0).collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..6).collect::<Vec<_>>(), "{claims:?}");
    let mut by_id = claims.clone();
    by_id.sort_unstable();
    assert!(by_id.windows(2).all(|w| w[0].1 < w[1].1), "a later entry has a higher epoch: {by_id:?}");
    assert_eq!(store(&root, 10).tasks().unwrap(), vec![("t".to_string(), 3)]);
}

#[test]
fn a_location_written_in_one_assignment_mode_is_refused_in_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path().to_str().unwrap(), 10);
    s.check_assignment(Assignment::Group).unwrap();
    run(&s, 1);
    s.check_assignment(Assignment::All).unwrap();
    let error = s.check_assignment(Assignment::Group).unwrap_err().to_string();
    assert!(error.contains("written with source.assignment = \"all\"") && error.contains("this run has source.assignment = \"group\""), "{error}");

    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path().to_str().unwrap(), 10);
    owner(dir.path().to_str().unwrap());
    s.check_assignment(Assignment::Group).unwrap();
    let error = s.check_assignment(Assignment::All).unwrap_err().to_string();
    assert!(error.contains("written with source.assignment = \"group\""), "{error}");
}
