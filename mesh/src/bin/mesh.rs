//! The `mesh` command line.
fn main() -> anyhow::Result<()> {
    mesh::cli::main()
}
