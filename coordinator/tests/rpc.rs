//! Bad input at the gRPC layer: each malformed or misplaced request a node can send is refused
//! with the status code that says whose fault it is and a logged reason, and the round goes on
//! for the other nodes. Everything goes through the real server on a loopback port, driven by
//! the real round driver.

mod support;

use athanor_coordinator::store::{Manifest, VersionStatus};
use athanor_proto::v1::federation_client::FederationClient;
use athanor_proto::v1::{self as pb};
use athanor_proto::{CHUNK_BYTES, PROTOCOL_VERSION};
use support::{
    NUM_PARAMS, Served, bytes_chunk, data_chunk, header, header_chunk, join, join_observer, logged,
    submit, submit_honest, task, within,
};
use tonic::Code;
use tonic::transport::Channel;

/// Sends `chunks` and checks the refusal's code, and that `reason` was logged.
async fn refused(
    client: &mut FederationClient<Channel>,
    chunks: Vec<pb::UpdateChunk>,
    code: Code,
    reason: &str,
) {
    match submit(client, chunks).await {
        Err(status) => {
            assert_eq!(
                status.code(),
                code,
                "refused for the wrong reason: {status:?}"
            );
            assert!(
                status.message().contains(reason),
                "the status does not say {reason:?}: {status:?}"
            );
        }
        Ok(()) => panic!("an update that should fail with {reason:?} was accepted"),
    }
    logged(reason).await;
}

async fn next_published(published: &mut tokio::sync::broadcast::Receiver<Manifest>) -> Manifest {
    within(published.recv(), "a published version")
        .await
        .expect("publication channel open")
}

#[tokio::test]
async fn malformed_updates_are_refused_with_their_codes_and_the_round_still_publishes() {
    let served = Served::start(|_| {}).await;
    let mut published = served.coordinator.subscribe();
    let initial = served.coordinator.global().params.clone();
    let (mut honest, mut faulty) = (served.federation().await, served.federation().await);
    let honest_session = join(&mut honest, "honest").await;
    let faulty_session = join(&mut faulty, "faulty").await;
    let honest_task = task(&mut honest, &honest_session).await;
    let faulty_task = task(&mut faulty, &faulty_session).await;
    let good = || header(&faulty_session, &faulty_task);
    let values = [3.0_f32; NUM_PARAMS];
    let invalid = Code::InvalidArgument;

    // Framing: the stream must be one header, then non-empty data chunks.
    refused(&mut faulty, vec![], invalid, "empty update stream").await;
    let data_first = vec![data_chunk(&values), header_chunk(good())];
    refused(
        &mut faulty,
        data_first,
        invalid,
        "must start with its header",
    )
    .await;
    let two_headers = vec![
        header_chunk(good()),
        header_chunk(good()),
        data_chunk(&values),
    ];
    refused(&mut faulty, two_headers, invalid, "a second header").await;
    let empty_chunk = vec![header_chunk(good()), bytes_chunk(Vec::new())];
    refused(&mut faulty, empty_chunk, invalid, "an empty data chunk").await;
    let no_part = vec![header_chunk(good()), pb::UpdateChunk { part: None }];
    refused(&mut faulty, no_part, invalid, "neither header nor data").await;

    // Length: the header must announce the model's length, and the payload must match it.
    let short_header = pb::UpdateHeader {
        secure: None,
        num_params: NUM_PARAMS as u64 - 1,
        ..good()
    };
    let chunks = vec![header_chunk(short_header), data_chunk(&values[1..])];
    refused(
        &mut faulty,
        chunks,
        invalid,
        "update has 7 parameters, the model has 8",
    )
    .await;
    let huge_header = pb::UpdateHeader {
        secure: None,
        num_params: u64::MAX,
        ..good()
    };
    refused(
        &mut faulty,
        vec![header_chunk(huge_header)],
        invalid,
        "parameters, the model has",
    )
    .await;
    let short_payload = vec![header_chunk(good()), data_chunk(&values[..5])];
    refused(
        &mut faulty,
        short_payload,
        invalid,
        "expected 8 parameters (32 bytes), got 20",
    )
    .await;
    let long_payload = vec![header_chunk(good()), data_chunk(&[1.0; NUM_PARAMS + 1])];
    refused(&mut faulty, long_payload, invalid, "exceeds the 32 bytes").await;
    let mut many_chunks = vec![header_chunk(good())];
    many_chunks.extend((0..NUM_PARAMS + 1).map(|_| data_chunk(&[1.0])));
    refused(&mut faulty, many_chunks, invalid, "exceeds the 32 bytes").await;

    // Values: every one finite.
    let mut nan = values;
    nan[3] = f32::NAN;
    let chunks = vec![header_chunk(good()), data_chunk(&nan)];
    refused(&mut faulty, chunks, invalid, "parameter 3 is not finite").await;
    let mut infinite = values;
    infinite[7] = f32::NEG_INFINITY;
    let chunks = vec![header_chunk(good()), data_chunk(&infinite)];
    refused(&mut faulty, chunks, invalid, "parameter 7 is not finite").await;

    // The report: finite loss, a sane privacy claim.
    let mut bad_loss = good();
    if let Some(report) = bad_loss.report.as_mut() {
        report.train_loss = f64::NAN;
    }
    let chunks = vec![header_chunk(bad_loss), data_chunk(&values)];
    refused(&mut faulty, chunks, invalid, "train_loss is not finite").await;
    let mut bad_epsilon = good();
    if let Some(privacy) = bad_epsilon.report.as_mut().and_then(|r| r.privacy.as_mut()) {
        privacy.epsilon = -1.0;
    }
    let chunks = vec![header_chunk(bad_epsilon), data_chunk(&values)];
    refused(&mut faulty, chunks, invalid, "reported epsilon -1").await;

    // One chunk over the transport's limit never reaches the service.
    let oversize = vec![
        header_chunk(good()),
        bytes_chunk(vec![0; CHUNK_BYTES * 2 + 1]),
    ];
    let status = submit(&mut faulty, oversize)
        .await
        .expect_err("an oversize chunk is refused");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");

    // None of that disturbed the round: it is still open, both nodes may answer, and only the
    // two good updates count: initial + (1 + 3) / 2.
    let status = served.coordinator.status();
    assert_eq!((status.round, status.stage), (Some(1), "training"));
    submit_honest(&mut honest, &honest_session, &honest_task, 1.0).await;
    submit_honest(&mut faulty, &faulty_session, &faulty_task, 3.0).await;
    let manifest = next_published(&mut published).await;
    assert_eq!((manifest.version, manifest.contributors), (1, 2));
    let expected: Vec<f32> = initial
        .iter()
        .map(|&p| (f64::from(p) + 2.0) as f32)
        .collect();
    assert_eq!(served.coordinator.global().params, expected);
    served.stop().await;
}

