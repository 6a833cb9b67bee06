use std::io::Write;

use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn defaults_load_without_a_file() {
    let config = Config::load(None, env(&[])).unwrap();
    assert_eq!(config.cluster.partitions, 256);
    assert!(
        !config.registration.open,
        "registration is closed by default"
    );
}

#[test]
fn file_then_environment_overrides() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(
        file,
        "server_name = \"example.org\"\n[database]\npool_size = 3\n"
    )
    .unwrap();
    let config = Config::load(
        Some(file.path()),
        env(&[
            ("TESSERA_DATABASE__POOL_SIZE", "7"),
            ("TESSERA_REDIS__KEY_PREFIX", "t1"),
        ]),
    )
    .unwrap();
    assert_eq!(config.server_name, "example.org");
    assert_eq!(config.database.pool_size, 7);
    assert_eq!(config.redis.key_prefix, "t1");
}

#[test]
fn unknown_keys_are_rejected() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(file, "[database]\npool_sise = 3\n").unwrap();
    let err = Config::load(Some(file.path()), env(&[])).unwrap_err();
    assert!(err.to_string().contains("pool_sise"), "{err}");
}

#[test]
fn missing_file_is_a_clear_error() {
    let err = Config::load(Some(Path::new("/nonexistent/tessera.toml")), env(&[])).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/tessera.toml"));
}

#[test]
fn bad_server_name_is_rejected() {
    let err = Config::load(None, env(&[("TESSERA_SERVER_NAME", "bad name")])).unwrap_err();
    assert!(err.to_string().contains("server_name"), "{err}");
    for good in ["localhost", "example.org:8448", "127.0.0.1", "[::1]:8448"] {
        assert!(ruma_server_name_is_valid(good).is_ok(), "{good}");
    }
}

#[test]
fn example_toml_round_trips() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    write!(file, "{}", Config::example_toml()).unwrap();
    let config = Config::load(Some(file.path()), env(&[])).unwrap();
    assert_eq!(config.server_name, Config::default().server_name);
    assert_eq!(
        config.gateway.sync_workers,
        Config::default().gateway.sync_workers
    );
}

#[test]
fn the_example_config_in_deploy_is_current() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/tessera.example.toml");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = format!("{}{}", EXAMPLE_HEADER, Config::example_toml());
    if committed != generated {
        // Regenerate with: TESSERA_WRITE_EXAMPLE=1 cargo test -p tessera-runtime example
        if std::env::var_os("TESSERA_WRITE_EXAMPLE").is_some() {
            std::fs::write(&path, &generated).unwrap();
        } else {
            panic!(
                "deploy/tessera.example.toml is out of date; regenerate it with TESSERA_WRITE_EXAMPLE=1 cargo test -p tessera-runtime example"
            );
        }
    }
}

const EXAMPLE_HEADER: &str = "# Every setting with its default. Generated from the config structs in
# services/runtime/src/config.rs (regenerate: TESSERA_WRITE_EXAMPLE=1 cargo test -p tessera-runtime example).
# One file for every role; any key can be overridden from the environment:
# TESSERA_<SECTION>__<KEY>, e.g. TESSERA_DATABASE__URL. docs/operations.md explains each key.

";
