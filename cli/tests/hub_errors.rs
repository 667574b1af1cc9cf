//! Failures of `mipha-cli pull` say what went wrong and what to do.

mod hub_common;

use hub_common::*;

#[test]
fn corrupt_download_is_a_sha256_mismatch_naming_the_file() {
    let hub = HubServer::start(Behaviour {
        corrupt: Some(SHARD1.into()),
        ..Behaviour::default()
    });
    let env = TestEnv::new();
    let out = env.cli(&hub.endpoint, &["pull", REPO], &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(SHARD1) && err.contains("SHA-256 mismatch"),
        "{err}"
    );
    let blobs = env.repo_cache().join("blobs");
    let left: Vec<_> = std::fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&sha256_hex(&hub.file(SHARD1))))
        .collect();
    assert!(left.is_empty(), "corrupt data kept: {left:?}");
    assert!(
        !env.mipha_cache().exists() || std::fs::read_dir(env.mipha_cache()).unwrap().count() == 0
    );
}

#[test]
fn unknown_repo_is_named_with_a_hint() {
    let hub = HubServer::start(Behaviour::default());
    let env = TestEnv::new();
    let out = env.cli(&hub.endpoint, &["pull", "test-org/no-such-model"], &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("test-org/no-such-model")
            && err.contains("not found")
            && err.contains("HF_TOKEN"),
        "{err}"
    );

    let out = env.cli(&hub.endpoint, &["pull", REPO, "--revision", "v9"], &[]);
    let err = stderr(&out);
    assert!(
        !out.status.success() && err.contains(&format!("{REPO}@v9")),
        "{err}"
    );
}

#[test]
fn refused_access_suggests_a_token() {
    let hub = HubServer::start(Behaviour {
        api_status: Some(403),
        ..Behaviour::default()
    });
    let env = TestEnv::new();
    let out = env.cli(&hub.endpoint, &["pull", REPO], &[]);
    let err = stderr(&out);
    assert!(
        !out.status.success() && err.contains(REPO) && err.contains("HF_TOKEN"),
        "{err}"
    );
}

#[test]
fn unreachable_hub_points_at_local_models() {
    let env = TestEnv::new();
    let out = env.cli(&closed_endpoint(), &["pull", REPO], &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("could not reach") && err.contains("--model") && err.contains("mipha-convert"),
        "{err}"
    );
}

#[test]
fn offline_with_nothing_cached() {
    let env = TestEnv::new();
    let out = env.cli(
        &closed_endpoint(),
        &["pull", REPO],
        &[("HF_HUB_OFFLINE", "1")],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("HF_HUB_OFFLINE") && err.contains(REPO),
        "{err}"
    );
}

#[test]
fn bad_arguments() {
    let env = TestEnv::new();
    let out = env.cli(&closed_endpoint(), &["pull", "not-a-repo"], &[]);
    let err = stderr(&out);
    assert!(!out.status.success() && err.contains("org/name"), "{err}");
    let out = env.cli(&closed_endpoint(), &["pull", REPO, "--quant", "q3_k"], &[]);
    let err = stderr(&out);
    assert!(!out.status.success() && err.contains("q3_k"), "{err}");
}
