pub async fn run(_a: BenchArgs) -> anyhow::Result<()> { anyhow::bail!("not yet") }
#[derive(clap::Args, Debug)] pub struct BenchArgs {}
