//! The store a single-node test runs on: the embedded store in a scratch directory, or a private
//! real Postgres. Tests that must hold on both are written once, as `async fn name(pg: bool)`, and
//! listed in [`both_backends!`](crate::both_backends), which makes an `embedded::name` and a
//! `postgres::name` test of each.

use parley_storage::{StoreConfig, Stores};

use crate::node::{NodeOptions, NodeProcess, Storage};
use crate::postgres::TestPostgres;
use crate::TempDir;

/// A store for one test, kept alive (Postgres running, directory present) as long as it is.
pub struct Backend {
    pub storage: Storage,
    _pg: Option<TestPostgres>,
    _dir: TempDir,
}

impl Backend {
    pub async fn new(postgres: bool) -> Backend {
        let dir = TempDir::new("parley-store");
        if postgres {
            let pg = TestPostgres::start().await.expect("postgres");
            Backend { storage: Storage::Postgres(pg.url().to_string()), _pg: Some(pg), _dir: dir }
        } else {
            Backend { storage: Storage::Embedded(dir.path().join("data")), _pg: None, _dir: dir }
        }
    }

    /// Open the same store the node uses, from the test process.
    pub async fn open(&self) -> Stores {
        let config = match &self.storage {
            Storage::Embedded(dir) => StoreConfig::Embedded { dir: dir.clone() },
            Storage::Postgres(url) => StoreConfig::Postgres { url: url.clone(), pool_size: 2, commit_slots: 1 },
        };
        parley_storage::open(&config).await.expect("open store")
    }

    /// Start node `n1` on this store, with `extra_toml` appended to its config.
    pub async fn node(&self, extra_toml: &str) -> NodeProcess {
        let mut options = NodeOptions::new("n1", self.storage.clone());
        options.extra_toml = extra_toml.to_string();
        NodeProcess::start(options).await.expect("node starts")
    }
}

/// `both_backends!(a, b)` makes tests `embedded::a`, `postgres::a`, `embedded::b`, … that call
/// `a(false)`, `a(true)`, … of the invoking module.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod embedded { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(false).await } )* }
        mod postgres { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(true).await } )* }
    };
}
