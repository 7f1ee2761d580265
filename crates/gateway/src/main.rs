use anyhow::Context;
use flashsale_core::{ops, settings::Env};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!("{}", include_str!("../help.txt"));
        return Ok(());
    }
    ops::init_tracing();
    let config = flashsale_gateway::Config::from_env(&Env::process())?;
    tracing::info!(?config, "starting gateway");
    let shutdown = ops::shutdown_on_signal();
    let gateway = flashsale_gateway::start(config, shutdown)
        .await
        .context("starting the gateway")?;
    gateway.task.await??;
    Ok(())
}
