//! Node-level noise through the coordinator's service, with nodes played by the test.
//!
//! Every node sends a zero update, so each published version differs from its parent by the
//! node-level noise alone, divided by the number of contributors. Under secure aggregation the
//! nodes add the noise, each its share sized for `min_updates` survivors; in plain mode the
//! coordinator adds it to the sum. With `n` survivors, `n_min` the minimum, `S = 1` and
//! `z = 1`, each coordinate of a published difference has variance
//!
//! - plain: `(z S)^2 / n^2`;
//! - secure: `n (z S)^2 / n_min / n^2` (each node's share has variance `(z S)^2 / n_min`),
//!
//! which agree when `n = n_min`: switching modes neither doubles nor drops the noise. The test
//! measures the variance over 128 coordinates and several rounds and checks it against these
//! within a band of about four standard errors, and checks that the manifests account the
//! multiplier the survivors' noise amounts to.

mod support;

use std::time::Duration;

use athanor_coordinator::store::ModelStore;
use athanor_core::secagg::ClientRound;
use athanor_core::secagg::messages::{KeyDirectory, ShareInbox, UnmaskRequest};
use athanor_proto::v1::federation_client::FederationClient;
use athanor_proto::v1::{self as pb};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use support::{Served, bytes_chunk, header_chunk, join, submit, task, within};
use tonic::Code;
use tonic::transport::Channel;

/// Parameters of the model below: 63 features plus a bias, times 2 classes; a power of two,
/// so the rotation adds no padding.
const PARAMS: usize = 128;

/// Rounds each case publishes.
const ROUNDS: u64 = 6;

fn config(mode: &str, nodes: usize, min_updates: usize) -> String {
    format!(
        r#"
        [federation]
        name = "noise-tests"
        [store]
        dir = "replaced by the test"
        [model]
        architecture = "logistic_regression"
        features = 63
        classes = 2
        init_seed = 7
        [rounds]
        total = {ROUNDS}
        min_nodes = {nodes}
        min_updates = {min_updates}
        deadline_secs = 30
        cohort_seed = 3
        [training]
        learning_rate = 0.1
        local_epochs = 1.0
        expected_batch_size = 8
        [privacy]
        dp = "on"
        clip_norm = 1.0
        noise_multiplier = 1.0
        [node_privacy]
        update_clip_norm = 1.0
        noise_multiplier = 1.0
        epsilon = 1000.0
        [aggregation]
        mode = "{mode}"
        stage_deadline_secs = 1.0
        "#
    )
}

/// How a played node behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Behaviour {
    /// Sends a zero update in plain mode.
    Plain,
    /// Takes part in every stage of secure aggregation with a zero update.
    Secure,
    /// Advertises keys, then goes silent for the rest of each round.
    SilentAfterKeys,
    /// Advertises keys and sends its shares, then stops (its process is about to restart).
    StopAfterShares,
}

/// Runs a federation of `behaviours.len()` played nodes to its end; returns the variance and
/// mean of the published differences' coordinates, and each round's accounted multiplier.
async fn published_noise(mode: &str, behaviours: &[Behaviour], min_updates: usize) -> Noise {
    let served = Served::start_from(&config(mode, behaviours.len(), min_updates), |_| {}).await;
    let mut nodes = Vec::new();
    for (index, &behaviour) in behaviours.iter().enumerate() {
        let client = served.federation().await;
        nodes.push(tokio::spawn(play(
            client,
            format!("node-{index}"),
            behaviour,
        )));
    }
    for node in nodes {
        node.await.expect("played node did not panic");
    }
    let store = served.coordinator.store();
    published(&store, ROUNDS, "every round published").await;

    let mut differences = Vec::new();
    let mut multipliers = Vec::new();
    let (_, mut parent) = store.load(0).expect("initial version");
    for version in 1..=ROUNDS {
        let (manifest, params) = store.load(version).expect("published version");
        differences.extend(
            params
                .iter()
                .zip(&parent)
                .map(|(p, q)| f64::from(*p) - f64::from(*q)),
        );
        let record = manifest.node_privacy.expect("node-level record");
        multipliers.push((manifest.contributors, record.noise_multiplier));
        parent = params;
    }
    served.stop().await;

    let count = differences.len() as f64;
    let mean = differences.iter().sum::<f64>() / count;
    let variance = differences.iter().map(|d| d * d).sum::<f64>() / count;
    Noise {
        variance,
        mean,
        count,
        multipliers,
    }
}

#[derive(Debug)]
struct Noise {
    /// Mean square of the coordinates (their mean is zero).
    variance: f64,
    mean: f64,
    count: f64,
    /// Contributors and accounted noise multiplier of each round.
    multipliers: Vec<(u32, f64)>,
}