#[tokio::test]
async fn updates_for_other_rounds_or_versions_or_twice_fail_their_precondition() {
    let served = Served::start(|_| {}).await;
    let mut published = served.coordinator.subscribe();
    let (mut a, mut b) = (served.federation().await, served.federation().await);
    let a_session = join(&mut a, "node-a").await;
    let b_session = join(&mut b, "node-b").await;
    let a_task = task(&mut a, &a_session).await;
    let b_task = task(&mut b, &b_session).await;
    let values = [1.0_f32; NUM_PARAMS];
    let precondition = Code::FailedPrecondition;

    let stale = pb::UpdateHeader {
        secure: None,
        round: 0,
        ..header(&a_session, &a_task)
    };
    let chunks = vec![header_chunk(stale), data_chunk(&values)];
    refused(
        &mut a,
        chunks,
        precondition,
        "update for round 0 but round 1 is open",
    )
    .await;
    let early = pb::UpdateHeader {
        secure: None,
        round: 2,
        ..header(&a_session, &a_task)
    };
    let chunks = vec![header_chunk(early), data_chunk(&values)];
    refused(
        &mut a,
        chunks,
        precondition,
        "update for round 2 but round 1 is open",
    )
    .await;
    let other_version = pb::UpdateHeader {
        secure: None,
        model_version: 5,
        ..header(&a_session, &a_task)
    };
    let chunks = vec![header_chunk(other_version), data_chunk(&values)];
    refused(&mut a, chunks, precondition, "trained from version 5").await;

    // A decline for another round is refused too, and leaves the node's task pending.
    let declined = a
        .decline_task(pb::DeclineTaskRequest {
            session: a_session.clone(),
            round: 7,
            reason: "testing".into(),
            ..Default::default()
        })
        .await
        .expect_err("a decline for a round that is not open is refused");
    assert_eq!(declined.code(), precondition, "{declined:?}");
    logged("round 7 is not open").await;

    // The good update is taken; the same node's second one is not.
    submit_honest(&mut a, &a_session, &a_task, 1.0).await;
    let again = vec![
        header_chunk(header(&a_session, &a_task)),
        data_chunk(&values),
    ];
    refused(&mut a, again, precondition, "already answered round 1").await;

    submit_honest(&mut b, &b_session, &b_task, 1.0).await;
    let manifest = next_published(&mut published).await;
    assert_eq!((manifest.version, manifest.contributors), (1, 2));
    served.stop().await;
}

