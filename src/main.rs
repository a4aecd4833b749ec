//! `cargo run -- ARGS` from the workspace root runs the `mesh` command line.
fn main() -> anyhow::Result<()> {
    mesh_cli::main()
}
