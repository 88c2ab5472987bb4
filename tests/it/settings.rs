//! Settings a user gets wrong: misspelt keys and out-of-range numbers are refused with the key
//! and the fix, before anything touches a database (a misspelt `database.admin_url` used to
//! select a brand-new local cluster silently).

use crate::helpers::{TestDb, bin, cli_with_env, stderr, stdout};

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn a_misspelt_setting_is_refused_with_the_nearest_key_and_no_local_cluster_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin())
        .args(["jobs", "list"])
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "TENANT_WORKER__DATABASE__ADMN_URL",
            "postgres://postgres@127.0.0.1:5432/postgres",
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("unknown setting `database.admn_url`"), "{err}");
    assert!(err.contains("TENANT_WORKER__DATABASE__ADMN_URL"), "{err}");
    assert!(err.contains("did you mean `database.admin_url`?"), "{err}");
    assert!(
        !dir.path().join(".tenant-worker").exists(),
        "no local cluster was created"
    );

    // The same in a config file, and in a kind's section.
    let file = dir.path().join("worker.toml");
    for (toml, key, hint) in [
        (
            "[worker]\nconcurency = 8\n",
            "worker.concurency",
            "worker.concurrency",
        ),
        (
            "[kinds.export]\ntimout_secs = 60\n",
            "kinds.export.timout_secs",
            "kinds.export.timeout_secs",
        ),
        (
            "[worker.timeouts]\nexport = 60\n",
            "worker.timeouts",
            "kinds.<kind>.timeout_secs",
        ),
    ] {
        std::fs::write(&file, toml).unwrap();
        let out = cli_with_env(&["--config", file.to_str().unwrap(), "jobs", "list"], &[]);
        assert_eq!(out.status.code(), Some(1), "{toml}");
        let err = stderr(&out);
        assert!(
            err.contains(&format!("unknown setting `{key}`")),
            "{toml}: {err}"
        );
        assert!(
            err.contains(&format!("did you mean `{hint}`?")),
            "{toml}: {err}"
        );
    }
    // A key far from every known one gets no guess.
    let out = cli_with_env(&["jobs", "list"], &env(&[("TENANT_WORKER__FOO", "1")]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("unknown setting `foo`"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("did you mean"), "{}", stderr(&out));
    // The shipped worker.toml has no unknown key.
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/worker.toml");
    let out = cli_with_env(&["--config", shipped, "keys", "--help"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    tenant_worker::Settings::load(Some(std::path::Path::new(shipped)))
        .expect("the shipped worker.toml loads");
}

#[test]
fn numbers_out_of_range_are_refused_naming_the_setting_and_the_bound() {
    for (var, value, expected) in [
        (
            "TENANT_WORKER__DATABASE__MAX_CONNECTIONS",
            "1",
            "`database.max_connections`: 1 is too few: the worker needs at least 3",
        ),
        (
            "TENANT_WORKER__DATABASE__MAX_CONNECTIONS",
            "2",
            "`database.max_connections`: 2 is too few",
        ),
        (
            "TENANT_WORKER__WORKER__BATCH_SIZE",
            "99999999",
            "`worker.batch_size`: 99999999 is more than the largest accepted value, 10000",
        ),
        (
            "TENANT_WORKER__WORKER__CONCURRENCY",
            "0",
            "`worker.concurrency`: must be greater than 0",
        ),
        (
            "TENANT_WORKER__WORKER__JOB_TIMEOUT_SECS",
            "99999999999",
            "`worker.job_timeout_secs`",
        ),
    ] {
        let out = cli_with_env(&["jobs", "list"], &env(&[(var, value)]));
        assert_eq!(out.status.code(), Some(1), "{var}={value}");
        assert!(
            stderr(&out).contains(expected),
            "{var}={value}: {}",
            stderr(&out)
        );
    }
}

#[tokio::test]
async fn the_fewest_connections_accepted_run_jobs_to_the_end() {
    // `database.max_connections = 1` used to loop on pool timeouts forever.
    let db = TestDb::new().await;
    let tenant = db.tenant("A").await;
    for _ in 0..20 {
        db.enqueue(tenant, "noop", serde_json::json!({})).await;
    }
    let mut vars = db.env();
    vars.push((
        "TENANT_WORKER__DATABASE__MAX_CONNECTIONS".into(),
        tenant_worker::config::MIN_CONNECTIONS.to_string(),
    ));
    let out = cli_with_env(&["run", "--until-idle"], &vars);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("20 done") || stderr(&out).contains("20 done"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
}