#[tokio::test]
async fn unknown_sessions_are_refused_on_every_call() {
    let served = Served::start(|_| {}).await;
    let mut client = served.federation().await;
    let session = "not-a-session".to_string();
    let unauthenticated = |status: tonic::Status| {
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(status.message().contains("join again"), "{status:?}");
    };

    let poll = client
        .wait_for_task(pb::WaitForTaskRequest {
            session: session.clone(),
        })
        .await;
    unauthenticated(poll.expect_err("poll with an unknown session"));
    let fetch = client
        .fetch_model(pb::FetchModelRequest {
            session: session.clone(),
            version: None,
        })
        .await;
    unauthenticated(fetch.expect_err("fetch with an unknown session"));
    let decline = client
        .decline_task(pb::DeclineTaskRequest {
            session: session.clone(),
            round: 1,
            ..Default::default()
        })
        .await;
    unauthenticated(decline.expect_err("decline with an unknown session"));
    let fake_task = pb::Task {
        round: 1,
        model_version: 0,
        ..pb::Task::default()
    };
    let chunks = vec![
        header_chunk(header(&session, &fake_task)),
        data_chunk(&[0.0; NUM_PARAMS]),
    ];
    unauthenticated(submit(&mut client, chunks).await.expect_err("submit"));
    logged("request from an unknown session").await;

    // A node that joins again gets a new session; its old one stops working.
    let old = join(&mut client, "rejoining").await;
    let new = join(&mut client, "rejoining").await;
    assert_ne!(old, new);
    let stale = client
        .fetch_model(pb::FetchModelRequest {
            session: old,
            version: None,
        })
        .await;
    unauthenticated(stale.expect_err("fetch with a replaced session"));
    served.stop().await;
}

#[tokio::test]
async fn joins_with_a_bad_identity_or_protocol_are_refused() {
    let served = Served::start(|_| {}).await;
    let mut client = served.federation().await;
    let request = |node: &str, protocol_version| pb::JoinRequest {
        protocol_version,
        node_id: node.to_string(),
        dataset: None,
        software_version: String::new(),
        observer: false,
    };

    for bad_id in ["", "has space", "slash/ed", &"x".repeat(129)] {
        let status = client
            .join(request(bad_id, PROTOCOL_VERSION))
            .await
            .expect_err("a bad node id is refused");
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{bad_id:?}: {status:?}"
        );
    }
    logged("join refused").await;
    let status = client
        .join(request("fine", PROTOCOL_VERSION + 1))
        .await
        .expect_err("another protocol version is refused");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("protocol version"), "{status:?}");
    assert_eq!(served.coordinator.status().connected_nodes, 0);
    served.stop().await;
}

