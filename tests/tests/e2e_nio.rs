//! The end-to-end scenario with a real client library (matrix-nio, from PyPI):
//! two users, one room, 100 messages, while a third room-worker starts and one
//! of the original two stops halfway. Both users must see every message
//! exactly once, in order, through `/sync`, and page back through history.
//!
//! `scripts/test` installs matrix-nio into `.local/venv` and points
//! `TESSERA_TEST_PYTHON` at it.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tessera_tests::{Spec, TestCluster};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn python() -> PathBuf {
    tessera_tests::venv_python("TESSERA_TEST_PYTHON", "venv", "matrix-nio")
}

#[tokio::test(flavor = "multi_thread")]
async fn matrix_nio_chat_survives_room_worker_changes() {
    let python = python();
    let mut cluster = TestCluster::start(Spec {
        room_workers: 2,
        gateway: true,
        partitions: 16,
        ..Spec::default()
    })
    .await;
    cluster.register("alice").await;
    cluster.register("bob").await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("e2e/chat_nio.py");
    let mut child = tokio::process::Command::new(python)
        .arg(script)
        .arg(cluster.gateway_url.clone().unwrap())
        .arg("test.local")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start python");
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut result = None;
    let mut changed = false;
    let run = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            println!("nio: {line}");
            if line == "HALFWAY" {
                let third = cluster.add_room_worker().await;
                let status = cluster.stop("room-worker-0").await;
                assert!(
                    status.success(),
                    "room-worker-0 did not drain cleanly: {status}"
                );
                cluster.wait_all_partitions_owned().await;
                let owners = cluster.owners().await;
                assert!(owners.contains_key(&third), "{owners:?}");
                assert!(!owners.contains_key("room-worker-0"), "{owners:?}");
                changed = true;
                stdin.write_all(b"CONTINUE\n").await.unwrap();
                stdin.flush().await.unwrap();
            } else if let Some(json) = line.strip_prefix("RESULT ") {
                result = Some(serde_json::from_str::<serde_json::Value>(json).unwrap());
            } else if line.starts_with("FAIL") {
                panic!("the nio client failed: {line}");
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("the nio scenario finishes within 5 minutes");
    let status = child.wait().await.unwrap();
    assert!(status.success(), "nio script exited with {status}");
    assert!(changed, "the room-workers were changed halfway");
    let result = result.expect("the script reported a result");
    assert_eq!(result["alice_seen"], 100);
    assert_eq!(result["bob_seen"], 100);
    assert_eq!(result["paged"], 100);
}
