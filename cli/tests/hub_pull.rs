//! `mipha-cli pull` against a loopback hub: cache layout, conversion, caching, token.

mod hub_common;

use hub_common::*;

#[test]
fn pull_end_to_end_then_cached() {
    let token = "hf_test_token_123";
    let cdn = HubServer::start(Behaviour::default());
    let hub = HubServer::start(Behaviour {
        cdn: Some(cdn.endpoint.clone()),
        require_token: Some(token.into()),
        ..Behaviour::default()
    });
    let env = TestEnv::new();
    let out = env.cli(&hub.endpoint, &["pull", REPO], &[("HF_TOKEN", token)]);
    let mqf = stdout_path(&out);
    assert!(mqf.starts_with(env.mipha_cache()), "{}", mqf.display());
    assert_eq!(
        mqf.file_name().unwrap().to_str().unwrap(),
        format!("{COMMIT}-q4_0-q8_0.mqf")
    );
    check_mqf(&mqf);

    // The Hugging Face cache layout.
    let root = env.repo_cache();
    assert_eq!(
        std::fs::read_to_string(root.join("refs/main")).unwrap(),
        COMMIT
    );
    let snap = root.join("snapshots").join(COMMIT);
    for e in std::fs::read_dir(fixture_dir()).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        let link = snap.join(&name);
        assert_eq!(
            std::fs::read(&link).unwrap(),
            hub.file(&name),
            "{name} differs"
        );
        #[cfg(unix)]
        {
            let target = std::fs::read_link(&link).unwrap();
            assert!(target.starts_with("../../blobs"), "{}", target.display());
        }
    }
    for shard in [SHARD1, SHARD2] {
        let blob = root.join("blobs").join(sha256_hex(&hub.file(shard)));
        assert!(blob.is_file(), "LFS blobs are named by their SHA-256");
    }
    for f in UNWANTED {
        assert!(!snap.join(f).exists(), "{f} was downloaded");
    }
    let leftovers: Vec<_> = std::fs::read_dir(root.join("blobs"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".incomplete"))
        .collect();
    assert!(leftovers.is_empty());

    // Only what is needed is asked for, and the token reaches the hub but not the CDN.
    let reqs = hub.requests();
    for f in UNWANTED {
        assert!(!reqs.iter().any(|r| r.path.ends_with(f)), "{f} requested");
    }
    for r in &reqs {
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bearer {token}").as_str()),
            "{} {}",
            r.method,
            r.path
        );
    }
    let cdn_reqs = cdn.requests();
    assert_eq!(
        cdn_reqs.iter().filter(|r| r.method == "GET").count(),
        2,
        "both shards come from the CDN"
    );
    for r in &cdn_reqs {
        assert_eq!(r.header("authorization"), None, "token leaked to the CDN");
    }

    // A second pull: no request at all, same path, even with the hub gone.
    let n = hub.requests().len();
    let again = env.cli(&hub.endpoint, &["pull", REPO], &[("HF_TOKEN", token)]);
    assert_eq!(stdout_path(&again), mqf);
    assert_eq!(
        hub.requests().len(),
        n,
        "the second pull went to the network"
    );
    drop(hub);
    let offline = env.cli(&closed_endpoint(), &["pull", REPO], &[]);
    assert_eq!(stdout_path(&offline), mqf);
    let offline = env.cli(
        &closed_endpoint(),
        &["pull", REPO],
        &[("HF_HUB_OFFLINE", "1")],
    );
    assert_eq!(stdout_path(&offline), mqf);
}

#[test]
fn other_quants_reuse_the_download_and_offline_converts_from_the_snapshot() {
    let hub = HubServer::start(Behaviour::default());
    let env = TestEnv::new();
    let first = stdout_path(&env.cli(&hub.endpoint, &["pull", REPO, "--quant", "f32"], &[]));
    assert!(first.to_string_lossy().ends_with("-f32-q8_0.mqf"));
    let gets = |h: &HubServer| h.requests().iter().filter(|r| r.method == "GET").count();
    let n = gets(&hub);

    // The blobs are cached: only the model info is asked for again.
    let second = stdout_path(&env.cli(
        &hub.endpoint,
        &["pull", REPO, "--quant", "q8_0", "--vision-quant", "f16"],
        &[],
    ));
    assert!(second.to_string_lossy().ends_with("-q8_0-f16.mqf"));
    check_mqf(&second);
    assert_eq!(gets(&hub), n + 1);

    // Offline, a quant not converted yet is made from the cached snapshot.
    let third = stdout_path(&env.cli(
        &closed_endpoint(),
        &["pull", REPO, "--quant", "bf16"],
        &[("HF_HUB_OFFLINE", "1")],
    ));
    check_mqf(&third);

    // Online but with the hub out of reach, the cached snapshot is used too.
    let out = env.cli(&closed_endpoint(), &["pull", REPO, "--quant", "f16"], &[]);
    check_mqf(&stdout_path(&out));
    assert!(
        stderr(&out).contains("using the cached snapshot"),
        "{}",
        stderr(&out)
    );

    // --force asks the hub again, re-checks the blobs and converts again.
    let before = std::fs::metadata(&first).unwrap().modified().unwrap();
    let forced = stdout_path(&env.cli(
        &hub.endpoint,
        &["pull", REPO, "--quant", "f32", "--force"],
        &[],
    ));
    assert_eq!(forced, first);
    assert!(std::fs::metadata(&first).unwrap().modified().unwrap() >= before);
    assert_eq!(gets(&hub), n + 2, "intact blobs are not downloaded again");
}

#[test]
fn token_from_hf_home_file() {
    let token = "hf_file_token";
    let hub = HubServer::start(Behaviour {
        require_token: Some(token.into()),
        ..Behaviour::default()
    });
    let env = TestEnv::new();
    std::fs::create_dir_all(env.hf_home()).unwrap();
    std::fs::write(env.hf_home().join("token"), format!("{token}\n")).unwrap();
    let mqf = stdout_path(&env.cli(&hub.endpoint, &["pull", REPO, "--quant", "f32"], &[]));
    check_mqf(&mqf);
}

#[test]
fn local_checkpoint_directory_is_converted_into_the_cache() {
    let env = TestEnv::new();
    let dir = fixture_dir();
    let dir = dir.to_str().unwrap();
    let first = stdout_path(&env.cli(&closed_endpoint(), &["pull", dir, "--quant", "f32"], &[]));
    assert!(first.starts_with(env.mipha_cache().join("local")));
    check_mqf(&first);
    let again = env.cli(&closed_endpoint(), &["pull", dir, "--quant", "f32"], &[]);
    assert_eq!(stdout_path(&again), first);
    assert!(!stderr(&again).contains("converting"), "converted twice");
}