#[tokio::test]
async fn a_damaged_version_is_reported_and_never_served() {
    let served = Served::start(|_| {}).await;
    let mut published = served.coordinator.subscribe();
    let (mut a, mut b) = (served.federation().await, served.federation().await);
    let a_session = join(&mut a, "node-a").await;
    let b_session = join(&mut b, "node-b").await;
    let a_task = task(&mut a, &a_session).await;
    let b_task = task(&mut b, &b_session).await;
    submit_honest(&mut a, &a_session, &a_task, 1.0).await;
    submit_honest(&mut b, &b_session, &b_task, 1.0).await;
    assert_eq!(next_published(&mut published).await.version, 1);

    // Flip one byte of version 0's weights: its hash no longer matches the manifest.
    let path = served
        .store_dir
        .path()
        .join("versions/000000/weights.safetensors");
    let mut bytes = std::fs::read(&path).expect("weights file");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&path, bytes).expect("rewrite weights file");

    let fetched = a
        .fetch_model(pb::FetchModelRequest {
            session: a_session.clone(),
            version: Some(0),
        })
        .await
        .expect_err("a damaged version is not served");
    assert_eq!(fetched.code(), Code::DataLoss, "{fetched:?}");
    assert!(
        fetched.message().contains("version 0 is damaged"),
        "{fetched:?}"
    );
    logged("refusing to serve a damaged version").await;

    // Operators see it in the status and the listing, and cannot export it either.
    let mut admin = served.admin().await;
    let status = admin
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    let damaged: Vec<u64> = status.damaged_versions.iter().map(|d| d.version).collect();
    assert_eq!(damaged, vec![0]);
    assert!(
        status.damaged_versions[0].reason.contains("sha256"),
        "{status:?}"
    );
    let listed = admin
        .list_versions(pb::ListVersionsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert_eq!((listed.manifests_json.len(), listed.damaged.len()), (1, 1));
    let export = admin
        .export_version(pb::ExportVersionRequest { version: 0 })
        .await
        .expect_err("a damaged version is not exported");
    assert_eq!(export.code(), Code::DataLoss, "{export:?}");
    let missing = admin
        .export_version(pb::ExportVersionRequest { version: 99 })
        .await
        .expect_err("an unknown version is not exported");
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");

    // The latest version is still served, from memory, and the federation goes on.
    let (version, _) = fetch(&mut a, &a_session).await;
    assert_eq!(version, 1);
    let a_task = task(&mut a, &a_session).await;
    assert_eq!((a_task.round, a_task.model_version), (2, 1));
    served.stop().await;
}

/// Fetches the latest model; returns its version and byte length.
async fn fetch(client: &mut FederationClient<Channel>, session: &str) -> (u64, usize) {
    let mut stream = client
        .fetch_model(pb::FetchModelRequest {
            session: session.to_string(),
            version: None,
        })
        .await
        .expect("fetch the latest model")
        .into_inner();
    let mut version = None;
    let mut bytes = 0;
    while let Some(chunk) = stream.message().await.expect("model chunk") {
        match chunk.part {
            Some(pb::model_chunk::Part::Header(header)) => version = Some(header.version),
            Some(pb::model_chunk::Part::Data(data)) => bytes += data.len(),
            None => panic!("empty model chunk"),
        }
    }
    (version.expect("model header"), bytes)
}

#[tokio::test]
async fn absurd_example_counts_and_losses_do_not_stop_the_federation() {
    let served = Served::start(|_| {}).await;
    let mut published = served.coordinator.subscribe();
    let (mut a, mut b) = (served.federation().await, served.federation().await);
    let a_session = join(&mut a, "node-a").await;
    let b_session = join(&mut b, "node-b").await;
    let a_task = task(&mut a, &a_session).await;
    let b_task = task(&mut b, &b_session).await;

    // Both claim the largest count there is (a sum that overflows u64) and a loss whose
    // weighted mean overflows f64. Both are finite and well formed, so both are accepted.
    for (client, session, task) in [(&mut a, &a_session, &a_task), (&mut b, &b_session, &b_task)] {
        let mut absurd = pb::UpdateHeader {
            secure: None,
            num_examples: u64::MAX,
            ..header(session, task)
        };
        if let Some(report) = absurd.report.as_mut() {
            report.train_loss = 1e300;
        }
        let chunks = vec![header_chunk(absurd), data_chunk(&[0.5; NUM_PARAMS])];
        submit(client, chunks)
            .await
            .expect("a well-formed update is accepted");
    }

    let manifest = next_published(&mut published).await;
    assert_eq!((manifest.version, manifest.contributors), (1, 2));
    assert!(
        !manifest.metrics.contains_key("train_loss"),
        "a loss that does not average to a finite number is left out: {:?}",
        manifest.metrics
    );
    let store = served.coordinator.store();
    assert!(matches!(store.list()[1].status, VersionStatus::Valid(_)));

    // And round 2 opens as usual.
    let next = task(&mut a, &a_session).await;
    assert_eq!((next.round, next.model_version), (2, 1));
    served.stop().await;
}

