//! The node's actors. The supervision tree (also drawn in ARCHITECTURE.md):
//!
//! ```text
//! RootActor ("parley.root")                 restart policy for its children: escalate
//! ├── ClusterAgentActor                     death ⇒ root stops (escalate): without it peers
//! │                                          are neither dialled nor watched
//! ├── GatewayActor ("parley.gateway" group) death ⇒ root stops (escalate): peers could not reach
//! │                                          this node's shards
//! ├── ShardManagerActor                     death ⇒ root stops ⇒ node exits (no shard may run
//! │   │                                      without the manager that renews its lease)
//! │   └── ShardActor × owned shards         death ⇒ manager drops the route; the shard is
//! │       │                                  re-acquired (new epoch) and restarted on the next tick
//! │       └── StoreActor                    death ⇒ its shard stops (escalate): a shard without
//! │                                          its store cannot ack anything
//! └── SessionSupervisorActor                death ⇒ root stops (escalate)
//!     └── SessionActor × connections        death ⇒ ignored (logged): one client's socket closes
//! ```
//!
//! Every actor is one file with its family of names (`XActor`, `XState`, `XMsg`, `XArgs`).

pub mod cluster_agent;
pub mod gateway;
pub mod root;
pub mod session;
pub mod session_supervisor;
pub mod shard;
pub mod shard_manager;
pub mod store;
