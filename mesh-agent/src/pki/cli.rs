//! `mesh-agent ca …`: create, serve and rotate the mesh CA.

#[derive(Debug, clap::Subcommand)]
pub enum CaCommand {}

pub fn run(command: CaCommand) -> anyhow::Result<()> {
    match command {}
}
