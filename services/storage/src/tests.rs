//! Storage tests against a real Postgres (one fresh database each).

mod cluster;
mod federation;
mod persist;
mod pool;
mod schema;
