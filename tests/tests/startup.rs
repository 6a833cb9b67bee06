//! A failed start explains itself on stderr and exits non-zero: bad config,
//! unreachable database, a schema from an incompatible release, a partition
//! count that differs from the cluster's.

use std::process::Stdio;
use std::time::Duration;

use tessera_tests::{Spec, TestCluster, binary};

/// Run a binary with a config and environment; return (exit code, stderr).
async fn run(binary_name: &str, config: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    run_with(binary_name, &[], config, env).await
}

/// As [`run`], with command-line arguments.
async fn run_with(
    binary_name: &str,
    args: &[&str],
    config: &str,
    env: &[(&str, &str)],
) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tessera.toml");
    std::fs::write(&path, config).unwrap();
    let mut command = tokio::process::Command::new(binary(binary_name));
    for (key, _) in std::env::vars() {
        if key.starts_with("TESSERA_") {
            command.env_remove(key);
        }
    }
    command
        .args(args)
        .env("TESSERA_CONFIG", &path)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("exits within 60 s")
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_config_is_explained() {
    for binary_name in [
        "tessera-room-worker",
        "tessera-client-api",
        "tessera-sync-worker",
        "tessera-gateway",
    ] {
        let (code, stderr) = run(binary_name, "[database]\npool_sise = 3\n", &[]).await;
        assert_eq!(code, Some(1), "{binary_name}: {stderr}");
        assert!(
            stderr.contains("cannot start") && stderr.contains("pool_sise"),
            "{binary_name}: {stderr}"
        );
    }
    let (code, stderr) = run("tessera-client-api", "server_name = \"not a name\"\n", &[]).await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("server_name"), "{stderr}");
    let (code, stderr) = run(
        "tessera-client-api",
        "",
        &[("TESSERA_CLUSTER__PARTITIONS", "0")],
    )
    .await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("cluster.partitions"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_database_is_explained() {
    let config = "[database]\nurl = \"postgres://root:hunter2@127.0.0.1:1/nowhere\"\nconnect_timeout_secs = 1\n";
    let (code, stderr) = run("tessera-room-worker", config, &[]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr
            .contains("cannot connect to the database at postgres://root:***@127.0.0.1:1/nowhere"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("hunter2"),
        "the password must not be logged: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn incompatible_schema_and_partition_changes_are_refused() {
    let cluster = TestCluster::start(Spec {
        room_workers: 1,
        sync_workers: 1,
        partitions: 16,
        ..Spec::default()
    })
    .await;
    let config = std::fs::read_to_string(cluster.config_path()).unwrap();
    // Another partition count on the same database.
    let (code, stderr) = run(
        "tessera-sync-worker",
        &config.replace("partitions = 16", "partitions = 32"),
        &[("TESSERA_SYNC_WORKER__LISTEN", "127.0.0.1:0")],
    )
    .await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("created with 16 partitions"), "{stderr}");
    // A schema written by a future, incompatible release.
    let client = cluster.db().await;
    client
        .execute("UPDATE schema_compat SET compat_version = 99", &[])
        .await
        .unwrap();
    let (code, stderr) = run(
        "tessera-client-api",
        &config,
        &[("TESSERA_CLIENT_API__LISTEN", "127.0.0.1:0")],
    )
    .await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("compatibility version 99"), "{stderr}");
    // What the Helm chart's pre-upgrade Job runs refuses it too.
    let (code, stderr) = run_with("tessera-room-worker", &["--migrate-only"], &config, &[]).await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("compatibility version 99"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_only_migrates_and_exits() {
    let cluster = TestCluster::start(Spec {
        room_workers: 1,
        sync_workers: 1,
        ..Spec::default()
    })
    .await;
    let config = std::fs::read_to_string(cluster.config_path()).unwrap();
    // A new database on the same server: migrated from nothing, then left alone.
    let client = cluster.db().await;
    let db_name = cluster.db_url.rsplit('/').next().unwrap().to_owned();
    let fresh = format!("{db_name}_fresh");
    client
        .execute(&format!("CREATE DATABASE {fresh}"), &[])
        .await
        .unwrap();
    let fresh_url = cluster.db_url.replace(&db_name, &fresh);
    let env = [
        ("TESSERA_DATABASE__URL", fresh_url.as_str()),
        ("TESSERA_DATABASE__MIGRATE_ON_START", "false"),
    ];
    let (code, stderr) = run_with("tessera-room-worker", &["--migrate-only"], &config, &env).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("migrated and compatible"), "{stderr}");
    let (fresh_client, connection) = tokio_postgres::connect(&fresh_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let tables: i64 = fresh_client
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_name IN ('events', 'out_of_band_memberships')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 2, "every migration ran");
    drop(fresh_client);
    // --check-config only reads the configuration.
    let (code, _) = run_with("tessera-client-api", &["--check-config"], &config, &[]).await;
    assert_eq!(code, Some(0));
    let (code, stderr) = run_with("tessera-client-api", &["--migrate-only"], &config, &[]).await;
    assert_eq!(code, Some(1), "only room-workers migrate: {stderr}");
    client
        .execute(&format!("DROP DATABASE {fresh} WITH (FORCE)"), &[])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn well_known_files_say_what_is_configured() {
    let cluster = TestCluster::start(Spec {
        room_workers: 1,
        sync_workers: 1,
        ..Spec::default()
    })
    .await;
    let api = cluster.api();
    let (status, client) = api
        .call(
            reqwest::Method::GET,
            "/.well-known/matrix/client",
            None,
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        client["m.homeserver"]["base_url"],
        "https://client.tessera.test"
    );
    let (status, server) = api
        .call(
            reqwest::Method::GET,
            "/.well-known/matrix/server",
            None,
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(server["m.server"], "federation.tessera.test:443");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configured_signing_key_becomes_the_clusters() {
    let cluster = TestCluster::start(Spec {
        room_workers: 1,
        sync_workers: 1,
        ..Spec::default()
    })
    .await;
    let store = cluster.store().await;
    let generated = tessera_federation::keys::cluster_signing_key(&store, None)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("signing.key");
    std::fs::write(
        &path,
        "ed25519 a_moved nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A\n",
    )
    .unwrap();
    let configured = tessera_federation::keys::cluster_signing_key(&store, Some(&path))
        .await
        .unwrap();
    assert_eq!(configured.key_id(), "ed25519:a_moved");
    assert_ne!(configured.key_id(), generated.key_id());
    // Processes without the file now use it too.
    let current = tessera_federation::keys::cluster_signing_key(&store, None)
        .await
        .unwrap();
    assert_eq!(current.key_id(), "ed25519:a_moved");
    assert_eq!(current.public_key_base64(), configured.public_key_base64());
    std::fs::write(&path, "ed25519 a_moved AAAA\n").unwrap();
    let error = tessera_federation::keys::cluster_signing_key(&store, Some(&path))
        .await
        .err()
        .expect("a bad key file is refused");
    assert!(error.to_string().contains("signing.key"), "{error}");
}
