//! The deployment files: `docker-compose.yml` is validated statically (this machine has no Docker
//! engine) with `docker-compose config -q`, its node services must match the nodes of the config
//! the image ships, and that config must load. The same topology — three nodes on Postgres — runs
//! as processes in `cluster.rs`.

use std::path::PathBuf;
use std::process::Command;

use parley_node::config::{Config, StorageKind};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

#[test]
fn compose_services_match_the_shipped_cluster_config() {
    let compose = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    let toml = std::fs::read_to_string(repo().join("deploy/compose.cluster.toml")).unwrap();
    let mut config = Config::from_toml(&toml.replace("kind = \"postgres\"", "kind = \"embedded\"")).unwrap();
    config
        .apply_env(|k| (k == "PARLEY_DATABASE_URL").then(|| "postgres://parley:x@postgres:5432/parley".to_string()))
        .unwrap();
    config.validate().unwrap();
    assert_eq!(config.storage.kind, StorageKind::Postgres);
    assert!(config.cluster.cookie.is_none(), "the cookie never comes from the file");
    assert_eq!(config.nodes.len(), 3);
    for node in &config.nodes {
        assert!(compose.contains(&format!("\"--name\", \"{}\"", node.name)), "no compose service runs {}", node.name);
        assert_eq!(node.dial_address(), format!("{}:9080", node.name), "peers dial the service name");
        // Browsers on the host reach a node at the port compose publishes for its 8080.
        let advertised = node.advertise_http.as_deref().unwrap_or_else(|| panic!("{} advertises no HTTP", node.name));
        let port = advertised.rsplit_once(':').map(|(_, p)| p).unwrap();
        let service =
            compose.split(&format!("\n  {}:", node.name)).nth(1).expect("its service").split("\n\n").next().unwrap();
        assert!(
            service.contains(&format!("ports: [\"{port}:{}\"]", node.http.port())),
            "{}: {advertised} is not published",
            node.name
        );
    }
    for service in ["postgres:", "redis:", "n1:", "n2:", "n3:"] {
        assert!(compose.contains(&format!("\n  {service}")), "service {service} missing");
    }
    assert!(!compose.contains("POSTGRES_PASSWORD:"), "passwords come from secret files");
    assert!(
        compose.contains("PARLEY_REDIS_URL: redis://redis:6379/0"),
        "the nodes use the redis service as their cache"
    );
}

#[test]
fn compose_file_is_valid_for_docker_compose() {
    let Ok(out) = Command::new("docker-compose").arg("version").output() else {
        // scripts/test.sh installs docker-compose; running without it is a setup error.
        panic!("docker-compose is not installed (scripts/test.sh installs it)");
    };
    assert!(out.status.success());
    // Validate a copy with placeholder secret files, as an operator would have them.
    let dir = parley_tests::TempDir::new("parley-compose");
    std::fs::copy(repo().join("docker-compose.yml"), dir.path().join("docker-compose.yml")).unwrap();
    std::fs::create_dir_all(dir.path().join("secrets")).unwrap();
    for s in ["cookie", "pg_password", "database_url"] {
        std::fs::write(dir.path().join("secrets").join(s), "placeholder").unwrap();
    }
    let out = Command::new("docker-compose")
        .args(["-f", "docker-compose.yml", "config", "-q"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "docker-compose config: {}", String::from_utf8_lossy(&out.stderr));
}
