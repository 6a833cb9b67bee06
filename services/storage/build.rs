//! Rebuild when a migration is added, not only when one changes: the
//! migrations are embedded at compile time (`refinery::embed_migrations!`),
//! and the compiler tracks only the files it read.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
