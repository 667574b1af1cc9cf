//! Interrupted downloads resume with a Range request and end byte-identical.

mod hub_common;

use hub_common::*;

fn blob(env: &TestEnv, hub: &HubServer, file: &str) -> std::path::PathBuf {
    env.repo_cache()
        .join("blobs")
        .join(sha256_hex(&hub.file(file)))
}

#[test]
fn cut_connection_is_resumed_in_the_same_run() {
    let hub = HubServer::start(Behaviour {
        cut: [(SHARD1.to_string(), 1)].into(),
        ..Behaviour::default()
    });
    let env = TestEnv::new();
    let mqf = stdout_path(&env.cli(&hub.endpoint, &["pull", REPO, "--quant", "f32"], &[]));
    check_mqf(&mqf);

    let whole = hub.file(SHARD1);
    let gets: Vec<_> = hub
        .requests()
        .into_iter()
        .filter(|r| r.is_get_of(SHARD1))
        .collect();
    assert_eq!(gets.len(), 2, "one cut GET, one resumed GET");
    assert_eq!(gets[0].header("range"), None);
    assert_eq!(
        gets[1].header("range"),
        Some(format!("bytes={}-", whole.len() / 2).as_str())
    );
    assert_eq!(std::fs::read(blob(&env, &hub, SHARD1)).unwrap(), whole);
}

#[test]
fn partial_file_from_a_failed_run_is_resumed_by_the_next() {
    let env = TestEnv::new();
    {
        // Cuts every GET of the second shard: half a file, then nothing.
        let hub = HubServer::start(Behaviour {
            cut: [(SHARD2.to_string(), usize::MAX)].into(),
            ..Behaviour::default()
        });
        let out = env.cli(&hub.endpoint, &["pull", REPO], &[]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(
            err.contains(SHARD2) && err.contains("again to resume"),
            "{err}"
        );
        let partial = format!("{}.incomplete", blob(&env, &hub, SHARD2).display());
        assert_eq!(
            std::fs::metadata(&partial).unwrap().len(),
            hub.file(SHARD2).len() as u64 / 2
        );
    }
    let hub = HubServer::start(Behaviour::default());
    let mqf = stdout_path(&env.cli(&hub.endpoint, &["pull", REPO], &[]));
    check_mqf(&mqf);
    let whole = hub.file(SHARD2);
    let gets: Vec<_> = hub
        .requests()
        .into_iter()
        .filter(|r| r.is_get_of(SHARD2))
        .collect();
    assert_eq!(gets.len(), 1);
    assert_eq!(
        gets[0].header("range"),
        Some(format!("bytes={}-", whole.len() / 2).as_str())
    );
    assert!(
        !hub.requests().iter().any(|r| r.is_get_of(SHARD1)),
        "the finished shard was downloaded again"
    );
    assert_eq!(std::fs::read(blob(&env, &hub, SHARD2)).unwrap(), whole);
}

#[test]
fn server_that_ignores_the_range_restarts_and_busy_answers_are_retried() {
    let hub = HubServer::start(Behaviour {
        cut: [(SHARD1.to_string(), 1)].into(),
        ignore_range: true,
        unavailable: 2,
        ..Behaviour::default()
    });
    let env = TestEnv::new();
    let mqf = stdout_path(&env.cli(&hub.endpoint, &["pull", REPO, "--quant", "f32"], &[]));
    check_mqf(&mqf);
    let gets: Vec<_> = hub
        .requests()
        .into_iter()
        .filter(|r| r.is_get_of(SHARD1))
        .collect();
    assert_eq!(gets.len(), 2);
    assert!(gets[1].header("range").is_some());
    assert_eq!(
        std::fs::read(blob(&env, &hub, SHARD1)).unwrap(),
        hub.file(SHARD1),
        "a 200 answer to a Range request must replace the partial file, not extend it"
    );
}
