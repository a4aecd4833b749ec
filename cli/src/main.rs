//! The `mesh` command line.
fn main() -> anyhow::Result<()> {
    mesh_cli::main()
}