impl Noise {
    /// Checks the measured variance against `expected`, within 4.5 standard errors of a
    /// variance estimate from `count` Gaussian samples, and the mean within 4.5 of its own.
    fn check(&self, expected: f64, case: &str) {
        let tolerance = 4.5 * (2.0 / self.count).sqrt();
        let ratio = self.variance / expected;
        eprintln!(
            "{case}: variance {:.5} against {expected:.5} (ratio {ratio:.3}, band +-{tolerance:.3}) \
             over {} coordinates; mean {:.5}",
            self.variance, self.count, self.mean
        );
        assert!(
            (ratio - 1.0).abs() < tolerance,
            "{case}: measured variance {} is {ratio:.3} times the expected {expected}",
            self.variance
        );
        assert!(
            self.mean.abs() < 4.5 * (expected / self.count).sqrt(),
            "{case}: the noise has mean {}",
            self.mean
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plain_and_secure_modes_publish_the_same_noise_when_the_minimum_survives() {
    let plain = published_noise("plain", &[Behaviour::Plain; 4], 4).await;
    plain.check(1.0 / 16.0, "plain, 4 nodes");
    for &(contributors, z) in &plain.multipliers {
        assert_eq!((contributors, z), (4, 1.0));
    }

    let secure = published_noise("secure", &[Behaviour::Secure; 4], 4).await;
    secure.check(1.0 / 16.0, "secure, 4 of 4");
    for &(contributors, z) in &secure.multipliers {
        assert_eq!(contributors, 4);
        // The quantized sensitivity exceeds S by gamma sqrt(128), so the accounted multiplier
        // sits a hair below the configured one, never above.
        assert!(z <= 1.0 && z > 1.0 - 1e-5, "accounted multiplier {z}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secure_noise_follows_the_survivors_and_is_accounted_for_them() {
    // Six invited, four needed; one goes silent after its keys, so five survive each round.
    let mut behaviours = [Behaviour::Secure; 6];
    behaviours[2] = Behaviour::SilentAfterKeys;
    let noise = published_noise("secure", &behaviours, 4).await;
    noise.check(5.0 / 4.0 / 25.0, "secure, 5 of 6 with a minimum of 4");
    for &(contributors, z) in &noise.multipliers {
        assert_eq!(contributors, 5);
        // Five shares of variance 1/4 each: sqrt(5/4) in all.
        let expected = (5.0_f64 / 4.0).sqrt();
        assert!(
            z <= expected && z > expected * (1.0 - 1e-5),
            "accounted multiplier {z} for 5 survivors, expected {expected}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_that_break_the_protocol_are_refused_and_the_round_still_publishes() {
    let served = Served::start_from(&config("secure", 3, 3), |c| c.rounds.total = 1).await;
    let mut clients = Vec::new();
    let mut sessions = Vec::new();
    for index in 0..3 {
        let mut client = served.federation().await;
        sessions.push(join(&mut client, &format!("node-{index}")).await);
        clients.push(client);
    }
    let mut tasks = Vec::new();
    for (client, session) in clients.iter_mut().zip(&sessions) {
        tasks.push(task(client, session).await);
    }
    let (client, session, task) = (&mut clients[0], &sessions[0], &tasks[0]);
    let wire = task.secure.clone().expect("a secure task");
    let secure = athanor_node::client::secure_from_wire(wire).expect("valid parameters");
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let (_, advertisement) =
        ClientRound::new(secure.config.clone(), secure.node, &mut rng).expect("round starts");
    let advertise = |edit: &dyn Fn(&mut pb::AdvertiseKeys)| {
        let mut message = pb::AdvertiseKeys::from(advertisement.clone());
        edit(&mut message);
        Some(pb::sec_agg_send_request::Message::AdvertiseKeys(message))
    };
    let other_node = secure
        .config
        .cohort
        .iter()
        .find(|n| **n != secure.node)
        .unwrap()
        .0;
    let cases: Vec<(&str, Option<pb::sec_agg_send_request::Message>, Code, &str)> = vec![
        ("no content", None, Code::InvalidArgument, "no content"),
        (
            "another node's number",
            advertise(&|m| m.node = other_node),
            Code::InvalidArgument,
            "names sender",
        ),
        (
            "another protocol round",
            advertise(&|m| m.protocol_round ^= 1),
            Code::FailedPrecondition,
            "round",
        ),
        (
            "a short key",
            advertise(&|m| m.mask_public_key.truncate(31)),
            Code::InvalidArgument,
            "",
        ),
        (
            "an all-zero key",
            advertise(&|m| m.cipher_public_key = vec![0; 32]),
            Code::InvalidArgument,
            "",
        ),
        (
            "shares before the directory",
            Some(pb::sec_agg_send_request::Message::ShareKeys(
                pb::ShareKeys {
                    protocol_round: secure.config.round.0,
                    stage: 1,
                    node: secure.node.0,
                    ..pb::ShareKeys::default()
                },
            )),
            Code::FailedPrecondition,
            "share-keys",
        ),
    ];
    for (case, message, code, says) in cases {
        let refused = client
            .sec_agg_send(pb::SecAggSendRequest {
                session: session.clone(),
                round: task.round,
                message,
            })
            .await
            .expect_err(case);
        assert_eq!(refused.code(), code, "{case}: {refused:?}");
        assert!(refused.message().contains(says), "{case}: {refused:?}");
    }

    let poll = |session: &str, round: u64, stage: u32| pb::SecAggReceiveRequest {
        session: session.to_string(),
        round,
        stage,
    };
    let refused = client
        .sec_agg_receive(poll(session, task.round, 7))
        .await
        .expect_err("stage 7");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    let refused = client
        .sec_agg_receive(poll(session, task.round + 1, 1))
        .await
        .expect_err("a round not open");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let refused = client
        .sec_agg_receive(poll("not-a-session", task.round, 1))
        .await
        .expect_err("unknown session");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    // A masked input while keys are being advertised, and a plain update in a secure round.
    let mut header = support::header(session, task);
    header.num_params = secure.config.vector_len as u64;
    header.secure = Some(pb::SecureInput {
        protocol_round: secure.config.round.0,
        node: secure.node.0,
    });
    let bytes = vec![0u8; secure.config.vector_len * 4];
    let refused = submit(
        client,
        vec![header_chunk(header.clone()), bytes_chunk(bytes)],
    )
    .await
    .expect_err("early masked input");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    header.secure = None;
    header.num_params = PARAMS as u64;
    let refused = submit(
        client,
        vec![header_chunk(header), bytes_chunk(vec![0; PARAMS * 4])],
    )
    .await
    .expect_err("plain update");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");

    // Every refusal left the round as it was: the three nodes now complete it honestly.
    let mut honest = Vec::new();
    for ((mut client, session), task) in clients.into_iter().zip(sessions).zip(tasks) {
        honest.push(tokio::spawn(async move {
            let mut rng = ChaCha20Rng::try_from_rng(&mut rand::rngs::SysRng).unwrap();
            secure_round(&mut client, &session, &task, Behaviour::Secure, &mut rng).await;
        }));
    }
    for node in honest {
        node.await.expect("honest node completes the round");
    }
    let store = served.coordinator.store();
    published(&store, 1, "the round published").await;
    let (manifest, _) = store.load(1).expect("version 1");
    assert_eq!(manifest.contributors, 3);
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_rejoins_mid_round_is_not_waited_for() {
    // The masked inputs would wait 60 s for the node that restarted; the test allows 15.
    let served = Served::start_from(&config("secure", 3, 2), |c| {
        c.rounds.total = 1;
        c.rounds.deadline_secs = 60;
        c.aggregation.threshold_percent = 51;
    })
    .await;
    let mut clients = Vec::new();
    let mut sessions = Vec::new();
    for index in 0..3 {
        let mut client = served.federation().await;
        sessions.push(join(&mut client, &format!("node-{index}")).await);
        clients.push(client);
    }
    let mut tasks = Vec::new();
    for (client, session) in clients.iter_mut().zip(&sessions) {
        tasks.push(task(client, session).await);
    }

    // node-2 advertises and shares, then its process "restarts": it joins again.
    let mut restarted = clients.pop().unwrap();
    let (session, task) = (sessions.pop().unwrap(), tasks.pop().unwrap());
    let honest: Vec<_> = clients
        .into_iter()
        .zip(sessions)
        .zip(tasks)
        .map(|((mut client, session), task)| {
            tokio::spawn(async move {
                let mut rng = ChaCha20Rng::try_from_rng(&mut rand::rngs::SysRng).unwrap();
                secure_round(&mut client, &session, &task, Behaviour::Secure, &mut rng).await;
            })
        })
        .collect();
    let mut rng = ChaCha20Rng::seed_from_u64(8);
    secure_round(
        &mut restarted,
        &session,
        &task,
        Behaviour::StopAfterShares,
        &mut rng,
    )
    .await;
    // Restarted right after its shares left: whether the share stage has closed yet or not,
    // no later stage may wait for it.
    join(&mut restarted, "node-2").await;

    for node in honest {
        within(node, "the two others complete the round")
            .await
            .expect("honest node did not panic");
    }
    let store = served.coordinator.store();
    published(
        &store,
        1,
        "the round published without waiting for the restarted node",
    )
    .await;
    let (manifest, _) = store.load(1).expect("version 1");
    assert_eq!(manifest.contributors, 2);
    served.stop().await;
}

/// Waits until the store holds `version`, failing the test with `what` after the step
/// timeout.
async fn published(store: &ModelStore, version: u64, what: &str) {
    let wait = async {
        while store.next_version() <= version {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    within(wait, what).await;
}

/// Plays one node until it has handled [`ROUNDS`] tasks.
async fn play(mut client: FederationClient<Channel>, name: String, behaviour: Behaviour) {
    let session = join(&mut client, &name).await;
    let mut rng = ChaCha20Rng::try_from_rng(&mut rand::rngs::SysRng).expect("OS generator");
    for _ in 0..ROUNDS {
        let task = task(&mut client, &session).await;
        match behaviour {
            Behaviour::Plain => {
                let mut header = support::header(&session, &task);
                header.num_params = PARAMS as u64;
                let zeros = vec![0u8; PARAMS * 4];
                submit(&mut client, vec![header_chunk(header), bytes_chunk(zeros)])
                    .await
                    .expect("zero update accepted");
            }
            Behaviour::Secure | Behaviour::SilentAfterKeys | Behaviour::StopAfterShares => {
                secure_round(&mut client, &session, &task, behaviour, &mut rng).await;
            }
        }
    }
}

async fn secure_round(
    client: &mut FederationClient<Channel>,
    session: &str,
    task: &pb::Task,
    behaviour: Behaviour,
    rng: &mut ChaCha20Rng,
) {
    let wire = task.secure.clone().expect("a secure task");
    let secure = athanor_node::client::secure_from_wire(wire).expect("valid parameters");
    let (mut round, advertisement) =
        ClientRound::new(secure.config.clone(), secure.node, rng).expect("round starts");
    send(
        client,
        session,
        task,
        pb::sec_agg_send_request::Message::AdvertiseKeys(advertisement.into()),
    )
    .await;
    if behaviour == Behaviour::SilentAfterKeys {
        // Wait for the round to move on without this node, so the next task is the next
        // round's.
        let outcome = receive(client, session, task, 1).await;
        assert!(matches!(
            outcome,
            pb::sec_agg_receive_response::Outcome::KeyDirectory(_)
        ));
        return;
    }

    let pb::sec_agg_receive_response::Outcome::KeyDirectory(directory) =
        receive(client, session, task, 1).await
    else {
        panic!("expected the key directory");
    };
    let shares = round
        .share_keys(&KeyDirectory::from(directory), rng)
        .expect("shares");
    send(
        client,
        session,
        task,
        pb::sec_agg_send_request::Message::ShareKeys(shares.into()),
    )
    .await;
    if behaviour == Behaviour::StopAfterShares {
        return;
    }

    let pb::sec_agg_receive_response::Outcome::ShareInbox(inbox) =
        receive(client, session, task, 2).await
    else {
        panic!("expected the share inbox");
    };
    let encoded = secure
        .quantizer
        .encode(&[0.0; PARAMS], rng)
        .expect("zeros encode");
    let masked = round
        .masked_input(&ShareInbox::from(inbox), &encoded)
        .expect("masking");
    let mut header = support::header(session, task);
    header.num_params = masked.masked.len() as u64;
    header.secure = Some(pb::SecureInput {
        protocol_round: masked.round.0,
        node: masked.node.0,
    });
    let bytes = masked.masked.iter().flat_map(|v| v.to_le_bytes()).collect();
    submit(client, vec![header_chunk(header), bytes_chunk(bytes)])
        .await
        .expect("masked input accepted");

    let pb::sec_agg_receive_response::Outcome::UnmaskRequest(request) =
        receive(client, session, task, 3).await
    else {
        panic!("expected the unmask request");
    };
    let response = round
        .unmask(&UnmaskRequest::from(request))
        .expect("unmasking");
    send(
        client,
        session,
        task,
        pb::sec_agg_send_request::Message::Unmask((&response).into()),
    )
    .await;
}

async fn send(
    client: &mut FederationClient<Channel>,
    session: &str,
    task: &pb::Task,
    message: pb::sec_agg_send_request::Message,
) {
    client
        .sec_agg_send(pb::SecAggSendRequest {
            session: session.to_string(),
            round: task.round,
            message: Some(message),
        })
        .await
        .expect("message accepted");
}

/// Long-polls until the coordinator's message for `stage` arrives.
async fn receive(
    client: &mut FederationClient<Channel>,
    session: &str,
    task: &pb::Task,
    stage: u32,
) -> pb::sec_agg_receive_response::Outcome {
    let poll = async {
        loop {
            let outcome = client
                .sec_agg_receive(pb::SecAggReceiveRequest {
                    session: session.to_string(),
                    round: task.round,
                    stage,
                })
                .await
                .expect("poll answered")
                .into_inner()
                .outcome
                .expect("an outcome");
            match outcome {
                pb::sec_agg_receive_response::Outcome::Pending(_) => {}
                pb::sec_agg_receive_response::Outcome::Abandoned(reason) => {
                    panic!("round abandoned: {}", reason.reason)
                }
                other => return other,
            }
        }
    };
    within(poll, "the stage's message").await
}