/// The header of a model fetched with `session`, after reading the whole stream.
async fn fetched_header(
    client: &mut FederationClient<Channel>,
    session: &str,
    version: Option<u64>,
) -> Result<pb::ModelHeader, tonic::Status> {
    let mut stream = client
        .fetch_model(pb::FetchModelRequest {
            session: session.to_string(),
            version,
        })
        .await?
        .into_inner();
    let mut header = None;
    while let Some(chunk) = stream.message().await? {
        if let Some(pb::model_chunk::Part::Header(h)) = chunk.part {
            header = Some(h);
        }
    }
    Ok(header.expect("model header"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observers_fetch_models_but_never_count_train_or_displace_a_node() {
    // Two nodes are needed for a round; one trains, and watchers come and go.
    let served = Served::start(|_| {}).await;
    let mut published = served.coordinator.subscribe();
    let mut watcher = served.federation().await;
    let watching = join_observer(&mut watcher, "watcher").await;
    let mut a = served.federation().await;
    let a_session = join(&mut a, "clinic-a").await;
    let a_watching = join_observer(&mut watcher, "clinic-a").await;

    // Watchers do not make up the second node: no round opens, and they are not listed.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let status = served.coordinator.status();
    assert_eq!(
        (status.connected_nodes, status.round, status.stage),
        (1, None, "waiting_for_nodes")
    );
    let listed: Vec<String> = served
        .coordinator
        .nodes()
        .into_iter()
        .map(|n| n.node.0)
        .collect();
    assert_eq!(listed, ["clinic-a"]);

    // They fetch models, with the hash of the stored weights file.
    let latest = fetched_header(&mut watcher, &watching, None)
        .await
        .expect("an observer fetches the latest model");
    let stored = served.coordinator.store().manifest(0).expect("version 0");
    assert_eq!(
        (latest.version, latest.weights_sha256.as_str()),
        (0, stored.weights_sha256.as_str())
    );

    // Anything only a training session may do is refused.
    let watch_only = |status: tonic::Status| {
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains("watch-only"), "{status:?}");
    };
    let poll = watcher
        .wait_for_task(pb::WaitForTaskRequest {
            session: watching.clone(),
        })
        .await;
    watch_only(poll.expect_err("an observer polls for a task"));
    let decline = watcher
        .decline_task(pb::DeclineTaskRequest {
            session: a_watching.clone(),
            round: 1,
            ..Default::default()
        })
        .await;
    watch_only(decline.expect_err("an observer declines"));
    let fake_task = pb::Task {
        round: 1,
        model_version: 0,
        ..pb::Task::default()
    };
    let chunks = vec![
        header_chunk(header(&a_watching, &fake_task)),
        data_chunk(&[0.0; NUM_PARAMS]),
    ];
    watch_only(
        submit(&mut watcher, chunks)
            .await
            .expect_err("an observer submits"),
    );

    // A second training node opens the round, with the two training nodes only.
    let mut b = served.federation().await;
    let b_session = join(&mut b, "clinic-b").await;
    let a_task = task(&mut a, &a_session).await;
    let b_task = task(&mut b, &b_session).await;
    assert_eq!((a_task.round, b_task.round), (1, 1));

    // Fetching with clinic-a's identity mid-round leaves clinic-a's training session alone.
    let again = join_observer(&mut watcher, "clinic-a").await;
    fetched_header(&mut watcher, &again, Some(0))
        .await
        .expect("an observer fetches a given version");
    submit_honest(&mut a, &a_session, &a_task, 0.5).await;
    submit_honest(&mut b, &b_session, &b_task, 0.5).await;
    let manifest = next_published(&mut published).await;
    assert_eq!((manifest.version, manifest.contributors), (1, 2));

    // Joining as an observer over and over forgets the oldest sessions rather than keeping
    // them all.
    let mut sessions = Vec::new();
    for _ in 0..9 {
        sessions.push(join_observer(&mut watcher, "watcher").await);
    }
    let forgotten = fetched_header(&mut watcher, &watching, None).await;
    assert_eq!(
        forgotten.expect_err("the oldest watcher session").code(),
        Code::Unauthenticated
    );
    fetched_header(&mut watcher, sessions.last().expect("a session"), None)
        .await
        .expect("the newest watcher session works");
    served.stop().await;
}
